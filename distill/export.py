"""`python -m distill.export`: kept as a module name; the command is distill/cli/export.py."""
import sys

from distill.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
