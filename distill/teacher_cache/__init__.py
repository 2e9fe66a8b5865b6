"""Offline distillation: the teacher's distributions written to disk once (`python -m distill.teacher_cache RECIPE`)
and read by any number of training runs, which then load no teacher (`kd.cache` in a recipe)."""
