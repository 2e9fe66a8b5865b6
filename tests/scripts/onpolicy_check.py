"""Run on 2 processes: on-policy distillation, its generation under ZeRO-3 and its loss.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.onpolicy_check ROOT OUT_JSON [key=value ...]

Checks, with the shipped teacher at ZeRO-3 (it ends documents with eos, so completions stop at
very different lengths):
- greedy generation by the sharded teacher, with its weights gathered and with `synced_gpus`, and
  through distill.generation's static-cache loop (gathered once), equals generation by an unsharded
  copy, while rank 0 stops after 2 tokens and rank 1 runs for 24 (a hang here is the bug this guards
  against); so does the ZeRO-2 student's, against its own module's generate();
- the loss of a student-sampled micro-batch equals the divergence computed from unsharded
  models on the completion tokens only;
- a short run trains, with student- and teacher-written micro-batches, and logs generation timings.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.data.prompts import write_prompt_dataset
    from distill.generation.generate import SamplingSpec, generate_completions
    from distill.losses import get_kd_loss
    from distill.trainers.distill import DistillTrainer
    from tests.helpers import REPO, TINY_LLAMA, end_of_script

    args = argv or sys.argv[1:]
    root, out_json, overrides = Path(args[0]), Path(args[1]), args[2:]
    teacher_dir = REPO / "assets" / "teacher"
    write_prompt_dataset(root / "onpolicy_prompts", seed=0, n_train=64, n_eval=10)
    raw = {
        "trainer": "distill", "output_dir": str(root / "run"), "overwrite": True, "seed": 0,
        "student": {"config": TINY_LLAMA, "deepspeed": "zero2", "optimizer": {"lr": 3e-3}},
        "teacher": {"from_pretrained": str(teacher_dir), "deepspeed": "zero3"},
        "kd": {"loss": "generalized_jsd", "params": {"beta": 0.5}, "alpha": 0.5,
               "on_policy": {"lmbda": 0.5, "seq_kd": True, "max_new_tokens": 24}},
        "data": {"train": str(root / "onpolicy_prompts/train.jsonl"), "eval": str(root / "onpolicy_prompts/eval.jsonl"), "max_length": 48},
        "train": {"micro_batch_size": 4, "max_steps": 4, "log_every": 1, "progress": False},
        "launch": {"num_processes": 2, "timeout_s": 120},
    }
    recipe = validate_recipe(deep_merge(raw, parse_overrides(overrides)), DistillTrainer)
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()  # before any DeepSpeed config exists
    trainer = DistillTrainer(recipe, log=lambda *a: None)
    rank = trainer.rank
    result: dict = {"rank": rank}

    # -- generation under ZeRO-3: ranks stop at 2 and 24 tokens -----------------------------------
    batch = trainer.to_device(next(trainer.data.eval_batches()))
    greedy = dict(do_sample=False, pad_token_id=trainer.sampler.pad, eos_token_id=trainer.sampler.eos,
                  max_new_tokens=2 if rank == 0 else 24)
    want = reference.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], **greedy)
    want = want[:, batch["prompt_ids"].shape[1]:]
    for mode in ("gather", "synced"):
        got = trainer.teacher.generate(batch["prompt_ids"], batch["prompt_mask"], gather=mode == "gather", **greedy)
        result[f"teacher_{mode}_equal"] = torch.equal(got, want)
        result[f"teacher_{mode}_length"] = got.shape[1]
    spec = SamplingSpec(max_new_tokens=greedy["max_new_tokens"], temperature=0, eos_token_ids=(trainer.sampler.eos,),
                        pad_token_id=trainer.sampler.pad)
    fast = generate_completions(trainer.teacher, batch["prompt_ids"], batch["prompt_mask"], spec, gather=True, decode="static")
    width = want.shape[1]
    result["teacher_fast_equal"] = torch.equal(fast.tokens[:, :width], want) and fast.tokens.shape[1] <= width
    result["teacher_fast_length"] = fast.tokens.shape[1]
    mine = trainer.student.generate(batch["prompt_ids"], batch["prompt_mask"], gather=False, **greedy)
    fast = generate_completions(trainer.student, batch["prompt_ids"], batch["prompt_mask"], spec, decode="static")
    result["student_fast_equal"] = torch.equal(fast.tokens, mine[:, :fast.tokens.shape[1]]) and bool(
        (mine[:, fast.tokens.shape[1]:] == trainer.sampler.pad).all())
    # The teacher's shards still work after generation lifted and restored the hooks.
    with torch.no_grad():
        logits = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    result["teacher_logits_after_generation_diff"] = float((logits - ref_logits).abs().max())

    # -- the loss of a student-sampled micro-batch against unsharded models ----------------------
    train_batch = trainer.to_device(next(trainer.data.train_batches())[0])
    sampled = trainer.sampler.sample(trainer.student, train_batch, seed=1234)
    n = (sampled["labels"] != -100).sum()
    got = trainer.loss_step(sampled, n)
    with torch.no_grad():
        inputs = {"input_ids": sampled["input_ids"], "attention_mask": sampled["attention_mask"]}
        s_logits, t_logits = trainer.student.module(**inputs).logits, reference(**inputs).logits
        want = get_kd_loss("generalized_jsd")(s_logits, t_logits, sampled["labels"], num_valid_tokens=n, beta=0.5)
    result["sampled_loss"], result["sampled_loss_reference"] = float(got["loss"]), float(want)
    result["sampled_lengths"] = (sampled["labels"] != -100).sum(1).tolist()

    # -- a short run, student- and teacher-written micro-batches ----------------------------------
    sources: list[str] = []
    prepare = trainer.prepare_step

    def recording(step, micro):
        micro = prepare(step, micro)
        sources.extend(b.get("source", "data") for b in micro)
        return micro

    trainer.prepare_step = recording
    history = trainer.train()
    result["sources"] = sources
    from deepspeed.runtime.zero.linear import zero3_linear_wrap  # kept only for a trainable ZeRO-3 role
    result["deepspeed_linear"] = torch.nn.functional.linear is zero3_linear_wrap
    result["sampled_reverse_kl"] = [history["before"]["sampled/reverse_kl"], history["after"]["sampled/reverse_kl"]]
    if rank == 0:
        metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        result["gen_metrics"] = [m for m in metrics if "gen_tokens_per_s" in m]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        out_json.write_text(json.dumps(gathered))
    end_of_script()


if __name__ == "__main__":
    main()
