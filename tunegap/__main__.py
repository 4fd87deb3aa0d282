"""`python -m tunegap` and `torchrun -m tunegap` run the same command line as `tunegap`."""

import sys

from .cli import main

sys.exit(main())
