"""`python -m distill.report`: kept as a module name; the command is distill/cli/report.py."""
import sys

from distill.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
