"""`python -m distill.recipe_doc`: kept as a module name; the command is distill/cli/recipe_doc.py."""
import sys

from distill.cli.recipe_doc import main

if __name__ == "__main__":
    sys.exit(main())
