"""Datasets: loading, tokenising, packing, collating; prompts, preference pairs; the synthetic language."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.data.synthetic import SyntheticLanguage, build_tokenizer, write_dataset
    from distill.data.text import CausalCollator, load_text_dataset, make_dataloader, tokenize_dataset

# Resolved lazily so `python -m distill.data.synthetic` does not import the
# module twice (runpy warns when the package already imported it).
_EXPORTS = {
    "SyntheticLanguage": "synthetic",
    "build_tokenizer": "synthetic",
    "write_dataset": "synthetic",
    "CausalCollator": "text",
    "load_text_dataset": "text",
    "make_dataloader": "text",
    "tokenize_dataset": "text",
    "load_dataset_source": "text",
    "PreferenceCollator": "preference",
    "load_preference_dataset": "preference",
    "tokenize_preferences": "preference",
    "write_preference_dataset": "preference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"distill.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'distill.data' has no attribute {name!r}")
