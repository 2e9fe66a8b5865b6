"""Sequence packing (`data.packing`): whole documents per row, isolated attention, unpacked losses."""
from __future__ import annotations

import json
import os
import random
import subprocess
from types import SimpleNamespace

import pytest
import torch
import yaml

from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.data.packing import PackedCollator, model_inputs, pack_documents
from distill.data.text import CausalCollator
from distill.loop.preflight import preflight
from distill.losses import cross_entropy, get_kd_loss
from distill.trainers.distill import DistillTrainer
from tests.helpers import TINY_LLAMA, python, tiny_recipe


def _docs(n: int, max_length: int, seed: int = 0, vocab: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    # Mostly short, some exactly max_length, some longer (truncated), a few of one token.
    lengths = [rng.choice([1, 2, rng.randint(3, 20), rng.randint(3, 40), max_length, max_length + 7]) for _ in range(n)]
    return [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]


def _segments(row: list[int], pos: list[int]) -> list[list[int]]:
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


# -- the packer ---------------------------------------------------------------------------------------
def test_pack_documents_keeps_every_document_whole_in_order():
    max_length = 32
    docs = _docs(200, max_length)
    rows, positions = pack_documents(docs, max_length)
    assert all(1 <= len(r) <= max_length for r in rows)
    assert [len(p) for p in positions] == [len(r) for r in rows]
    # Each row's segments, split where the positions restart, are the documents, whole and in order.
    segments = [s for r, p in zip(rows, positions) for s in _segments(r, p)]
    assert segments == [d[:max_length] for d in docs]
    for r, p in zip(rows, positions):
        for seg_pos in _segments(p, p):
            assert seg_pos == list(range(len(seg_pos)))
    # Greedy next-fit: a row was closed only because the next document did not fit in what was left.
    for (r, _), (_, p_next) in zip(zip(rows, positions), zip(rows[1:], positions[1:])):
        first_next = _segments(p_next, p_next)[0]
        assert len(r) + len(first_next) > max_length
    assert len(rows) < len(docs)


def test_packed_collator_labels_are_the_unpacked_ones_per_document():
    max_length, pad = 32, 0
    docs = [d for d in _docs(60, max_length, seed=1) if d]
    rows, positions = pack_documents(docs, max_length)
    batch = PackedCollator(pad, max_length)([{"input_ids": r, "position_ids": p} for r, p in zip(rows, positions)])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (len(rows), max_length) for k in batch}
    unpacked = CausalCollator(pad)
    n_valid = 0
    for b, (r, p) in enumerate(zip(rows, positions)):
        n = len(r)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (max_length - n)
        assert batch["input_ids"][b, n:].eq(pad).all() and batch["labels"][b, n:].eq(-100).all()
        # The padding tail is a segment of its own: its positions restart too.
        assert batch["position_ids"][b].tolist() == p + list(range(max_length - n))
        offset = 0
        for doc in _segments(r, p):
            ref = unpacked([{"input_ids": doc}])["labels"][0, : len(doc)]
            assert batch["labels"][b, offset:offset + len(doc)].tolist() == ref.tolist()
            assert batch["labels"][b, offset + len(doc) - 1] == -100  # a document's last token predicts nothing
            offset += len(doc)
            n_valid += len(doc) - 1
    # The trainer's normaliser and throughput count are what they would be unpacked.
    assert int((batch["labels"] != -100).sum()) == n_valid == sum(len(d[:max_length]) - 1 for d in docs)
    assert int(batch["attention_mask"].sum()) == sum(len(d[:max_length]) for d in docs)


