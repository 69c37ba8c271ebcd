"""Kept for old scripts: the same as `dalle-ar tokens` (dalle_ar/cli/tokens.py), options and all."""

import logging
import sys

from dalle_ar.cli.tokens import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
