"""Sampling completions of prompts with a role's model: the one generation path of every trainer.

    from distill.generation.generate import SamplingSpec, generate_completions

    spec = SamplingSpec(max_new_tokens=256, temperature=1.0, top_p=0.95, eos_token_ids=(eos,), pad_token_id=pad)
    out = generate_completions(role_model, prompt_ids, prompt_mask, spec, seed=seed, num_generations=4)
    out.tokens   # [B * 4, N]: prompt b's completions are rows 4b .. 4b+3, pad after each one's first eos
    out.lengths  # [B * 4]: tokens up to and including the first eos (N where none came)

How (`decode`): `compiled` (the default on GPUs) and `graphs` run `distill.generation.decode.DecodeEngine`, a static
KV cache whose decode step is replayed as CUDA graphs, compiled or not; `static` is the same loop without
graphs (the default on CPU); `generate` is transformers' `generate()`, which a role that stays sharded
while it generates (ZeRO-3, synced) always uses. Sampling is the same in all of them: the logits
processed as `generate()` processes them (min_new_tokens, then temperature, top-k, top-p), then one draw
per row. Every call is seeded; the global RNG is left as it was.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from distill.generation.decode import DecodeEngine
from distill.generation.sampling import Completions, SamplingSpec, completion_lengths, processed_logits, sample_next
from distill.runtime.roles import RoleModel

__all__ = ["Completions", "SamplingSpec", "completion_lengths", "generate_completions", "processed_logits", "sample_next"]

DECODE_MODES = ("auto", "compiled", "graphs", "static", "generate")
MEMORY_MARGIN = 0.05
"""Share of the device's memory never given to KV caches (allocator fragmentation, the CUDA context)."""


def resolve_decode(decode: str, *, device: torch.device, sharded: bool, config=None, length: int = 0) -> tuple[str, str]:
    """(mode, why): the decode mode that runs, from the requested one and where the model is."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode {decode!r}: use one of {DECODE_MODES}")
    if sharded:
        return "generate", "the weights stay sharded while generating: generate() with synced_gpus"
    window = getattr(config, "sliding_window", None) if config is not None else None
    if decode != "generate" and window and length > window:
        return "generate", f"{length} tokens exceed the sliding window ({window}) the static cache does not apply"
    attn = getattr(config, "_attn_implementation", "sdpa") if config is not None else "sdpa"
    if decode != "generate" and attn not in ("sdpa", "eager"):
        return "generate", f"attn_implementation {attn} takes no 4D mask; the static cache needs sdpa or eager"
    if decode == "auto":
        return ("compiled", "GPU") if device.type == "cuda" else ("static", "CPU")
    if decode in ("compiled", "graphs") and device.type != "cuda":
        return "static", f"{decode} needs a GPU"
    return decode, "as asked"


def kv_bytes_per_row(config, length: int, dtype_bytes: int) -> int:
    """Static KV cache bytes of one sequence of `length` tokens, from the model config (for plans)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv * head_dim * length * dtype_bytes


def sampling_bytes_per_row(vocab_size: int) -> int:
    """Per row: the fp32 logits and their processed, sorted and noise copies a decode step holds."""
    return 40 * vocab_size


