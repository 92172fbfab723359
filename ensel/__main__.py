"""`python -m ensel ...` is the `ensel` command line."""

import sys

from .cli import main

sys.exit(main())
