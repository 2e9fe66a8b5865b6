"""Sampling and decoding from a role, and CompletionSampler: completions generated during training."""
