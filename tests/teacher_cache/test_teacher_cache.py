"""Offline distillation from a teacher cache (distill/teacher_cache/): the records' encodings, a cache written and
read on 2 processes against the live teacher, the quickstart pair through the command line, and every cache that does
not fit a recipe refused by name before a model loads."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from distill.config.errors import RecipeError
from distill.teacher_cache.codec import LOG_RANGE, Codec, pack_bits, unpack_bits
from tests.helpers import REPO, bpe_tokenizer, launch_scenarios, python


def teacher_logp(n=64, v=1000, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g)).log_softmax(-1)


def dense(teacher, v):
    """The distribution a decoded record stands for: [N, V] probabilities (the tail not spread)."""
    return torch.zeros(teacher.ids.shape[0], v, dtype=torch.float64).scatter_add_(
        -1, teacher.ids, teacher.logp.double().exp())


# -- records ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 5, 6, 15, 17, 25])
def test_packed_fields_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (7, 13), generator=g)
    packed = pack_bits(values, bits)
    assert packed.shape == (7, math.ceil(13 * bits / 8))
    assert torch.equal(unpack_bits(packed, 13, bits), values)


def test_record_sizes_are_what_the_layout_says():
    v = 32000  # 15 bits an id
    assert Codec("topk", 128, 0, "fp32", "int32", v).record_bytes == 128 * 8 + 4  # k=128 stored plainly
    assert Codec("topk", 32, 0, "sqrt8", "packed", v).record_bytes == 60 + 32 + 2
    assert Codec("sampled", 0, 32, "bf16", "packed", v).record_bytes == 60  # no tail: it is everything
    assert Codec("sampled", 16, 24, "log8", "packed", v, label=True).record_bytes == 75 + 16 + 2 + 4


def test_whole_distributions_in_fp32_round_trip_exactly():
    logp = teacher_logp(v=53)
    labels = torch.randint(0, 53, (64,))
    c = Codec("topk", 53, 0, "fp32", "packed", 53, label=True)
    teacher, label = c.decode(c.encode(logp, labels))
    assert torch.equal(dense(teacher, 53), logp.double().exp())
    assert torch.isneginf(teacher.log_tail).all() and torch.equal(label, logp.gather(-1, labels[:, None]).squeeze(-1))
    assert torch.equal(teacher.ids[:, 0], logp.argmax(-1))  # most likely first


def test_one_record_decodes_whatever_its_fields_offsets():
    """3 packed 6-bit ids put the fp32 values at byte 3: a record read alone (a one-token row) still decodes."""
    logp = teacher_logp(n=1, v=53)
    c = Codec("topk", 3, 0, "fp32", "packed", 53, label=True)
    assert c.fields["values"] == (3, 12)
    teacher, label = c.decode(c.encode(logp, torch.tensor([4]))[0])
    assert teacher.logp.shape == (3,) and torch.equal(teacher.logp, logp[0].topk(3).values)
    assert label == logp[0, 4]


@pytest.mark.parametrize("values", ["bf16", "fp16", "log8", "log12", "sqrt8", "sqrt12"])
def test_stored_values_are_within_their_rounding(values):
    logp = teacher_logp()
    c = Codec("topk", 40, 0, values, "packed", 1000)
    teacher, _ = c.decode(c.encode(logp))
    exact = logp.gather(-1, teacher.ids)
    top = logp.topk(40, -1)
    assert torch.equal(teacher.ids, top.indices)
    rest = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    assert torch.allclose(teacher.log_tail, rest, atol=2e-3, rtol=1e-3)  # fp16
    if values in ("bf16", "fp16"):
        rel = 2.0 ** -(8 if values == "bf16" else 11)
        assert ((teacher.logp - exact).abs() <= rel * exact.abs() + 1e-6).all()
    elif values.startswith("log"):
        step = LOG_RANGE / (2 ** int(values[3:]) - 1)
        assert ((teacher.logp - exact).abs() <= step / 2 + 1e-5).all()
    else:
        step = 1 / (2 ** int(values[4:]) - 1)
        kept = torch.isfinite(teacher.logp)
        got, want = (teacher.logp / 2).exp(), (exact / 2).exp()
        assert ((got - want).abs() <= step / 2 + 1e-6).all()
        assert (want[~kept] < step / 2 + 1e-6).all()  # only entries that round to 0 are dropped


@pytest.mark.parametrize("k", [0, 8])
def test_sampled_classes_are_unbiased_counts_of_a_systematic_sample(k):
    """The head is exact; each other token is drawn floor or ceil of n * p / tail times (systematic sampling), never
    a head token, one entry per token; over many offsets the estimate's mean is the distribution."""
    logp = teacher_logp(n=16, v=200, scale=1.5)
    n, draws = 32, 100
    c = Codec("sampled", k, n, "fp32", "packed", 200)
    probs = logp.double().exp()
    head = logp.topk(k, -1).indices if k else torch.zeros(16, 0, dtype=torch.long)
    rest = probs.scatter(-1, head, 0.0)
    expect = rest / rest.sum(-1, keepdim=True) * n  # [16, 200] expected draws of each token
    total = torch.zeros_like(probs)
    for seed in range(draws):
        teacher, _ = c.decode(c.encode(logp, generator=torch.Generator().manual_seed(seed)))
        p = dense(teacher, 200)
        assert torch.allclose(p.sum(-1), torch.ones(16, dtype=torch.float64), atol=1e-5)
        assert torch.equal(teacher.ids[:, :k], head)
        real = torch.isfinite(teacher.logp)
        hits = torch.zeros(16, 200).scatter_add_(-1, teacher.ids, real.float())
        assert hits.max() == 1  # distinct entries: repeats became counts
        drawn = torch.where(rest > 0, p / rest.sum(-1, keepdim=True) * n, torch.zeros_like(p))
        assert ((drawn > expect.floor() - 1e-4) & (drawn < expect.ceil() + 1e-4)).all()
        total += p
    # Each token's estimate moves by less than tail / n between offsets: the mean over 100 is within a few of that / 10.
    assert (total / draws - probs).abs().max() < 4 / n / math.sqrt(draws)


