"""``python -m wsecho [MODULE[:ATTR]] [options]``."""

import sys

from wsecho.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
