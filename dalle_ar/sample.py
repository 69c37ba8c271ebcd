"""The old module of `dalle-ar sample` (`python -m dalle_ar.sample ...`); it lives in
`dalle_ar.cli.sample`."""

import logging
import sys

from dalle_ar.cli.sample import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