# -- 2 processes ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_runs(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.cache_check", assets["root"], tmp_path_factory.mktemp("cache"),
                            {"whole": ["whole"], "top_k": ["top_k"]}, timeout=900)


def _steps_agree(result, rel):
    cache, live = result["steps"]["cache"], result["steps"]["live"]
    assert [m["step"] for m in cache] == [m["step"] for m in live] == list(range(1, 7))
    for a, b in zip(cache, live):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel) and a["kd"] == pytest.approx(b["kd"], rel=rel)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel)


@pytest.mark.multiprocess
def test_a_cache_of_whole_distributions_trains_the_student_the_live_teacher_trains(cache_runs):
    """k = the vocabulary, fp32: on 2 processes the student from the cache equals the one trained beside the live
    ZeRO-3 teacher at float-rounding level (losses and gradient norms to 1e-6, weights to 3e-5 after 6 AdamW steps at
    lr 3e-3), not bit for bit: the cache sums each KL in another order. No teacher is built."""
    r = cache_runs["whole"]
    assert r["built"] == ["student"] and r["shards"] == {"train": 5, "eval": 1}
    _steps_agree(r, 1e-6)
    assert r["max_weight_diff"] < 3e-5
    for when in ("before", "after"):
        for key in ("ce", "teacher_ce", "kl_to_teacher", "kd"):
            assert r["history"]["cache"][when][key] == pytest.approx(r["history"]["live"][when][key], rel=1e-6), key


