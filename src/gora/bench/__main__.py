import sys

from gora.bench.cli import main

sys.exit(main())
