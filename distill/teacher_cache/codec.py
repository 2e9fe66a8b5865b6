"""One predicted token's teacher distribution as a record of a fixed number of bytes, and back.

A record holds these fields, in this order, each starting on a byte:

* ``ids``: the ``k`` head entries' token ids, most likely first, then (format ``sampled``) the ``samples`` ids
  drawn from the rest of the distribution, in increasing order; ``id_bits = ceil(log2(vocab_size))`` bits each,
  packed (``ids: packed``), or int32.
* ``values``: the head entries' log-probabilities (temperature 1, over the whole vocabulary): fp32, bf16 or
  fp16; or quantised to b bits and packed: ``log{b}`` rounds ``-logp`` to multiples of ``LOG_RANGE / (2**b - 1)``
  (saturating at ``LOG_RANGE`` nats), ``sqrt{b}`` rounds ``sqrt(p)`` to multiples of ``1 / (2**b - 1)`` (an entry
  that rounds to 0 is dropped).
* ``tail``: the log of the probability mass outside the head: fp16 (fp32 with fp32 values). Format ``sampled``
  with ``k: 0`` stores none (the tail is everything).
* ``label``: the teacher's log-probability of the token that follows, fp32 (eval records only: the teacher's CE).

Format ``sampled`` draws its ids by systematic sampling from the distribution outside the head: one uniform
``u`` per position and the points ``(u + j) / samples``, j = 0 .. samples - 1, of its cumulative distribution (in
token id order). Each token is then drawn ``floor`` or ``ceil`` of ``samples * p / tail`` times, so
``tail * count / samples`` is an unbiased estimate of its probability, with a smaller variance than independent
draws; a token repeated in the ids is one entry with its count. `Codec.decode` turns records into a
`distill.losses.SparseTeacher` on whatever device they are on.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from distill.losses.sparse_kd import SparseTeacher

FORMATS = ("topk", "sampled")
FLOAT_VALUES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTISED = re.compile(r"(log|sqrt)(\d+)")
LOG_RANGE = 24.0
"""Nats below the most likely token that `log{b}` values reach; smaller log-probabilities saturate there."""
MAX_FIELD_BITS = 25  # a packed field is read from a 4-byte window at any bit offset


def check_values(values: str) -> str:
    """`values` if it names a value encoding, else ValueError naming the choices."""
    m = QUANTISED.fullmatch(values)
    if values in FLOAT_VALUES or (m and 2 <= int(m.group(2)) <= 16):
        return values
    raise ValueError(f"unknown value encoding {values!r}: choose fp32, bf16, fp16, log<b> or sqrt<b> with b in 2..16 "
                     "(e.g. sqrt8)")


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """[P, n] ints below 2**bits -> [P, ceil(n * bits / 8)] uint8, little-endian: value j at bits j*bits ..."""
    p, n = values.shape
    shifts = torch.arange(bits, device=values.device)
    flat = ((values.long().unsqueeze(-1) >> shifts) & 1).reshape(p, n * bits)  # [P, n*bits]
    flat = torch.cat([flat, flat.new_zeros(p, -(n * bits) % 8)], -1).reshape(p, -1, 8)
    return (flat << torch.arange(8, device=values.device)).sum(-1).to(torch.uint8)


def unpack_bits(data: Tensor, n: int, bits: int) -> Tensor:
    """The inverse of `pack_bits` on [..., bytes] uint8: [..., n] int64."""
    if bits > MAX_FIELD_BITS:
        raise ValueError(f"packed fields of {bits} bits: at most {MAX_FIELD_BITS}")
    pos = torch.arange(n, device=data.device) * bits
    byte, shift = pos // 8, pos % 8
    d = torch.cat([data, data.new_zeros(*data.shape[:-1], 4)], -1).long()
    word = d[..., byte] | (d[..., byte + 1] << 8) | (d[..., byte + 2] << 16) | (d[..., byte + 3] << 24)
    return (word >> shift) & ((1 << bits) - 1)


@dataclass(frozen=True)
class Codec:
    """How records of one split are laid out (see the module docstring)."""

    format: str
    k: int
    samples: int
    values: str
    ids: str
    vocab_size: int
    label: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}: choose {' or '.join(FORMATS)}")
        check_values(self.values)
        if self.format == "topk" and (self.k < 1 or self.samples):
            raise ValueError("format topk stores k >= 1 entries and no samples")
        if self.format == "sampled" and self.samples < 1:
            raise ValueError("format sampled draws samples >= 1 tokens")
        if self.k > self.vocab_size:
            raise ValueError(f"k={self.k} is more than the {self.vocab_size} tokens of the vocabulary")
        if self.ids == "packed" and id_bits(self.vocab_size) > MAX_FIELD_BITS:
            raise ValueError(f"a vocabulary of {self.vocab_size} needs more than {MAX_FIELD_BITS} bits an id: ids: int32")

    def settings(self) -> dict:
        return asdict(self)

    # -- layout ------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.k + self.samples

    @property
    def value_bits(self) -> int:
        return 8 * FLOAT_VALUES[self.values].itemsize if self.values in FLOAT_VALUES else int(QUANTISED.fullmatch(self.values).group(2))

    @property
    def tail_dtype(self) -> torch.dtype | None:
        if self.format == "sampled" and self.k == 0:
            return None
        return torch.float32 if self.values == "fp32" else torch.float16

    @property
    def fields(self) -> dict[str, tuple[int, int]]:
        """Field name -> (byte offset, bytes) in a record."""
        sizes = {"ids": 4 * self.slots if self.ids == "int32" else -(-self.slots * id_bits(self.vocab_size) // 8),
                 "values": -(-self.k * self.value_bits // 8)}
        if self.tail_dtype is not None:
            sizes["tail"] = self.tail_dtype.itemsize
        if self.label:
            sizes["label"] = 4
        out, at = {}, 0
        for name, n in sizes.items():
            out[name] = (at, n)
            at += n
        return out

    @property
    def record_bytes(self) -> int:
        return sum(n for _, n in self.fields.values())

    # -- encoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, logp: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Records [P, record_bytes] uint8 of teacher log-probabilities [P, vocab_size] (fp32, normalised) and, for
        eval records, the labels [P]. `generator` draws the sampled format's offsets (on logp's device)."""
        if logp.shape[-1] != self.vocab_size:
            raise ValueError(f"log-probabilities over {logp.shape[-1]} tokens for a codec of {self.vocab_size}")
        logp = logp.float()
        p = logp.shape[0]
        head = logp.topk(self.k, -1) if self.k else None
        ids = head.indices if head is not None else logp.new_zeros(p, 0, dtype=torch.long)  # [P, k]
        rest = logp if head is None else logp.scatter(-1, head.indices, float("-inf"))  # [P, V]
        log_tail = torch.logsumexp(rest, -1)  # [P]
        if self.format == "sampled":
            ids = torch.cat([ids, self._draw(rest, generator)], -1)
        parts = [self._encode_ids(ids)]
        if self.k:
            parts.append(self._encode_values(head.values))
        if self.tail_dtype is not None:
            parts.append(_bytes(log_tail.to(self.tail_dtype)))
        if self.label:
            parts.append(_bytes(logp.gather(-1, labels.long()[:, None]).squeeze(-1).float()))
        return torch.cat(parts, -1)

    def _draw(self, rest: Tensor, generator) -> Tensor:
        """`samples` ids by systematic sampling from exp(rest) [P, V] (unnormalised), increasing."""
        n = self.samples
        cdf = rest.exp().cumsum(-1)  # [P, V]; the head's ids add exactly 0, so no point lands on them
        u = torch.rand(rest.shape[0], 1, device=rest.device, generator=generator)  # [P, 1]
        points = (u + torch.arange(n, device=rest.device)) / n * cdf[:, -1:]  # [P, n]
        return torch.searchsorted(cdf, points, right=True).clamp(max=self.vocab_size - 1)

    def _encode_ids(self, ids: Tensor) -> Tensor:
        if self.ids == "int32":
            return _bytes(ids.to(torch.int32))
        return pack_bits(ids, id_bits(self.vocab_size))

    def _encode_values(self, v: Tensor) -> Tensor:
        if self.values in FLOAT_VALUES:
            return _bytes(v.to(FLOAT_VALUES[self.values]))
        kind, bits = QUANTISED.fullmatch(self.values).groups()
        top = (1 << int(bits)) - 1
        if kind == "log":
            q = (-v / (LOG_RANGE / top)).round().clamp(0, top)
        else:
            q = ((v / 2).exp() * top).round().clamp(0, top)
        return pack_bits(q.long(), int(bits))

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, records: Tensor) -> tuple[SparseTeacher, Tensor | None]:
        """Records [..., record_bytes] -> (SparseTeacher [..., k + samples] with fp32 log-probs, the label's
        log-probability [...] or None)."""
        if records.shape[-1] != self.record_bytes:
            raise ValueError(f"records of {records.shape[-1]} bytes for a layout of {self.record_bytes}")
        lead = records.shape[:-1]
        r = records.reshape(-1, self.record_bytes)
        f = self.fields
        field = lambda name: r[:, f[name][0]:f[name][0] + f[name][1]]  # noqa: E731
        if self.ids == "int32":
            ids = _as(field("ids"), torch.int32).long()
        else:
            ids = unpack_bits(field("ids"), self.slots, id_bits(self.vocab_size))  # [M, slots]
        logp = self._decode_values(field("values")) if self.k else r.new_zeros(r.shape[0], 0, dtype=torch.float32)
        log_tail = (_as(field("tail"), self.tail_dtype).float().squeeze(-1) if self.tail_dtype is not None
                    else r.new_zeros(r.shape[0], dtype=torch.float32))
        if self.format == "sampled":
            logp = torch.cat([logp, _counted(ids[:, self.k:], log_tail, self.samples)], -1)
            log_tail = torch.full_like(log_tail, float("-inf"))
        label = _as(field("label"), torch.float32).squeeze(-1).reshape(lead) if self.label else None
        teacher = SparseTeacher(ids.reshape(*lead, self.slots), logp.reshape(*lead, self.slots), log_tail.reshape(lead))
        return teacher, label

    def _decode_values(self, data: Tensor) -> Tensor:
        if self.values in FLOAT_VALUES:
            return _as(data, FLOAT_VALUES[self.values]).float()
        kind, bits = QUANTISED.fullmatch(self.values).groups()
        top = (1 << int(bits)) - 1
        q = unpack_bits(data, self.k, int(bits)).float()  # [M, k]
        if kind == "log":
            return -q * (LOG_RANGE / top)
        return 2 * torch.log(q / top)  # q = 0: -inf, an empty slot


def _bytes(x: Tensor) -> Tensor:
    """[P, ...] of any dtype -> [P, bytes] uint8 (the machine's byte order: little-endian on x86 and ARM)."""
    return x.reshape(x.shape[0], -1).contiguous().view(torch.uint8)


def _as(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Bytes [M, n] read as `dtype` [M, n / itemsize], from a fresh copy: a field's columns need not start at an
    offset `view` accepts."""
    return torch.empty(data.shape, dtype=torch.uint8, device=data.device).copy_(data).view(dtype)


def _counted(ids: Tensor, log_tail: Tensor, n: int) -> Tensor:
    """Log-probabilities [M, n] of drawn ids [M, n] (increasing): log(tail * count / n) on the first of each run of
    equal ids, -inf on its repeats."""
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = first.long().cumsum(-1) - 1  # [M, n]
    counts = torch.zeros_like(ids, dtype=torch.float32).scatter_add_(-1, run, torch.ones_like(ids, dtype=torch.float32))
    count = counts.gather(-1, run).masked_fill(~first, 0.0)
    return log_tail[:, None] + torch.log(count / n)
