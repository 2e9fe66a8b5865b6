"""`distill train RECIPE.yaml [key=value ...]` (the console script) and `python -m distill ...`."""
from __future__ import annotations

import sys

COMMANDS = {"train": "distill.train", "export": "distill.export", "report": "distill.report"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: distill {{{','.join(COMMANDS)}}} ...   (e.g. distill train recipes/quickstart.yaml)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
