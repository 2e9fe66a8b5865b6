"""Peak memory of the chunked sequence log-probs (distill/losses/logps.py), forward and backward.

    python benchmarks/logps_memory.py                      # the DPO benchmark's head: H 1024, V 32000, bf16
    python benchmarks/logps_memory.py --tokens 8192 --vocab 128256

Counts CPU allocations with torch.profiler (tests.helpers.peak_cpu_bytes): the tensors made are the
ones the same code makes on a GPU, where torch.cuda.max_memory_allocated would count them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="predicted tokens (all rows of the micro-batch)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args(argv)
    from distill.losses.logps import head_sequence_logps, sequence_logps
    from tests.helpers import peak_cpu_bytes

    torch.manual_seed(0)
    hidden = torch.randn(1, a.tokens, a.hidden, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.02 * torch.randn(a.vocab, a.hidden)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, a.vocab, (1, a.tokens))
    logits = torch.randn(1, a.tokens, a.vocab, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():  # a frozen role's forward: smaller chunks (head_chunk_rows)
        frozen = peak_cpu_bytes(lambda: head_sequence_logps(hidden, weight, labels)) / 2**20
    mib = {"chunked": peak_cpu_bytes(lambda: head_sequence_logps(hidden, weight, labels).sum().backward()) / 2**20,
           "chunked_frozen": frozen,
           "logits": peak_cpu_bytes(lambda: sequence_logps(logits, labels).sum().backward()) / 2**20,
           "logits_grad": logits.numel() * logits.element_size() / 2**20}
    print(f"dpo.logps chunked (hidden states through the head): peak {mib['chunked']:.0f} MiB")
    print(f"dpo.logps chunked, frozen role's forward (no grad): peak {mib['chunked_frozen']:.0f} MiB")
    print(f"dpo.logps logits: peak {mib['logits']:.0f} MiB, of which the logits' bf16 gradient {mib['logits_grad']:.0f} MiB")
    return mib


if __name__ == "__main__":
    main()