def rows_that_fit(per_row: int, *, device: torch.device, reserve_bytes: int = 0) -> int | None:
    """Rows whose cache fits in this GPU's free memory (what the allocator holds unused counts as free),
    less `reserve_bytes` (what the training step will still allocate) and a margin; None on CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, int(free - reserve_bytes - MEMORY_MARGIN * total) // per_row)


def decode_cache(module: torch.nn.Module) -> dict:
    """What `generate_completions` keeps on a model between calls: "engine", its DecodeEngine (static cache, graphs),
    and "wanted", the rows it was asked for. Kept in the model's `__dict__` (not a registry) so that it goes with the
    model; a benchmark may set its own engine there, a test read its graphs."""
    return vars(module).setdefault("distill_decode", {})


def generate_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None, spec: SamplingSpec, *,
                         seed: int | None = None, num_generations: int = 1, batch_size: int | None = None,
                         decode: str = "auto", gather: bool = False, max_prompt_length: int | None = None,
                         expected_rows: int | None = None, reserve_bytes: int = 0,
                         log: Callable[[str], None] | None = None) -> Completions:
    """Completions of left-padded prompts [B, P] (mask [B, P]): tokens [B * n, N] and lengths [B * n].

    `model`: a RoleModel (its plugin active, eval mode, gradient checkpointing off while it generates; a
    ZeRO-3 role gathers its weights once for the call with `gather`, else generates sharded with
    synced_gpus) or a plain transformers model. `batch_size`: rows per decode phase (None: all, as far as
    the GPU's free memory less `reserve_bytes` holds their cache). `max_prompt_length`, `expected_rows`: the
    widest prompt and the most rows (num_generations included) later calls will bring: the cache is sized once
    for them. `seed`: per call and per rank (ranks draw differently). Collective only where `model` is a ZeRO-3
    RoleModel."""
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    if num_generations > 1:
        prompt_ids = prompt_ids.repeat_interleave(num_generations, 0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, 0)
    role = model if isinstance(model, RoleModel) else None
    module = role.module if role else model
    sharded = role is not None and role.plan.zero_stage == 3 and not gather
    length = max(prompt_ids.shape[1], max_prompt_length or 0) + spec.max_new_tokens
    mode, _ = resolve_decode(decode, device=prompt_ids.device, sharded=sharded,
                             config=getattr(module, "config", None), length=length)
    context = role.generating(gather=gather) if role else _eval(module)
    rng = torch.random.fork_rng(devices=[prompt_ids.device] if prompt_ids.device.type == "cuda" else [])
    with torch.no_grad(), rng, context:
        if seed is not None:
            torch.manual_seed(seed)
        if mode == "generate":
            tokens = _hf_generate(module, prompt_ids, prompt_mask, spec, synced=sharded)
        else:
            tokens = _decode_or_fall_back(module, prompt_ids, prompt_mask, spec, mode=mode, fall_back=decode == "auto",
                                          batch_size=batch_size, expected_rows=expected_rows, length=length,
                                          reserve_bytes=reserve_bytes, log=log)
    lengths = completion_lengths(tokens, spec.eos_token_ids) if spec.eos_token_ids else torch.full(
        (tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    width = int(lengths.max()) if len(lengths) else 0
    return Completions(tokens[:, :width], lengths)


_FASTEST_FIRST = ("compiled", "graphs", "static")


def _decode_or_fall_back(module, ids, mask, spec: SamplingSpec, *, mode: str, fall_back: bool, **kw) -> torch.Tensor:
    """With `decode: auto` on a GPU: compiled, else (torch.compile failed: no compiler toolchain, a model it cannot
    trace) CUDA graphs of the eager step, else the plain loop; a fall-back is said once and kept for the model."""
    if not fall_back:
        return _decode(module, ids, mask, spec, mode=mode, **kw)
    held = decode_cache(module)
    for m in _FASTEST_FIRST[max(_FASTEST_FIRST.index(mode), held.get("fallen", 0)):]:
        try:
            return _decode(module, ids, mask, spec, mode=m, **kw)
        except Exception as e:  # noqa: BLE001 - whatever stops a faster mode, the next one may run
            if m == "static":
                raise
            held.pop("engine", None)
            held["fallen"] = _FASTEST_FIRST.index(m) + 1
            print(f"distill: generation: {m} decode failed ({type(e).__name__}: {str(e)[:300]}); trying the next mode",
                  flush=True)
    raise AssertionError("unreachable")


def _decode(module, ids, mask, spec: SamplingSpec, *, mode, batch_size, expected_rows, length, reserve_bytes, log) -> torch.Tensor:
    """Rows in chunks of the engine's rows; the engine is (re)built only when a call needs more than it holds."""
    rows = len(ids)
    want = max(rows, expected_rows or 0)
    want = min(want, batch_size or want)
    held = decode_cache(module)
    e = held.get("engine")
    same = e is not None and e.mode == mode and e.length >= length and e.max_new_tokens == spec.max_new_tokens
    if not same or want > held["wanted"]:
        want = max(want, held["wanted"]) if same else want
        held.pop("engine", None)  # the old cache's memory is free again before the new one is sized
        per_row = _kv_bytes(module, length) + sampling_bytes_per_row(module.get_output_embeddings().weight.shape[0])
        fit = rows_that_fit(per_row, device=ids.device, reserve_bytes=reserve_bytes)
        e = DecodeEngine(module, rows=want if fit is None else max(1, min(want, fit)), length=length,
                         max_new_tokens=spec.max_new_tokens, mode=mode)
        held.update(engine=e, wanted=want)
        if log:
            cap = "" if fit is None or fit >= want else f", capped by free memory ({want} asked)"
            log(f"generation: {mode} decode, static KV cache of {e.rows} rows x {e.length} columns "
                f"({e.bytes / 2**30:.2f} GiB{cap}); {len(e.batches)} x {len(e.columns)} (rows x columns) buckets")
    chunks = [e.run(ids[i:i + e.rows], mask[i:i + e.rows], spec) for i in range(0, rows, e.rows)]
    return torch.cat(chunks)


def _kv_bytes(module, length: int) -> int:
    dtype = module.get_input_embeddings().weight.dtype
    return kv_bytes_per_row(module.config, length, torch.finfo(dtype).bits // 8)


def _hf_generate(module, ids, mask, spec: SamplingSpec, *, synced: bool) -> torch.Tensor:
    from transformers import GenerationConfig

    out = module.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**spec.generate_kwargs()),
                          synced_gpus=synced)
    return out[:, ids.shape[1]:]


@contextlib.contextmanager
def _eval(module):
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)
