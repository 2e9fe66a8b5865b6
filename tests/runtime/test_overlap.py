"""The performance options on CPU: the frozen-role overlap, fused optimizers, compiled layers; and
the recipe errors that guard them. Their multi-process runs are in test_multiprocess.py and test_dpo.py."""
import json
import threading
import time

import pytest
import torch

from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.runtime.overlap import Overlap
from distill.trainers.distill import DistillTrainer
from tests.helpers import TINY_LLAMA


def _raw(**sections):
    from distill.config.recipe import deep_merge

    base = {"trainer": "distill", "output_dir": "/tmp/unused", "data": {"train": "unused.jsonl"},
            "student": {"config": TINY_LLAMA}, "teacher": {"config": TINY_LLAMA}}
    return deep_merge(base, sections)


def _tiny_llama_pair():
    """A random tiny Llama and a second copy with the same weights (to compile, against the plain one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}))
    copy = AutoModelForCausalLM.from_config(plain.config)
    copy.load_state_dict(plain.state_dict())
    return plain, copy


def test_overlap_runs_the_frozen_call_in_a_worker_under_no_grad_while_the_other_runs():
    ov = Overlap(torch.device("cpu"), enabled=True)
    started, seen = threading.Event(), {}

    def frozen():
        started.set()
        seen["frozen"] = (threading.current_thread().name, torch.is_grad_enabled())
        return {"t": torch.ones(2)}

    def trainable():
        # Only a frozen call that never starts while this one runs reaches the limit: a loaded machine cannot.
        assert started.wait(120), "the frozen call did not start while the trainable one ran"
        seen["trainable"] = (threading.current_thread().name, torch.is_grad_enabled())
        return 7

    first, second = ov.run(frozen, trainable)
    assert torch.equal(first["t"], torch.ones(2)) and second == 7
    assert seen["frozen"] == ("distill-frozen_0", False)
    assert seen["trainable"] == (threading.current_thread().name, True)
    ov.close()


def test_overlap_in_turn_when_disabled_or_not_concurrent():
    order = []
    for ov, kw in ((Overlap(torch.device("cpu"), enabled=False), {}), (Overlap(torch.device("cpu"), enabled=True), {"concurrent": False})):
        order.clear()
        first, _ = ov.run(lambda: order.append(("frozen", threading.current_thread().name, torch.is_grad_enabled())),
                          lambda: order.append(("trainable", threading.current_thread().name, torch.is_grad_enabled())), **kw)
        me = threading.current_thread().name
        assert order == [("frozen", me, False), ("trainable", me, True)]


def test_overlap_errors_reach_the_caller_and_never_leave_the_worker_running():
    ov = Overlap(torch.device("cpu"), enabled=True)
    done = threading.Event()

    def slow_frozen():
        time.sleep(0.2)
        done.set()

    def failing():
        raise ValueError("trainable failed")

    with pytest.raises(ValueError, match="trainable failed"):
        ov.run(slow_frozen, failing)
    assert done.is_set()  # the caller waited for the worker before the error went up

    def failing_frozen():
        raise KeyError("frozen failed")

    with pytest.raises(KeyError, match="frozen failed"):
        ov.run(failing_frozen, lambda: None)
    ov.close()


def test_overlap_with_gradient_checkpointing_is_refused_and_off_by_default():
    with pytest.raises(RecipeError, match="overlap_frozen.*student.gradient_checkpointing"):
        validate_recipe(_raw(train={"overlap_frozen": True}, student={"gradient_checkpointing": True}), DistillTrainer)
    validate_recipe(_raw(student={"gradient_checkpointing": True}), DistillTrainer)  # null: allowed, decided at run time


def test_trainer_passes_the_fused_choice_to_the_optimizer():
    from distill.loop.build import build_optimizer

    model = torch.nn.Linear(3, 2)
    for fused, device, expect in ((None, "cpu", False), (True, "cpu", True), (False, "cpu", False), (None, "cuda", True)):
        for name in ("adamw", "sgd"):
            recipe = validate_recipe(_raw(student={"optimizer": {"name": name, "fused": fused}}), DistillTrainer)
            build = lambda: build_optimizer(recipe.student, model, total_steps=10, device=torch.device(device))  # noqa: E731
            if device == "cuda":  # building a CUDA fused optimizer needs the device; the choice is what is checked
                from unittest import mock

                real = torch.optim.SGD(model.parameters(), lr=1.0)
                with mock.patch("torch.optim.AdamW") as adamw, mock.patch("torch.optim.SGD") as sgd:
                    adamw.return_value = sgd.return_value = real
                    build()
                    called = adamw if name == "adamw" else sgd
                    assert called.call_args.kwargs["fused"] is expect
                continue
            opt, _ = build()
            assert type(opt).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[name]
            assert bool(opt.defaults["fused"]) is expect, (fused, name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiled_layers_compute_what_the_plain_model_computes(checkpointing):
    from distill.models.compile import compile_layers

    torch._dynamo.reset()
    plain, compiled = _tiny_llama_pair()
    if checkpointing:  # as apply_role_options does it: checkpointing first, then the layers compiled
        compiled.gradient_checkpointing_enable()
        compiled.train()
    assert compile_layers(compiled, backend="aot_eager") == plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (2, 11))
    outs = []
    for m in (plain, compiled):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-6)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][n], atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match="names no decoder-layer class"):
        compile_layers(torch.nn.Linear(2, 2))


def test_compiled_layers_keep_one_static_graph_per_batch_shape():
    """Left to itself torch recompiles for symbolic sizes at the second shape, and that graph was the slow one
    (distill/models/compile.py); each shape must get its own graph, and the layers must share it."""
    from torch._dynamo.utils import counters

    from distill.models.compile import compile_layers

    torch._dynamo.reset()
    counters.clear()
    _, model = _tiny_llama_pair()
    compile_layers(model, backend="eager")
    for graphs, shape in enumerate([(2, 8), (4, 8), (4, 16), (3, 24), (2, 8)], 1):
        with torch.no_grad():
            model(input_ids=torch.randint(0, model.config.vocab_size, shape), use_cache=False)
        assert counters["stats"]["unique_graphs"] == min(graphs, 4), shape  # the last shape is the first again
    torch._dynamo.reset()


def test_a_compiled_role_pads_its_batches_to_few_widths(assets, tmp_path):
    from transformers import AutoTokenizer

    from distill.data.loading import WIDTHS, build_text_data
    from distill.data.preference import build_preference_data
    from distill.trainers.dpo import DPOTrainer

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])

    def build_data(trainer_cls, recipe, compiled):  # what a trainer of one process builds, before its models
        if trainer_cls is DPOTrainer:
            return build_preference_data(recipe, tok, 0, 1, max_prompt_length=None, compiled=compiled)
        return build_text_data(recipe, tok, 0, 1, compiled=compiled)

    recipe = validate_recipe(_raw(data={"train": assets["train"], "max_length": 128}), DistillTrainer)
    widths = {}
    for compiled in (False, True):
        bundle = build_data(DistillTrainer, recipe, compiled)
        lengths = [len(ids) for ids in bundle.train["input_ids"]]
        widths[compiled] = {bundle.collator([{"input_ids": list(range(n))}])["input_ids"].shape[1] for n in lengths}
    assert widths[False] == {-(-n // 8) * 8 for n in lengths} and len(widths[False]) > len(widths[True])
    assert widths[True] <= set(range(16, 129, 16)) and len(widths[True]) > 1  # 128 / WIDTHS apart
    assert WIDTHS == 8
    # never past max_length, where it is no multiple of the step
    capped = validate_recipe(_raw(data={"train": assets["train"], "max_length": 20}), DistillTrainer)
    bundle = build_data(DistillTrainer, capped, compiled=False)
    assert bundle.collator([{"input_ids": list(range(19))}])["input_ids"].shape[1] == 20

    preference = tmp_path / "pairs.jsonl"
    preference.write_text("".join(json.dumps({"prompt": "a " * k, "chosen": "b " * (k + 3), "rejected": "c " * 2 * k}) + "\n"
                                  for k in range(1, 25)))
    dpo = validate_recipe({"trainer": "dpo", "output_dir": str(tmp_path / "dpo"), "data": {"train": str(preference), "max_length": 128},
                           "policy": {"from_pretrained": assets["teacher"]}}, DPOTrainer)
    bundle = build_data(DPOTrainer, dpo, compiled=True)
    widths = {bundle.collator([row])["input_ids"].shape[1] for row in bundle.train}
    assert widths <= set(range(16, 129, 16)) and len(widths) > 1


def test_compile_by_default_is_on_gpus_where_the_weights_are_whole(monkeypatch):
    from distill.config.recipe import deep_merge
    from distill.plan.planner import format_plan, plan_roles

    assert validate_recipe(_raw(), DistillTrainer).student.compile is None  # the default: decided by the plan

    monkeypatch.setenv("DISTILL_GPU_MEMORY_GB", "80")  # the planner sizes the GPU it pretends to have

    def plans(cuda, **sections):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return plan_roles(validate_recipe(deep_merge(_raw(), sections), DistillTrainer), DistillTrainer, world_size=1, vocab_size=None)

    assert not any(p.compile for p in plans(False).values())  # CPU
    gpu = plans(True, teacher={"placement": "replicated"})
    assert gpu["student"].compile and gpu["teacher"].compile
    assert "compiled" in format_plan(gpu, 1) and "yes" in format_plan(gpu, 1)
    sharded = plans(True, student={"deepspeed": "zero3"}, teacher={"placement": "sharded"})
    assert not sharded["student"].compile and not sharded["teacher"].compile
    assert not plans(True, student={"lora": {"r": 4}})["student"].compile
    assert plans(False, student={"compile": True})["student"].compile  # as set, on CPU too
    assert not plans(True, student={"compile": False})["student"].compile


def test_a_compiled_role_generates_uncompiled():
    """Each decoding step has another cache length: compiled, every one would be another static graph."""
    import contextlib
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from distill.models.compile import compile_layers
    from distill.runtime.roles import RoleModel

    plain, compiled = _tiny_llama_pair()
    torch._dynamo.reset()
    counters.clear()
    compile_layers(compiled, backend="eager")
    plan = SimpleNamespace(compile=True, zero_stage=0, spec=SimpleNamespace(trainable=False, gradient_checkpointing=False))
    manager = SimpleNamespace(use=lambda name: contextlib.nullcontext())
    role = RoleModel("teacher", plan, manager, SimpleNamespace(module=compiled), accelerator=None)
    prompt = torch.randint(0, plain.config.vocab_size, (2, 5))
    greedy = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    got = role.generate(prompt, torch.ones_like(prompt), gather=False, **greedy)
    assert counters["stats"]["unique_graphs"] == 0
    want = plain.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **greedy)[:, 5:]
    assert torch.equal(got, want)
    with torch.no_grad():
        compiled(input_ids=prompt, use_cache=False)  # and training-time forwards still compile
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_with_compiled_layers_a_call_that_needs_a_new_graph_runs_again_alone():
    """torch refuses a compiled call from one thread while the other traces a new graph (on 2 GPUs: "Detected
    that you are using FX to symbolically trace a dynamo-optimized function", at a batch without padding after
    a padded one of the same shape). A call that needs a graph must stop, and run again alone."""
    from distill.models.compile import compile_layers

    torch._dynamo.reset()
    plain_teacher, teacher = _tiny_llama_pair()
    plain_student, student = _tiny_llama_pair()
    for model in (teacher, student):
        compile_layers(model, backend="aot_eager")  # traces with FX, as inductor does
    said = []
    overlap = Overlap(torch.device("cpu"), enabled=True, compiled=True)
    padded = torch.ones(4, 16, dtype=torch.long)
    padded[0, 11:] = 0
    batches = {"padded": (padded, ["frozen", "trainable"]), "padded again": (padded, []),
               "unpadded": (torch.ones(4, 16, dtype=torch.long), ["frozen", "trainable"]),
               "wider": (torch.ones(4, 24, dtype=torch.long), ["frozen", "trainable"])}
    for name, (mask, recompiled) in batches.items():
        ids = torch.randint(0, plain_teacher.config.vocab_size, mask.shape)
        threads = []

        def forward(model):
            def call():
                threads.append(threading.current_thread().name)
                return model(input_ids=ids, attention_mask=mask).logits  # [4, T, V]
            return call

        teacher_logits, student_logits = overlap.run(forward(teacher), forward(student), on_compile=said.append)
        assert said == recompiled, name
        assert any(t.startswith("distill-frozen") for t in threads), name  # the first try ran side by side
        assert not teacher_logits.requires_grad and student_logits.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, plain_teacher(input_ids=ids, attention_mask=mask).logits)
            torch.testing.assert_close(student_logits, plain_student(input_ids=ids, attention_mask=mask).logits)
        student_logits.float().sum().backward()
        said.clear()
    overlap.close()
    torch._dynamo.reset()


def test_a_new_graph_is_said_naming_the_role_on_rank_0_only():
    from distill.runtime.overlap import compile_reporter

    said = []
    for rank in (0, 1):
        report = compile_reporter(said.append, rank, "teacher", "student")
        report("frozen")
        report("trainable")
    assert said == ["compile: the teacher's layers meet a new batch shape or mask (no grad); compiling its graph now, the roles in turn",
                    "compile: the student's layers meet a new batch shape or mask (training); compiling its graph now, the roles in turn"]


def test_a_failed_compile_says_how_to_train_without_it():
    """Compile is on by default on GPUs, so a machine without a working toolchain fails at the first step."""
    from distill.cli.train import compile_hint

    def broken_backend(graph, example_inputs):
        raise OSError("no C compiler")

    torch._dynamo.reset()
    with pytest.raises(Exception) as failed:
        torch.compile(lambda x: x * 2, backend=broken_backend)(torch.ones(2))
    assert "student.compile=false teacher.compile=false" in compile_hint(failed.value)
    assert compile_hint(ValueError("a data error")) is None
    torch._dynamo.reset()


def test_compile_is_refused_where_zero3_hooks_live():
    with pytest.raises(RecipeError, match="`compile` needs the weights whole"):
        validate_recipe(_raw(teacher={"compile": True, "placement": "sharded"}), DistillTrainer)
    with pytest.raises(RecipeError, match="`student.compile` cannot run under ZeRO-3.*student.deepspeed: zero2"):
        validate_recipe(_raw(student={"compile": True, "deepspeed": "zero3"}), DistillTrainer)
    # A frozen role left to the planner: refused once the plan shards it (on CPU the plan is `sharded`).
    from distill.plan.planner import plan_roles

    recipe = validate_recipe(_raw(teacher={"compile": True}), DistillTrainer)
    with pytest.raises(RecipeError, match="`teacher.compile` cannot run under ZeRO-3.*teacher.placement: replicated"):
        plan_roles(recipe, DistillTrainer, world_size=2, vocab_size=64)
    replicated = validate_recipe(_raw(teacher={"compile": True, "placement": "replicated"}), DistillTrainer)
    assert plan_roles(replicated, DistillTrainer, world_size=2, vocab_size=64)["teacher"].zero_stage == 0
