"""`python -m lenpred ...` is the `lenpred` command."""

import sys

from lenpred.cli import main

sys.exit(main())
