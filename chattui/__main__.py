"""`chattui` console script and `python -m chattui`."""

import sys

from chattui.cli import main

if __name__ == "__main__":
    sys.exit(main())
