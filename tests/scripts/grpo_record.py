"""A GRPOTrainer that writes every generation batch of its rank, as `prepare_step` returns it, to
`<output_dir>/generation_batches_rank<R>.jsonl`: one line per batch with the step, the rows' rewards and their
advantages. A recipe selects it with `trainer: tests.scripts.grpo_record:RecordingGRPO`; tests/trainers/test_grpo.py compares
what the ranks wrote with the advantages of the whole batch, all ranks' rows together."""
from __future__ import annotations

import json

import torch

from distill.trainers.grpo import GRPOTrainer


class RecordingGRPO(GRPOTrainer):
    def prepare_step(self, step, micro_batches):
        micro = super().prepare_step(step, micro_batches)
        if (step - 1) % self.recipe.grpo.num_iterations == 0:  # a new generation batch
            record = {"step": step, **{k: torch.cat([mb[k] for mb in micro]).tolist() for k in ("rewards", "advantages")}}
            with open(self.out / f"generation_batches_rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return micro
