"""`python -m tunegap` and `torchrun -m tunegap` run the same command line as `tunegap`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: exit as main() would, without a traceback
    print("tunegap: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