@pytest.mark.multiprocess
def test_a_top_k_cache_gives_the_live_top_k_loss_packed_chunked_and_resumed(cache_runs):
    """The teacher's top 12 in fp32 read with `kd.top_k: 8`, packed rows, the chunked loss (JSD): the same steps as
    `kd.top_k: 8` against the live teacher; stopped at step 3 and resumed, the run ends bit for bit where an
    uninterrupted one does."""
    r = cache_runs["top_k"]
    _steps_agree(r, 1e-6)
    assert r["max_weight_diff"] < 3e-5
    assert r["history"]["cache"]["after"]["kd"] == pytest.approx(r["history"]["live"]["after"]["kd"], rel=1e-6)
    assert r["bytes_per_token"] == 12 * 4 + 12 * 4 + 4
    assert r["resumed_steps"] == list(range(1, 7)) and r["resumed_equal"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["whole", "top_k"])
def test_a_killed_write_is_finished_by_writing_its_missing_shards_only(cache_runs, mode):
    r = cache_runs[mode]
    assert r["shards_same"] and r["untouched_shard_kept"]


# -- the quickstart pair, and refusals ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The two commands of recipes/teacher_cache_quickstart.yaml's header in a fresh directory, one process each,
    the writer in batches of 64, the student for 12 steps."""
    cwd = tmp_path_factory.mktemp("quickstart")
    one = ["launch.num_processes=1", "train.progress=false"]
    write = subprocess.run(python("-m", "distill.teacher_cache", str(REPO / "recipes/teacher_cache_quickstart.yaml"),
                            *one, "train.micro_batch_size=64"), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert write.returncode == 0, write.stdout[-3000:] + write.stderr[-5000:]
    train = subprocess.run(python("-m", "distill.train", str(REPO / "recipes/quickstart_from_cache.yaml"), *one,
                            "train.max_steps=12", "train.eval_batches=2", "train.eval_samples=0"), cwd=cwd,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-5000:]
    return {"cwd": cwd, "write": write, "train": train}


def test_the_quickstart_pair_writes_once_and_trains_without_a_teacher(quickstart):
    cwd = quickstart["cwd"]
    m = json.loads((cwd / "runs/teacher_cache/quickstart/manifest.json").read_text())
    assert m["complete"] and m["splits"]["train"]["bytes_per_token"] == 46 and m["cache"]["k"] == 16
    assert m["data"]["train"]["files"][0]["name"] == "train.jsonl" and len(m["data"]["train"]["files"][0]["sha256"]) == 64
    out = quickstart["train"].stdout
    assert "teacher cache: top 16 of 53 tokens" in out and "teacher  frozen" not in out
    summary = json.loads((cwd / "runs/quickstart_from_cache/summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["kl_to_teacher"] < 0.8 * before["kl_to_teacher"] and after["ce"] < before["ce"]
    assert after["teacher_ce"] == before["teacher_ce"] and 1.5 < after["teacher_ce"] < 2.5  # read from the cache


def _recipe(cwd, monkeypatch, *overrides, path="recipes/quickstart_from_cache.yaml"):
    from distill.trainers import load_recipe

    monkeypatch.chdir(cwd)
    return load_recipe(REPO / path, list(overrides))[0]


def _refused(recipe, student_vocab=53) -> str:
    from distill.teacher_cache.read import check_cache

    with pytest.raises(RecipeError) as e:
        check_cache(recipe, student_vocab)
    return str(e.value)


def _forged(quickstart, name, edit) -> str:
    """A copy of the quickstart cache's manifest and tokenizer with `edit(manifest)` applied."""
    src, dst = quickstart["cwd"] / "runs/teacher_cache/quickstart", quickstart["cwd"] / "runs" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    m = json.loads((src / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return str(dst)


@pytest.mark.parametrize("overrides,words", [
    (["kd.top_k=32"], ["`kd.top_k: 32`", "stores 16", "kd.cache.k: 32"]),
    (["kd.cache.k=32"], ["`kd.cache.k: 32`", "written with k: 16"]),
    (["kd.cache.values=sqrt8"], ["`kd.cache.values: sqrt8`", "values: fp16"]),
    (["data.max_length=64"], ["`data.max_length: 64`", "max_length: 128"]),
    (["data.packing=true"], ["`data.packing: True`", "packing: False"]),
    (["kd.cache.tail=bucket", "kd.temperature=2"], ["tail: bucket", "kd.temperature: 1"]),
    (["kd.loss=teacher_argmax"], ["kd.loss"]),
    (["kd.cache.dir=runs/nothing"], ["runs/nothing", "no manifest.json", "python -m distill.teacher_cache"]),
])
def test_a_cache_that_does_not_fit_the_recipe_is_refused_by_name(quickstart, monkeypatch, overrides, words):
    try:
        recipe = _recipe(quickstart["cwd"], monkeypatch, *overrides)
    except RecipeError as e:  # refused as the recipe loads already
        msg = str(e)
    else:
        msg = _refused(recipe)
    assert all(w in msg for w in words), msg


def test_a_smaller_top_k_and_the_tail_rule_are_what_a_recipe_may_choose(quickstart, monkeypatch):
    from distill.teacher_cache.read import check_cache

    for overrides in (["kd.top_k=8"], ["kd.cache.tail=bucket"], ["kd.cache.k=16", "kd.loss=tvd", "kd.temperature=2"]):
        check_cache(_recipe(quickstart["cwd"], monkeypatch, *overrides), 53)
    msg = _refused(_recipe(quickstart["cwd"], monkeypatch), student_vocab=50)
    assert "50 logits" in msg and "kd.cache.vocab_size: 50" in msg


def test_sampled_caches_serve_the_forward_kl_at_temperature_1_only(quickstart, monkeypatch):
    def sampled(m):
        m["cache"].update(format="sampled", k=4, samples=12)

    d = _forged(quickstart, "sampled", sampled)
    msg = _refused(_recipe(quickstart["cwd"], monkeypatch, f"kd.cache.dir={d}", "kd.loss=reverse_kl"))
    assert "sampled from the teacher" in msg and "kd.loss: reverse_kl" in msg
    assert "kd.temperature: 2" in _refused(_recipe(quickstart["cwd"], monkeypatch, f"kd.cache.dir={d}", "kd.temperature=2"))
    from distill.teacher_cache.read import check_cache

    check_cache(_recipe(quickstart["cwd"], monkeypatch, f"kd.cache.dir={d}", "kd.loss=reverse_kl", "kd.top_k=4"), 53)


def test_unfinished_caches_and_missing_splits_are_refused(quickstart, monkeypatch):
    d = _forged(quickstart, "unfinished", lambda m: m.update(complete=False))
    msg = _refused(_recipe(quickstart["cwd"], monkeypatch, f"kd.cache.dir={d}"))
    assert "unfinished (0 of 3 shards written)" in msg and "python -m distill.teacher_cache" in msg
    d = _forged(quickstart, "no_eval", lambda m: m["data"].update(eval=None))
    assert "holds no eval split" in _refused(_recipe(quickstart["cwd"], monkeypatch, f"kd.cache.dir={d}"))
    recipe = _recipe(quickstart["cwd"], monkeypatch, f"kd.cache.dir={d}", "data.eval=null")
    from distill.teacher_cache.read import check_cache

    check_cache(recipe, 53)


def test_other_data_files_and_another_teacher_are_refused(quickstart, monkeypatch, assets):
    cwd = quickstart["cwd"]
    other = cwd / "other_data"
    shutil.copytree(cwd / "data/synthetic", other, dirs_exist_ok=True)
    lines = (other / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    msg = _refused(_recipe(cwd, monkeypatch, f"data.train={other / 'train.jsonl'}"))
    assert "`data.train`" in msg and "train.jsonl" in msg and "bytes there" in msg
    msg = _refused(_recipe(cwd, monkeypatch, f"teacher.from_pretrained={assets['teacher']}"))
    assert "`teacher`" in msg and "remove the teacher block" in msg


def test_rows_of_other_content_or_another_tokenizer_are_refused_before_training(quickstart, monkeypatch, tmp_path):
    """Files of the same size whose content differs, and another tokenizer: found by the tokenized rows."""
    from transformers import AutoTokenizer

    from distill.teacher_cache.read import check_cache, check_rows
    from distill.trainers.distill import kd_data

    cwd = quickstart["cwd"]
    other = cwd / "same_size"
    shutil.copytree(cwd / "data/synthetic", other, dirs_exist_ok=True)
    text = (other / "train.jsonl").read_text()
    swapped = text.replace(" cat ", " dog ", 1)
    assert swapped != text and len(swapped) == len(text)
    (other / "train.jsonl").write_text(swapped)
    recipe = _recipe(cwd, monkeypatch, f"data.train={other / 'train.jsonl'}")
    manifest = check_cache(recipe, 53)  # same names and sizes
    tok = AutoTokenizer.from_pretrained(recipe.data.tokenizer)
    with pytest.raises(RecipeError, match=r"`data.train`: its 2000 tokenized rows .* content of train.jsonl differs"):
        check_rows(recipe, tok, kd_data(recipe, tok, 0, 1), manifest)
    recipe = _recipe(cwd, monkeypatch)
    check_rows(recipe, tok, kd_data(recipe, tok, 0, 1), manifest)  # the cache's own data passes
    bpe = bpe_tokenizer(tmp_path / "bpe")
    with pytest.raises(RecipeError, match="data tokenizer differs .* their vocabularies differ"):
        check_rows(recipe, bpe, kd_data(recipe, tok, 0, 1), manifest)


def test_each_row_read_is_checked_against_the_rows_hash(quickstart, monkeypatch):
    """The collator lays a row's records on its predicted positions, and refuses records stored for another row."""
    from transformers import AutoTokenizer

    from distill.teacher_cache.read import attach, check_cache
    from distill.trainers.distill import kd_data

    recipe = _recipe(quickstart["cwd"], monkeypatch)
    tok = AutoTokenizer.from_pretrained(recipe.data.tokenizer)
    data, reader = attach(recipe, kd_data(recipe, tok, 0, 1), tok, check_cache(recipe, 53))
    rows = [data.train[i] for i in (5, 6)]
    batch = data.collator(rows)
    valid = batch["labels"] != -100
    assert batch["teacher_records"].shape == (*valid.shape, 46)
    assert torch.equal(batch["teacher_records"][0][valid[0]], reader.row("train", 5)[0])
    assert not batch["teacher_records"][~valid].any()
    # Another row with as many predicted tokens: only its hash tells them apart.
    same = next(j for j in range(7, len(data.train)) if reader.row("train", j)[0].shape[0] == int(valid[1].sum()))
    rows[1] = {**rows[1], "_cache_train_row": same}
    with pytest.raises(RecipeError, match=f"row {same} of data.train is not the row the teacher cache .* holds"):
        data.collator(rows)


def test_on_policy_needs_the_live_teacher(quickstart, monkeypatch):
    with pytest.raises(RecipeError, match="needs the live teacher"):
        _recipe(quickstart["cwd"], monkeypatch, "kd.on_policy={lmbda: 1.0}")


def test_the_writer_refuses_to_replace_another_cache_and_verifies_shards(quickstart, monkeypatch, capsys):
    from distill.cli.teacher_cache import main
    from distill.trainers.cache_writer import load_writer_recipe, write_cache

    monkeypatch.chdir(quickstart["cwd"])
    one = ["launch.num_processes=1", "train.micro_batch_size=64"]
    done = write_cache(load_writer_recipe(REPO / "recipes/teacher_cache_quickstart.yaml", one), log=print)
    assert done["complete"] and "complete already" in capsys.readouterr().out  # written once: nothing loads
    recipe = load_writer_recipe(REPO / "recipes/teacher_cache_quickstart.yaml", ["kd.cache.k=8", *one])
    with pytest.raises(RecipeError, match=r"other settings or data \(cache.k: 16 -> 8\).*kd.cache.overwrite=true"):
        write_cache(recipe)  # judged before any model or process group
    assert main([str(REPO / "recipes/teacher_cache_quickstart.yaml"), "--dry-run", "launch.num_processes=1"]) == 0
    assert "teacher  frozen" in capsys.readouterr().out
    cache = quickstart["cwd"] / "runs/teacher_cache/quickstart"
    assert main(["--verify", str(cache)]) == 0
    copy = quickstart["cwd"] / "runs/corrupt"
    shutil.copytree(cache, copy, dirs_exist_ok=True)
    shard = copy / "train/shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["--verify", str(copy)]) == 1 and f"sha256 differs: {shard}" in capsys.readouterr().out


# -- the benchmarks -------------------------------------------------------------------------------------------------
def test_the_compression_benchmark_separates_bias_from_noise(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import teacher_cache_compression as bench

    res = bench.main(["--source", "zipf", "--positions", "48", "--vocab", "600", "--seeds", "2", "--out",
                      str(tmp_path / "c.json"), "--options", "top128_fp32_int32", "top32_sqrt8", "sampled32",
                      "top16_sqrt8+sampled32"])
    rows = {(r["option"], r["tail"]): r for r in res["sources"]["zipf"]["rows"]}
    assert rows[("top128_fp32_int32", "renormalize")]["bytes_per_token"] == 1028
    assert rows[("top32_sqrt8", "bucket")]["bytes_per_token"] == 32 * 10 // 8 + 32 + 2  # 10-bit ids at 600 tokens, 8-bit values, fp16 tail
    assert rows[("sampled32", "renormalize")]["grad_bias"] < 1e-5 < rows[("sampled32", "renormalize")]["grad_noise"]
    for option in ("top128_fp32_int32", "top32_sqrt8"):  # the tail as one class: less bias; a top-k has no noise
        assert rows[(option, "bucket")]["grad_bias"] < 0.5 * rows[(option, "renormalize")]["grad_bias"]
        assert rows[(option, "bucket")]["grad_noise"] == 0
    assert rows[("top128_fp32_int32", "renormalize")]["grad_bias"] > rows[("top32_sqrt8", "bucket")]["grad_bias"]
    assert "top32_sqrt8 (bucket)" in res["sources"]["zipf"]["verdict"]["no_more_bias_than_reference_renormalize"]
    assert json.loads((tmp_path / "c.json").read_text())["budget_bytes"] == 150


@pytest.mark.multiprocess
def test_the_throughput_benchmark_times_every_mode_on_cpu(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run(python(str(REPO / "benchmarks/teacher_cache_throughput.py"), "--pair", "tiny",
                           "--device", "cpu", "--warmup", "1", "--steps", "1", "--micro-batch", "2", "--options",
                           "top32_sqrt8", "--out", str(out)), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    modes = {(r["part"], r["mode"]): r for r in res["results"]}
    assert set(modes) == {("student", "live"), ("student", "cache:top32_sqrt8"), ("student", "hard"), ("write", "forward"),
                          ("write", "records:top32_sqrt8"), ("write", "records+disk:top32_sqrt8")}
    assert modes[("student", "live")]["built"] == ["student", "teacher"]
    assert modes[("student", "cache:top32_sqrt8")]["built"] == modes[("student", "hard")]["built"] == ["student"]
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in res["results"])
    assert set(res["summary"]) == {"cache:top32_sqrt8_over_live", "hard_over_live", "records:top32_sqrt8_over_forward",
                                   "records+disk:top32_sqrt8_over_forward"}
