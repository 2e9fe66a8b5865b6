"""`python -m distill.train`: kept as a module name; the command is distill/cli/train.py."""
from distill.cli.train import main
from distill.runtime.launch import leave

if __name__ == "__main__":
    leave(main())