# -- isolation: packed losses equal unpacked ones -----------------------------------------------------------
def _model(attn: str, vocab: int, seed: int, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(seed)
    # Larger initial weights than the default make the outputs depend on the context enough to tell mixed from
    # isolated attention apart in the loss.
    return LlamaForCausalLM(LlamaConfig(**{**cfg, "hidden_size": hidden}, vocab_size=vocab, initializer_range=0.3,
                                        attn_implementation=attn)).eval()


def _sums(student, teacher, batches, inputs=model_inputs):
    """Summed CE and forward KL over batches, their token count, and the student's final hidden states per row."""
    ce, kl = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for b in batches:
            s, t = student(**inputs(b)).logits, teacher(**inputs(b)).logits  # [B, T, V]
            one = torch.ones(())
            ce += cross_entropy(s, b["labels"], num_valid_tokens=one).double()
            kl += get_kd_loss("forward_kl")(s, t, b["labels"], num_valid_tokens=one).double()
            n += int((b["labels"] != -100).sum())
    return ce / n, kl / n, n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_token_weighted_unpacked_loss(attn):
    vocab, max_length = 50, 64
    docs = [d for d in _docs(40, max_length, seed=2, vocab=vocab) if len(d) > 1]
    student, teacher = _model(attn, vocab, seed=0), _model(attn, vocab, seed=1, hidden=48)
    rows, positions = pack_documents(docs, max_length)
    packed = PackedCollator(0, max_length)
    packed_batches = [packed([{"input_ids": r, "position_ids": p} for r, p in zip(rows[i:i + 4], positions[i:i + 4])])
                      for i in range(0, len(rows), 4)]
    unpacked = CausalCollator(0, max_length=max_length)
    one_per_row = [unpacked([{"input_ids": d} for d in docs[i:i + 4]]) for i in range(0, len(docs), 4)]
    ce_u, kl_u, n_u = _sums(student, teacher, one_per_row)
    ce_p, kl_p, n_p = _sums(student, teacher, packed_batches)
    assert n_p == n_u
    assert float(ce_p) == pytest.approx(float(ce_u), abs=1e-5)
    assert float(kl_p) == pytest.approx(float(kl_u), abs=1e-5)
    # The hidden states the chunked loss reads (the decoder asked for one position of logits) match too.
    with torch.no_grad():
        row = packed_batches[0]
        hidden = student.model(**model_inputs(row)).last_hidden_state[0]  # [T, H]
        offset = 0
        for doc in _segments(rows[0], positions[0]):
            alone = student.model(input_ids=torch.tensor([doc])).last_hidden_state[0]  # [n, H]
            torch.testing.assert_close(hidden[offset:offset + len(doc)], alone, atol=1e-5, rtol=1e-4)
            offset += len(doc)

    # Each piece of the call matters: without position_ids (one causal sequence per row), with the
    # padding mask as well, or with a KV cache, transformers lets documents attend to each other.
    wrong = {
        "no position_ids": lambda b: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
        "position_ids + attention_mask": lambda b: {**model_inputs(b), "attention_mask": b["attention_mask"]},
        "position_ids with a cache": lambda b: {**model_inputs(b), "use_cache": True},
    }
    for why, inputs in wrong.items():
        ce_w, _, _ = _sums(student, teacher, packed_batches, inputs)
        assert abs(float(ce_w) - float(ce_u)) > 1e-3, why


# -- refusals, before any model loads ---------------------------------------------------------------
@pytest.fixture
def raw(assets, tmp_path):
    return tiny_recipe(assets, tmp_path / "run", data={"packing": True}, launch={"num_processes": 1})


def test_packing_is_refused_where_it_cannot_hold(raw, assets, tmp_path):
    from distill.trainers.dpo import DPOTrainer
    from distill.trainers.lm import LMTrainer

    dpo = {"trainer": "dpo", "output_dir": str(tmp_path / "dpo"), "data": {"train": "x.jsonl", "packing": True},
           "policy": {"from_pretrained": assets["teacher"]}}
    with pytest.raises(RecipeError, match=r"`data.packing: true`.*`dpo` trainer.*set `data.packing: false`"):
        validate_recipe(dpo, DPOTrainer)
    with pytest.raises(RecipeError, match=r"`data.packing: true`.*`kd.on_policy`.*`data.packing: false`"):
        validate_recipe({**raw, "kd": {"on_policy": {"max_new_tokens": 8}}}, DistillTrainer)

    # Offline prompt/completion records: refused when the data is read, before the models are built.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "the cat", "completion": " sleeps ."}) + "\n" for _ in range(8)))
    recipe = validate_recipe({**raw, "data": {**raw["data"], "train": str(prompts), "eval": None}}, DistillTrainer)
    fake = SimpleNamespace(recipe=recipe, tokenizer=None, rank=0, world_size=1, log=print, compiled=False)
    with pytest.raises(RecipeError, match=r"`data.packing: true`.*prompt records.*`data.packing: false`"):
        DistillTrainer.build_data(fake)

    # Attention that cannot isolate packed documents, named with the key to change (no model is sized first).
    flash = {**raw, "student": {**raw["student"], "config": {**TINY_LLAMA, "attn_implementation": "flash_attention_2"}}}
    with pytest.raises(RecipeError, match=r"`student` uses flash_attention_2: set `student.config.attn_implementation: sdpa`"):
        preflight(validate_recipe(flash, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    lm = {"trainer": "lm", "output_dir": str(tmp_path / "lm"), "data": raw["data"], "model": {"config": TINY_LLAMA}}
    assert validate_recipe(lm, LMTrainer).data.packing  # the other trainer that packs
    eager = {**raw, "student": {**raw["student"], "config": {**TINY_LLAMA, "attn_implementation": "eager"}}}
    preflight(validate_recipe(eager, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)  # accepted


# -- a run ----------------------------------------------------------------------------------------------
_RUNS = """
import contextlib, sys
import distill
for path in sys.argv[1:]:
    with open(path[:-len(".yaml")] + ".log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        distill.run(path)
"""


def _train(where, runs: dict[str, dict]) -> dict[str, str]:
    """Each 1-process recipe trained in turn by `distill.run` in one fresh interpreter (one start and one import of
    the stack for all of them; `run` forgets the roles between runs); each run's own output, by name."""
    for name, raw in runs.items():
        (where / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(python("-c", _RUNS, *(str(where / f"{name}.yaml") for name in runs)),
                          capture_output=True, text=True, timeout=900, env=os.environ)
    logs = {name: (where / f"{name}.log").read_text() if (where / f"{name}.log").exists() else "" for name in runs}
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + "\n".join(v[-4000:] for v in logs.values())
    return logs


def test_packed_run_trains_and_evaluates_like_the_unpacked_one(assets, tmp_path):
    base = {"train": {"micro_batch_size": 4, "grad_accum": 1, "log_every": 1, "progress": False, "report_to": "none"},
            "launch": {"num_processes": 1}}
    unpacked = tiny_recipe(assets, tmp_path / "unpacked", **base)
    unpacked["train"]["max_steps"] = 1
    packed = tiny_recipe(assets, tmp_path / "packed", **base, data={"packing": True})
    packed["train"]["max_steps"] = 4
    # The chunked loss reads the models' hidden states (RoleModel.last_hidden): same isolation, same first step.
    chunked = tiny_recipe(assets, tmp_path / "chunked", **base, data={"packing": True}, kd={"chunked": True, "chunk_size": 48})
    chunked["train"]["max_steps"] = 1
    out = _train(tmp_path, {"unpacked": unpacked, "packed": packed, "chunked": chunked})["packed"]
    assert "data.train: packed 192 documents into" in out and "data.eval: packed 37 documents into" in out

    before_u = json.loads((tmp_path / "unpacked" / "summary.json").read_text())["before"]
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert set(summary["before"]) == set(before_u) >= {"ce", "teacher_ce", "kl_to_teacher", "kd"}
    for k, v in before_u.items():
        assert summary["before"][k] == pytest.approx(v, abs=1e-5), k
    metrics = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert all(m["grad_norm"] > 0 for m in metrics if "loss" in m)
    assert summary["after"]["ce"] < summary["before"]["ce"]
    chunked_lines = [json.loads(line) for line in (tmp_path / "chunked" / "metrics.jsonl").read_text().splitlines()]
    first, step1 = (next(m for m in lines if m.get("step") == 1 and "loss" in m) for lines in (chunked_lines, metrics))
    for k in ("loss", "ce", "kd"):
        assert first[k] == pytest.approx(step1[k], abs=1e-5), k
