"""Entry points: the `distill` commands (train, export, report, recipes, teacher_cache) and `distill.run`."""
