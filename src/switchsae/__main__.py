"""`python -m switchsae ...` runs the command line (see `switchsae.cli`)."""

import sys

from switchsae.cli import main

sys.exit(main())
