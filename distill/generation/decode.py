"""The decode loop behind `distill.generation`: a static KV cache, the decode step replayed as CUDA graphs.

transformers' `generate()` spends most of a small model's decode step in Python: logits processors,
stopping criteria that read a flag back from the GPU every token, cache bookkeeping. With
`cache_implementation="static"` it compiles the forward, but the loop around it stays (docs/performance.md
measures both). Here the whole step (forward, sampling, eos bookkeeping) is one CUDA graph, replayed
back to back with no read-back, and the host looks at the GPU once every `check_every` steps.

What it holds, per engine (one per role), kept between generation phases:
- `StaticKV`: keys and values of every layer in tensors of `rows` x `length` columns. All rows of a
  phase share a column for each step: prompts are left-padded, generated token s goes to column P + s.
  The models see it through transformers' `Cache` interface (`update`), with a 4D additive attention
  mask and explicit position ids, so no cache bookkeeping of transformers runs.
- graphs per (rows, columns) bucket, captured when a phase first needs one: rows halve as rows end (the
  rows still generating are moved to the front, "compaction"), and a step attends only over the columns
  written so far, rounded up to a multiple of `length_step`; each bucket replays its own graph.
- `compiled`: the forward of the step through `torch.compile`, one graph for every bucket (batch and
  column dimensions dynamic); `graphs`: the eager forward, captured as is; `static`: no graphs (CPU).
  On a CPU, `compiled` runs the compiled forward without graphs (a check of the compiled code).
"""
from __future__ import annotations

import bisect
import contextlib
import inspect
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache

from distill.generation.sampling import sample_next

MIN_ROWS = 8
"""The smallest batch bucket: fewer rows cost the same step on a GPU (the weights are read once per step)."""
PREFILL_TOKENS = 32768
"""Prompt tokens per prefill forward: rows are prefilled in groups of at most this many tokens."""


class StaticKV(Cache):
    """Per layer, keys and values [rows, kv_heads, columns, head_dim], views into the engine's storage; each
    forward writes its tokens at `columns` [q]. Only what the models call of a `Cache` when they are given
    a 4D mask and position ids is implemented; transformers' own cache layers change between versions."""

    is_compileable = True

    def __init__(self, keys: list, values: list, columns: torch.Tensor):
        super().__init__(layers=[])
        self.keys, self.values, self.columns = keys, values, columns

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.columns, key_states)
        values.index_copy_(2, self.columns, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("StaticKV is driven with explicit position_ids")


class _Probe(StaticKV):
    """Records each layer's key/value shapes and dtype from one 1-token forward: the cache fits any architecture."""

    def __init__(self):
        super().__init__([], [], torch.zeros(1, dtype=torch.long))
        self.seen: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.seen[layer_idx] = (key_states.shape[1], key_states.shape[-1], value_states.shape[-1], key_states.dtype)
        return key_states, value_states


def _forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """The keyword a model takes its cache by (`cache` from transformers 5.2x, `past_key_values` before),
    and whether it takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes kwargs on
    params = inspect.signature(type(base).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _forward(model, cache_kw: str, dtype: torch.dtype, cache: StaticKV, tok: torch.Tensor, pos: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
    """One decode step's logits [b, V] (fp32): tokens [b] at positions [b], attending the columns `valid` [b, C]."""
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.finfo(dtype).min)
    out = model(input_ids=tok[:, None], position_ids=pos[:, None], attention_mask=mask[:, None, None, :],
                use_cache=True, **{cache_kw: cache})
    return out.logits[:, -1].float()


_compiled_forward: Callable | None = None


def _compiled() -> Callable:
    global _compiled_forward
    if _compiled_forward is None:
        _compiled_forward = torch.compile(_forward, dynamic=None)
    return _compiled_forward


def _mark_dynamic(cache: StaticKV, *tensors: torch.Tensor) -> None:
    """Batch and column dimensions symbolic: one compiled graph serves every bucket."""
    for t in (*cache.keys, *cache.values):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(tensors[-1], 1)


