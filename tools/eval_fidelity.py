"""Kept for old scripts: the same as `dalle-ar eval fidelity` (dalle_ar/cli/eval.py)."""

import logging
import sys

from dalle_ar.cli.eval import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
