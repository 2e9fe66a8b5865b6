"""`python -m distill.export RUN_DIR [--step N] OUT_DIR`: every trainable role of a checkpoint in HF format.

Runs in one process without GPUs: DeepSpeed's ZeRO shards of each role are merged into fp32 weights
(`zero_to_fp32`), loaded into the role's model class and written with `save_pretrained`
(safetensors + config) under OUT_DIR/<role>/, with the checkpoint's tokenizer files copied byte for byte. A
LoRA role is written merged, with its adapter under OUT_DIR/<role>/adapter/ (which
`AutoPeftModelForCausalLM.from_pretrained` loads, base included), as a run's own final/<role>/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, PreTrainedTokenizerFast

from distill.config.errors import RecipeError
from distill.loop.checkpoint import checkpoint_dir, latest_checkpoint, safe_torch_load
from distill.models.build import class_of_saved
from distill.models.lora import read_base, read_spec, save_lora
from distill.models.tokenizer_files import auto_tokenizer_note, copy_tokenizer_files


def export_checkpoint(ckpt: Path, out: Path, log=print) -> list[str]:
    roles = sorted(p.name for p in ckpt.iterdir() if (p / "state").is_dir())
    for role in roles:
        src = ckpt / role
        with safe_torch_load():  # tensors and DeepSpeed's records only: a tampered file cannot run code
            state = get_fp32_state_dict_from_zero_checkpoint(str(src), tag="state")
        config = AutoConfig.from_pretrained(src)
        lora = read_spec(src)
        if lora is not None:
            save_lora(out / role, lora, config, state, read_base(src))
        else:
            with torch.device("meta"):
                model = class_of_saved(config).from_config(config)
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            model.tie_weights()
            untied = [k for k in missing if model.get_parameter(k).is_meta] if missing else []
            if untied or unexpected:
                raise ValueError(f"{src}: weights do not fit the model: missing {untied}, unexpected {unexpected}")
            model.save_pretrained(out / role, safe_serialization=True)
        # The checkpoint's tokenizer files as they are: loading and saving again could change how it splits text.
        if copy_tokenizer_files(src, out / role) and (note := _tokenizer_note(src, out / role)):
            log(f"note: {note}")
    return roles


def _tokenizer_note(src: Path, out: Path) -> str | None:
    """`auto_tokenizer_note` against the checkpoint's tokenizer read from its files as they are (tokenizer.json)."""
    try:
        reference = PreTrainedTokenizerFast.from_pretrained(src)
    except (OSError, ValueError):  # a tokenizer without tokenizer.json: no fast reading to compare with
        return None
    return auto_tokenizer_note(out, reference)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distill export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run's output_dir")
    p.add_argument("out_dir", type=Path, help="where to write <role>/ in HF format")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest complete one)")
    args = p.parse_args(argv)
    if args.step is None:
        ckpt = latest_checkpoint(args.run_dir)
    else:
        ckpt = checkpoint_dir(args.run_dir) / f"step_{args.step:08d}"
        ckpt = ckpt if (ckpt / "trainer_state.json").is_file() else None
    if ckpt is None:
        have = sorted(c.name for c in checkpoint_dir(args.run_dir).glob("step_*")) if checkpoint_dir(args.run_dir).is_dir() else []
        print(f"distill export: no complete checkpoint {'of step ' + str(args.step) + ' ' if args.step else ''}in "
              f"{args.run_dir}/checkpoints (found: {', '.join(have) or 'none'})", file=sys.stderr)
        return 2
    try:
        roles = export_checkpoint(ckpt, args.out_dir)
    except RecipeError as e:
        print(f"distill export: {e}", file=sys.stderr)
        return 2
    print(f"exported {', '.join(roles)} from {ckpt} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
