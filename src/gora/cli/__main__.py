"""``python -m gora.cli``: the ``gora`` command line (as ``python -m gora``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
