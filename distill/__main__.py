"""`python -m distill ...`, and the `distill` console script (`distill.__main__:main`): distill/cli/main.py."""
import sys

from distill.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
