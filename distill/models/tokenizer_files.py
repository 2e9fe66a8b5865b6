"""A run's tokenizer, kept exact: compared by behaviour, and written by copying its files byte for byte.

Loading a tokenizer and saving it again can change how it splits text: transformers picks the tokenizer
class of some model types (qwen2, phi3, ...) from a directory's config.json whatever tokenizer_config.json
says, and that class rebuilds its own normaliser and pre-tokenizer; a re-save then records them. So every
directory a run or `distill.export` writes gets the files of the tokenizer the data was tokenized with, as
they were, and tokenizers are compared by the ids they give sample texts, not by their vocabularies.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
"""File names a tokenizer is saved under; a tokenizer class's own `vocab_files_names` are added to them."""

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Don't stop   me now!\nI'm having such a good time.\n\n",
    "Numbers: 12345, 3.14159, 1e-9, 2024-06-01 and 1,000,000.",
    "  leading and trailing spaces  ",
    "Tabs\tand\twindows\r\nnewlines.",
    "Café naïve façade ÅÄÖ — “quotes” ‘single’ …",
    "e\u0301 and \u00e9, ﬁ and fi, Ｆｕｌｌ width",
    "中文字符 日本語 한국어 العربية हिन्दी",
    "Emoji 🙂👍🏽 and symbols ©®™ ∑∫√ ≤≥",
    "def f(x):\n    return x ** 2  # code",
    "HELLO hello HeLLo",
)
"""Texts that tell tokenizers apart by their normaliser and pre-tokenizer (digits, whitespace, Unicode forms)."""


def tokenizer_difference(a, b, texts=PROBE_TEXTS) -> str | None:
    """How tokenizer `b` behaves differently from `a`: vocabulary, or the ids of `texts` (with and without
    special tokens); None when it does not."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        moved = sum(vb.get(t) != i for t, i in va.items()) + len(vb.keys() - va.keys())
        return f"their vocabularies differ ({len(va)} and {len(vb)} tokens, {moved} ids not shared)"
    differ = [t for t in dict.fromkeys(texts) for special in (True, False)
              if a(t, add_special_tokens=special)["input_ids"] != b(t, add_special_tokens=special)["input_ids"]]
    if not differ:
        return None
    t = differ[0]
    shown = repr(t if len(t) <= 60 else t[:57] + "...")
    return (f"the same vocabulary, but {len(set(differ))} of {len(set(texts))} sample texts tokenize differently, e.g. "
            f"{shown}: {a.tokenize(t)[:12]} against {b.tokenize(t)[:12]}")


def source_dir(tokenizer) -> Path | None:
    """The directory the tokenizer's files were loaded from: its local path, or its hub cache snapshot."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name:
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    try:
        from transformers.utils import cached_file

        found = cached_file(name, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


def copy_tokenizer_files(src: Path, out: Path, names=()) -> list[str]:
    """Copy the tokenizer files of directory `src` into `out`, byte for byte; returns the names copied."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in dict.fromkeys((*TOKENIZER_FILES, *names)):
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, out / name)  # follows a hub cache's symlinks
            copied.append(name)
    templates = Path(src) / "additional_chat_templates"
    if templates.is_dir():
        shutil.copytree(templates, out / templates.name, dirs_exist_ok=True)
        copied.append(templates.name)
    return copied


def save_tokenizer(tokenizer, out: Path) -> None:
    """The files `tokenizer` was loaded from, copied into `out`; `save_pretrained` for one built in memory."""
    src = source_dir(tokenizer)
    names = tuple(getattr(tokenizer, "vocab_files_names", {}).values())
    if src is None or Path(src).resolve() == Path(out).resolve() or not copy_tokenizer_files(src, Path(out), names):
        tokenizer.save_pretrained(out)


def auto_tokenizer_note(directory: Path, tokenizer) -> str | None:
    """A note when `AutoTokenizer.from_pretrained(directory)` tokenizes differently from `tokenizer`, whose files
    the directory holds (transformers chose another class for the directory's model type); None when it does not."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        return f"{directory}: AutoTokenizer cannot load its tokenizer ({type(e).__name__}: {e})"
    why = tokenizer_difference(tokenizer, loaded)
    if why is None:
        return None
    return (f"{directory}: AutoTokenizer.from_pretrained loads the tokenizer there as {type(loaded).__name__} (chosen by "
            f"transformers for the model type in config.json), which differs from the tokenizer the model was trained "
            f"with: {why}. The files are the training tokenizer's, byte for byte: load them with "
            f"PreTrainedTokenizerFast.from_pretrained(\"{directory}\")")
