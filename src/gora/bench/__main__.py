import sys

from gora.bench.cli import main
from gora.errors import GoraError

try:
    status = main()
except GoraError as error:  # a refusal with a message saying what to do: no traceback, exit 2 (as `gora bench`)
    print(f"python -m gora.bench: error: {error}", file=sys.stderr)
    status = 2
sys.exit(status)
