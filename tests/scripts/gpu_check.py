"""GPU checks run in a process that sees the GPUs (tests/system/test_gpu.py): `python -m tests.scripts.gpu_check OUT.json CHECK`.

decode: every bucket's decode step captured as a CUDA graph (none fell back to the loop without graphs), with 16 eos
ids (what a set that large does to `torch.isin` broke captures), gives generate()'s greedy tokens, for the plain
(`graphs`) and the compiled step."""
from __future__ import annotations

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.generation.generate import SamplingSpec, decode_cache, generate_completions
from tests.generation.test_generation import PAD, V, _prompts  # the CPU tests' prompts and vocabulary


def decode() -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for mode in ("graphs", "compiled"):
        gpu = LlamaForCausalLM(cfg).cuda().eval()
        ids, mask = (x.cuda() for x in _prompts(21, 9))
        spec = SamplingSpec(max_new_tokens=30, temperature=0, eos_token_ids=tuple(range(3, V, 4)), pad_token_id=PAD)
        want = gpu.generate(input_ids=ids, attention_mask=mask, **spec.generate_kwargs())[:, ids.shape[1]:]
        got = generate_completions(gpu, ids, mask, spec, decode=mode)
        engine = decode_cache(gpu)["engine"]
        out[mode] = {"graphs": len(engine.graphs), "graphless": engine.graphless, "equal": torch.equal(got.tokens, want)}
    return out


def main(argv: list[str] | None = None) -> None:
    out, check = (argv or sys.argv[1:])[:2]
    assert torch.cuda.is_available(), "run with the GPUs visible"
    result = {"decode": decode}[check]()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
