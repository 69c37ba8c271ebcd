"""`python -m dalle_ar.cli ...`: the same as the `dalle-ar` command."""

import sys

from dalle_ar.cli import main

sys.exit(main())