class DecodeEngine:
    """Static buffers for up to `rows` sequences of `length` columns and `max_new_tokens` new tokens."""

    def __init__(self, model: torch.nn.Module, *, rows: int, length: int, max_new_tokens: int, mode: str,
                 length_step: int = 64, check_every: int | None = None, compact: bool = True):
        """`compact: False` keeps ended rows in the batch to the end (for comparison: benchmarks/generation.py)."""
        if mode not in ("compiled", "graphs", "static"):
            raise ValueError(f"unknown decode mode {mode!r}")
        self.model, self.mode, self.rows, self.max_new_tokens = model, mode, rows, max_new_tokens
        self.device = next(model.parameters()).device
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError("decode mode 'graphs' needs a CUDA device; use 'static'")
        self.cache_kw, self.logits_kw = _forward_kwargs(model)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.length = -(-length // length_step) * length_step
        self.columns = list(range(length_step, self.length + 1, length_step))
        self.batches = sorted({rows, *(b for b in (2**i for i in range(3, 20)) if MIN_ROWS <= b < rows and compact)})
        self.check_every = check_every or (16 if self.device.type == "cuda" else 1)
        self.keys, self.values = self._allocate()
        d, long = self.device, torch.long
        self.tok, self.pos = torch.zeros(rows, dtype=long, device=d), torch.zeros(rows, dtype=long, device=d)
        # One column more than used: no view of a bucket is contiguous, so one compiled graph guards them all.
        self.valid = torch.zeros(rows, self.length + 1, dtype=torch.bool, device=d)
        self.done = torch.zeros(rows, dtype=torch.bool, device=d)
        self.out = torch.zeros(rows, max_new_tokens, dtype=long, device=d)
        self.t, self.col = torch.zeros(1, dtype=long, device=d), torch.zeros(1, dtype=long, device=d)
        self.prefill_columns = torch.arange(self.length, device=d)
        self.graphs: dict[tuple, Any] = {}
        self.graph_key: tuple | None = None  # (sampling, parameter addresses) the graphs were captured with
        self.pool = None
        self.eos = torch.zeros(0, dtype=long, device=d)  # the graphs read the ids from here
        self.graphless = False  # set when a capture failed

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def _allocate(self) -> tuple[list, list]:
        probe = _Probe()
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with _eager_layers():
            self.model(input_ids=one, position_ids=one, attention_mask=torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=self.device),
                       use_cache=True, **{self.cache_kw: probe})
        keys, values = [None] * (max(probe.seen) + 1), [None] * (max(probe.seen) + 1)
        for i, (heads, dk, dv, dtype) in probe.seen.items():
            keys[i] = torch.zeros(self.rows, heads, self.length + 1, dk, dtype=dtype, device=self.device)
            values[i] = torch.zeros(self.rows, heads, self.length + 1, dv, dtype=dtype, device=self.device)
        return keys, values

    def _cache(self, rows: slice, columns: int, positions: torch.Tensor) -> StaticKV:
        view = lambda ts: [None if t is None else t[rows, :, :columns] for t in ts]  # noqa: E731
        return StaticKV(view(self.keys), view(self.values), positions)

    def _bucket(self, sizes: list[int], n: int) -> int:
        return sizes[min(bisect.bisect_left(sizes, n), len(sizes) - 1)]

    # -- one step -------------------------------------------------------------------------------
    def _emit(self, logits: torch.Tensor, b: int, sampling, eos: torch.Tensor) -> None:
        """Sample token `t` of the first `b` rows from `logits` [b, V]; finished rows get pad. Graph-safe."""
        done = self.done[:b]
        nxt = sample_next(logits, sampling, eos, ban_eos=self.t < sampling.min_new_tokens)
        nxt = torch.where(done, sampling.pad_token_id, nxt)
        self.out[:b].index_copy_(1, self.t, nxt[:, None])
        # Not torch.isin: past ~20 ids it sorts through torch.unique, which reads back and breaks a capture.
        done |= (nxt[:, None] == eos).any(-1)
        self.tok[:b].copy_(nxt)
        self.pos[:b] += 1
        self.col += 1
        self.t += 1

    def _step(self, b: int, columns: int, sampling, eos: torch.Tensor) -> None:
        valid = self.valid[:b, :columns]
        valid.index_fill_(1, self.col, True)
        cache = self._cache(slice(0, b), columns, self.col)
        args = (cache, self.tok[:b], self.pos[:b], valid)
        if self.mode == "compiled":
            _mark_dynamic(*args)
            with _uncompiled_layers(self.model):
                logits = _compiled()(self.model, self.cache_kw, self.dtype, *args)
        else:
            with _eager_layers():
                logits = _forward(self.model, self.cache_kw, self.dtype, *args)
        self._emit(logits, b, sampling, eos)

    def _graphs_for(self, sampling, eos: torch.Tensor) -> None:
        """Forget the graphs when they were captured for other settings or other weights (a ZeRO-3 role's
        gathered weights live at new addresses each time). A trainable model's graphs are all captured here, at
        its first phase: on an H200, capturing the student's step after its first training step (DeepSpeed ZeRO-2,
        compiled layers) failed with cudaErrorStreamCaptureInvalidated, while graphs captured before it replayed
        correctly after (docs/performance.md). A frozen model's are captured as its phases need them."""
        key = (sampling, tuple(p.data_ptr() for p in self.model.parameters()))
        if self.graph_key == key:
            return
        self.graphs.clear()
        self.graph_key = key
        if any(p.requires_grad for p in self.model.parameters()):
            self.col.zero_(), self.t.zero_()  # scratch state before the prefill: every bucket's column 0 exists
            for b in self.batches:
                for c in self.columns:
                    if not self.graphless:
                        self._replay(b, c, sampling, eos, run=False)

    def _replay(self, b: int, columns: int, sampling, eos: torch.Tensor, run: bool = True) -> None:
        """Run the step of bucket (b, columns) from its graph, captured first if needed (`run=False`: only that)."""
        graph = self.graphs.get((b, columns))
        if graph is None and not self.graphless:
            rng = torch.cuda.get_rng_state(self.device)
            try:
                graph = self.graphs[(b, columns)] = self._capture(b, columns, sampling, eos)
            except RuntimeError as e:
                # The step still runs, without graphs. A failed capture leaves the RNG state it registered marked
                # as capturing: every graph registered with it would fail too, so all go.
                self.graphs.clear()
                _fresh_rng_state(self.device, rng)
                self.graphless = True
                print(f"distill: generation: capturing the decode step as a CUDA graph failed, it runs without graphs "
                      f"from now on ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
        if not run:
            return
        if graph is None:
            self._step(b, columns, sampling, eos)
        else:
            graph.replay()

    def _capture(self, b: int, columns: int, sampling, eos: torch.Tensor):
        """The step of bucket (b, columns) as a CUDA graph, captured when a phase first needs it.

        Two runs before the capture (the first compiles; both load every kernel) write what the real step
        writes next (the same cache column and output token from the same inputs); the rest of the state
        they change is put back, and so is the RNG: samples depend on the seed alone, not on which buckets
        were captured when."""
        live = (self.tok[:b], self.pos[:b], self.done[:b], self.t, self.col)
        saved = [x.clone() for x in live]
        rng = torch.cuda.get_rng_state(self.device)
        self.side = getattr(self, "side", None) or torch.cuda.Stream(self.device)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(2):
                self._step(b, columns, sampling, eos)
                for x, y in zip(live, saved):
                    x.copy_(y)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (NCCL's, DeepSpeed's) do not break the capture.
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                self._step(b, columns, sampling, eos)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.side)
        torch.cuda.set_rng_state(rng, self.device)
        return graph

    def _eos_ids(self, sampling) -> torch.Tensor:
        ids = torch.tensor(sampling.eos_token_ids, dtype=torch.long)
        if not torch.equal(ids, self.eos.cpu()):
            self.eos = ids.to(self.device)
        return self.eos

    # -- a phase ----------------------------------------------------------------------------------
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, b: int, sampling, eos: torch.Tensor) -> None:
        """Prompts [r, P] (left-padded) into the cache; token 0 sampled. Rows r..b-1 are fillers, done from the start."""
        r, width = ids.shape
        ids = torch.cat([ids, ids.new_full((b - r, width), sampling.pad_token_id)])  # [b, P]
        mask = torch.cat([mask, mask.new_zeros(b - r, width)]).bool()  # [b, P]
        columns = self._bucket(self.columns, width)
        self.valid[:b].zero_()
        self.valid[:b, :width] = mask
        causal = torch.arange(columns, device=self.device)[None, :] <= torch.arange(width, device=self.device)[:, None]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)  # [b, P], as generate() numbers them
        step = max(1, PREFILL_TOKENS // width)
        extra = {"logits_to_keep": 1} if self.logits_kw else {}
        logits = []
        for lo in range(0, b, step):
            hi = min(b, lo + step)
            allowed = self.valid[lo:hi, None, :columns] & causal  # [rows, P, C]
            attn = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, torch.finfo(self.dtype).min)
            cache = self._cache(slice(lo, hi), columns, self.prefill_columns[:width])
            with _eager_layers():
                out = self.model(input_ids=ids[lo:hi], position_ids=positions[lo:hi], attention_mask=attn[:, None],
                                 use_cache=True, **{self.cache_kw: cache}, **extra)
            logits.append(out.logits[:, -1].float())
        self.done[:b] = torch.arange(b, device=self.device) >= r
        self.out[:b].fill_(sampling.pad_token_id)
        self.t.zero_()
        self.col.fill_(width - 1)
        self.pos[:b] = mask.sum(-1) - 1
        self._emit(torch.cat(logits), b, sampling, eos)

    def run(self, ids: torch.Tensor, mask: torch.Tensor, sampling) -> torch.Tensor:
        """Completions [r, max_new_tokens] of prompts [r, P] (r <= rows), pad after the first eos."""
        r, width = ids.shape
        if r > self.rows or width + self.max_new_tokens - 1 > self.length:
            raise ValueError(f"{r} rows of {width} prompt tokens do not fit an engine of {self.rows} x {self.length}")
        final = torch.full((r + 1, self.max_new_tokens), sampling.pad_token_id, dtype=torch.long, device=self.device)
        eos = self._eos_ids(sampling)
        graphs = self.mode != "static" and self.device.type == "cuda"
        if graphs:
            self._graphs_for(sampling, eos)
        b = self._bucket(self.batches, r)
        self._prefill(ids, mask, b, sampling, eos)
        rowmap = torch.cat([torch.arange(r), torch.full((b - r,), r)]).to(self.device)  # filler rows write to row r
        for s in range(1, self.max_new_tokens):
            if (s - 1) % self.check_every == 0:
                active = (~self.done[:b]).nonzero().squeeze(1)  # the one read-back: every check_every steps
                if len(active) == 0:
                    break
                smaller = self._bucket(self.batches, len(active))
                if smaller < b:
                    final.index_copy_(0, rowmap, self.out[:b])
                    rowmap = self._compact(active, b, smaller, rowmap, columns=width + s)
                    b = smaller
            columns = self._bucket(self.columns, width + s)  # column width + s - 1 is written now
            if graphs:
                self._replay(b, columns, sampling, eos)
            else:
                self._step(b, columns, sampling, eos)
        final.index_copy_(0, rowmap, self.out[:b])
        return final[:r]

    def _compact(self, active: torch.Tensor, b: int, smaller: int, rowmap: torch.Tensor, columns: int) -> torch.Tensor:
        """Move the rows still generating to the front; the rest of the smaller bucket is finished filler."""
        ended = torch.ones(b, dtype=torch.bool, device=self.device)
        ended[active] = False
        order = torch.cat([active, ended.nonzero().squeeze(1)])[:smaller]  # [smaller]
        for t in (*self.keys, *self.values):
            if t is not None:
                t[:smaller, :, :columns] = t[order, :, :columns]
        for t in (self.tok, self.pos, self.valid, self.done, self.out):
            t[:smaller] = t[order]
        return rowmap[order]


def _fresh_rng_state(device: torch.device, rng: torch.Tensor) -> None:
    """The device's default generator back to `rng`, with a fresh state object: a failed capture leaves the old
    one marked as capturing, and every later draw would fail."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if hasattr(generator, "graphsafe_set_state"):
        fresh = torch.Generator(device=device)
        generator.graphsafe_set_state(fresh.graphsafe_get_state())
    torch.cuda.set_rng_state(rng, device)


@contextlib.contextmanager
def _uncompiled_layers(model: torch.nn.Module):
    """The step's own compile traces the layers' code: layers compiled for training (`Module.compile`) are
    plain modules while it runs, so their static per-shape graphs are neither consulted nor compiled."""
    held = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in held:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in held:
            m._compiled_call_impl = impl


@contextlib.contextmanager
def _eager_layers():
    """Layers compiled for training (`<role>.compile`) run uncompiled here: each decode shape would compile a graph."""
    with torch.compiler.set_stance("force_eager"):
        yield
