"""Pipelines that chain training runs through their run directories: `python -m distill.pipelines.rlhf` (docs/rlhf-pipeline.md)."""
