"""`distill recipes [copy NAME [DEST]]`: the recipes the package ships, listed or copied out to start from.

A shipped recipe also runs by its name alone (`distill train quickstart`); copying it gives a file to edit.
Copies keep their `distill:` paths (the shipped teacher), so they run from any directory.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from distill.config.presets import shipped_recipes


def summary(path: Path) -> tuple[str, str]:
    """(trainer, the first phrase of the header comment) of a recipe file."""
    text = path.read_text()
    header = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    return (yaml.safe_load(text) or {}).get("trainer", "?"), min((header.split(sep)[0] for sep in (": ", ". ")), key=len)


def recipes_table() -> str:
    lines = ["shipped recipes (run one by name, or `distill recipes copy NAME` to edit it):"]
    for name, path in shipped_recipes().items():
        trainer, what = summary(path)
        lines.append(f"  {name:28} [{trainer}] {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distill recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    copy = sub.add_parser("copy", help="write a shipped recipe to a file to edit")
    copy.add_argument("name", help="a shipped recipe's name, e.g. quickstart")
    copy.add_argument("dest", nargs="?", type=Path, help="a file or directory (default: ./NAME.yaml)")
    copy.add_argument("--force", action="store_true", help="replace an existing file")
    args = p.parse_args(argv)
    if args.command is None:
        print(recipes_table())
        return 0
    shipped = shipped_recipes()
    name = args.name.removesuffix(".yaml")
    if name not in shipped:
        print(f"distill recipes: no shipped recipe `{args.name}`; shipped: {', '.join(shipped)}", file=sys.stderr)
        return 2
    dest = args.dest or Path(f"{name}.yaml")
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    if dest.exists() and not args.force:
        print(f"distill recipes: {dest} exists; pass --force to replace it", file=sys.stderr)
        return 2
    shutil.copyfile(shipped[name], dest)
    print(f"wrote {dest}; run it with: python -m distill.train {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
