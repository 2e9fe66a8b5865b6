"""Decided before any weight loads: each role's placement, ZeRO stage and memory; file, input and tokenizer checks."""
