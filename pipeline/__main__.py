"""`python -m pipeline` runs the `ganpipe` command line."""

import sys

from pipeline.cli import main

sys.exit(main())
