"""``python -m zarkov``: the zcmd command line (see ``python -m zarkov help``)."""
import sys

from zarkov.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
