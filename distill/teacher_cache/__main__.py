"""`python -m distill.teacher_cache`: kept as a module name; the command is distill/cli/teacher_cache.py."""
from distill.cli.teacher_cache import main
from distill.runtime.launch import leave

if __name__ == "__main__":
    leave(main())
