"""Run on 2 processes: the role switch, a teacher born sharded, its logits, saving and an uneven eval set.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.roles_check ASSETS_DIR OUT_JSON
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from distill.config.recipe import validate_recipe
    from distill.trainers.distill import DistillTrainer
    from tests.helpers import end_of_script, tiny_assets, tiny_recipe

    root, out_json = map(Path, (argv or sys.argv[1:])[:2])
    assets = tiny_assets(root)
    recipe = validate_recipe(tiny_recipe(assets, root / "run_roles"), DistillTrainer)

    born_sharded = {}

    class Probe(DistillTrainer):
        def load_model(self, plan):
            model = super().load_model(plan)
            # Under zero.Init every parameter is a partitioned DeepSpeed parameter from birth.
            born_sharded[plan.name] = [hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()]
            return model

    t = Probe(recipe)
    m, world = t.manager, t.world_size
    assert world == 2, f"accelerate sees {world} processes"
    assert all(born_sharded["teacher"]), "the ZeRO-3 teacher was materialised before partitioning"
    assert not any(born_sharded["student"]), "the ZeRO-2 student was built under zero.Init"

    def stage() -> int:
        return AcceleratorState().deepspeed_plugin.zero_stage

    with m.use("teacher"):
        assert is_deepspeed_zero3_enabled() and stage() == 3 and m.active == "teacher"
    with m.use("student"):
        assert not is_deepspeed_zero3_enabled() and stage() == 2
        with m.use("teacher"):
            assert is_deepspeed_zero3_enabled()
        assert m.active == "student" and not is_deepspeed_zero3_enabled()
    before = m.active
    try:
        with m.use("teacher"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert m.active == before and is_deepspeed_zero3_enabled() == (before == "teacher")

    # Each rank holds about half of every teacher parameter.
    local = sum(p.ds_tensor.numel() for p in t.teacher.module.parameters())
    total = sum(p.ds_numel for p in t.teacher.module.parameters())
    assert abs(local / total - 1 / world) < 0.02, (local, total)

    # The sharded teacher computes what the same weights compute whole, in one process.
    torch.manual_seed(0)
    ids = torch.randint(0, len(t.tokenizer), (3, 17))
    mask = torch.ones_like(ids)
    with m.use("student"):  # ZeRO-3 off: a plain, whole model
        ref = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        sharded = t.teacher(input_ids=ids, attention_mask=mask).logits
        whole = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(sharded, whole, atol=1e-5, rtol=1e-5)

    # Saving the student after the ZeRO-3 teacher was prepared still saves the student's weights,
    # and the teacher's gathered state dict is the checkpoint it was loaded from.
    t.student.save_pretrained(root / "saved_student", t.tokenizer)
    engine_state = {k: v.detach().clone() for k, v in t.student.module.state_dict().items()}
    teacher_state = t.teacher.state_dict()
    if t.accelerator.is_main_process:
        with m.use("student"):
            saved = AutoModelForCausalLM.from_pretrained(root / "saved_student").state_dict()
        for k, v in engine_state.items():
            torch.testing.assert_close(saved[k], v, atol=0, rtol=0)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(teacher_state[k], v, atol=0, rtol=0)

    # 37 eval texts on 2 ranks x 4 per batch: ranks get 19 and 18 + 1 padding example. Same number
    # of ZeRO-3 forwards everywhere (no hang), and the same numbers as one process over every text.
    ev = t.evaluate()
    from distill.losses import cross_entropy

    with m.use("student"):
        student_ref = AutoModelForCausalLM.from_pretrained(root / "saved_student").eval()
    ce_sum, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(t.data.eval)):
            b = t.data.collator([t.data.eval[i]])
            logits = student_ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ce_sum += float(cross_entropy(logits, b["labels"], num_valid_tokens=1))
            n += int((b["labels"] != -100).sum())
    assert abs(ev["ce"] - ce_sum / n) < 1e-5, (ev["ce"], ce_sum / n)

    # Cost of one switch and back (our fast path) against accelerate's select_deepspeed_plugin, in turns in this
    # process (a loaded machine slows both), the fastest of 5 rounds of each.
    state = AcceleratorState()

    def per_switch_us(switch, reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            switch()
        return (time.perf_counter() - t0) / reps * 1e6

    def ours():
        with m.use("teacher"):
            pass

    def accelerates():
        state.select_deepspeed_plugin("teacher")
        state.select_deepspeed_plugin("student")

    rounds = [(per_switch_us(ours, 200), per_switch_us(accelerates, 5)) for _ in range(5)]
    with m.use("teacher"):  # our plugins and transformers' config as the manager set them, again
        pass
    if t.accelerator.is_main_process:
        out_json.write_text(json.dumps({"switch_us": min(r[0] for r in rounds), "accelerate_switch_us": min(r[1] for r in rounds),
                                        "eval": ev, "local_fraction": local / total}))
    t.accelerator.wait_for_everyone()
    m.use("student").__enter__()  # leave the state as the trainer expects
    end_of_script()


if __name__ == "__main__":
    main()
