"""Tokenizers kept exact: compared by behaviour in preflight, copied byte for byte into what a run writes and
exports; a LoRA export that peft loads by itself."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from distill.config.recipe import validate_recipe
from distill.config.errors import RecipeError
from distill.loop.preflight import preflight
from distill.models.tokenizer_files import TOKENIZER_FILES, auto_tokenizer_note, save_tokenizer, tokenizer_difference
from distill.trainers.distill import DistillTrainer
from tests.helpers import ENGLISH, bpe_tokenizer, check, python, tiny_model_dir


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A BPE tokenizer, a Llama teacher saved with it, a Qwen2 student saved without one (its data
    tokenizer is the teacher's), and English JSONL data."""
    root = tmp_path_factory.mktemp("pair")
    tok = bpe_tokenizer(root / "tokenizer")
    teacher = tiny_model_dir(root / "teacher", "llama", len(tok))
    tok.save_pretrained(teacher)
    tiny_model_dir(root / "student", "qwen2", len(tok), seed=1)
    for split, n in (("train", 16), ("eval", 4)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (ENGLISH * 2)[:n]))
    return root


def _files(d: Path) -> dict:
    return {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}


def _raw(pair, out, **sections):
    from distill.config.recipe import deep_merge

    return deep_merge({
        "trainer": "distill", "output_dir": str(out), "seed": 0,
        "student": {"from_pretrained": str(pair / "student"), "deepspeed": "zero2", "optimizer": {"lr": 1e-3}},
        "teacher": {"from_pretrained": str(pair / "teacher"), "deepspeed": "zero3"},
        "data": {"train": str(pair / "train.jsonl"), "eval": str(pair / "eval.jsonl"), "max_length": 32},
        "train": {"micro_batch_size": 4, "max_steps": 2, "log_every": 1, "progress": False, "report_to": "none",
                  "eval_samples": 2, "eval_sample_tokens": 6},
        "launch": {"num_processes": 1},
    }, sections)


def test_a_tokenizer_that_splits_text_differently_is_refused_though_its_vocabulary_is_the_same(pair, tmp_path):
    from transformers import AutoTokenizer

    qwen_dir = tmp_path / "student_with_tok"
    tiny_model_dir(qwen_dir, "qwen2", len(AutoTokenizer.from_pretrained(pair / "tokenizer")))
    AutoTokenizer.from_pretrained(pair / "tokenizer").save_pretrained(qwen_dir)  # loads back as Qwen2Tokenizer
    ours, theirs = AutoTokenizer.from_pretrained(pair / "teacher"), AutoTokenizer.from_pretrained(qwen_dir)
    assert ours.get_vocab() == theirs.get_vocab()  # what the check compared before
    assert "sample texts tokenize differently" in tokenizer_difference(ours, theirs)
    raw = _raw(pair, tmp_path / "run", student={"from_pretrained": str(qwen_dir)}, data={"tokenizer": str(pair / "teacher")})
    with pytest.raises(RecipeError, match=r"student.from_pretrained.*Qwen2Tokenizer.*differs.*12345.*share one tokenizer"):
        preflight(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    # Without a tokenizer in the student's directory the data tokenizer defaults to the teacher's: accepted.
    tok, _ = preflight(validate_recipe(_raw(pair, tmp_path / "run"), DistillTrainer), DistillTrainer, world_size=1,
                       dry_run=True)
    assert tok.name_or_path == str(pair / "teacher") and tokenizer_difference(tok, ours) is None


def test_saved_tokenizer_files_are_the_sources_byte_for_byte(pair, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(pair / "teacher")
    out = tmp_path / "student_out"
    tiny_model_dir(out, "qwen2", len(tok))  # a directory whose model type makes AutoTokenizer pick Qwen2Tokenizer
    save_tokenizer(tok, out)
    assert _files(out) == _files(pair / "teacher") and "tokenizer.json" in _files(out)
    assert tokenizer_difference(tok, PreTrainedTokenizerFast.from_pretrained(out)) is None
    note = auto_tokenizer_note(out, tok)
    assert note and "Qwen2Tokenizer" in note and "PreTrainedTokenizerFast.from_pretrained" in note
    assert auto_tokenizer_note(pair / "teacher", tok) is None
    # What the re-save through AutoTokenizer that export did writes: another pre-tokenizer.
    resaved = tmp_path / "resaved"
    AutoTokenizer.from_pretrained(out).save_pretrained(resaved)
    assert tokenizer_difference(tok, PreTrainedTokenizerFast.from_pretrained(resaved)) is not None


def test_lora_save_of_a_role_built_from_a_config_writes_the_base_that_peft_loads(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.config.schema import LoRASpec
    from distill.models.lora import apply_lora, save_lora

    config = AutoConfig.for_model("qwen2", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    spec = LoRASpec(r=4)
    model = apply_lora(AutoModelForCausalLM.from_config(config), spec, "student")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: B is no longer 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_lora(tmp_path / "out", spec, config, state, None)
    ids = torch.randint(0, 50, (2, 7))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.multiprocess
def test_a_lora_run_on_own_models_exports_an_exact_tokenizer_and_a_loadable_adapter(pair, tmp_path):
    import os

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from distill.cli.export import export_checkpoint
    from distill.loop.checkpoint import latest_checkpoint

    # The student named relative to the run's working directory: the adapter must name it absolutely.
    raw = _raw(pair, "run", student={"from_pretrained": os.path.relpath(pair / "student", tmp_path), "lora": {"r": 4}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(python("-m", "distill.train", "r.yaml"), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    check(proc)
    run = tmp_path / "run"
    assert "samples at step 0 (greedy):" in proc.stdout and "samples at step 2 (greedy):" in proc.stdout
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["index"]) for s in samples] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/ce" in m] == [0, 2]  # the eval before training is a point too
    assert "note: " in proc.stdout and "Qwen2Tokenizer" in proc.stdout  # said where AutoTokenizer would differ

    out = tmp_path / "export"
    notes = []
    assert export_checkpoint(latest_checkpoint(run), out, log=notes.append) == ["student"]
    assert notes and "Qwen2Tokenizer" in notes[0]
    for d in (out / "student", run / "final" / "student"):
        assert _files(d) == _files(pair / "teacher"), d
        adapter = json.loads((d / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str((pair / "student").resolve())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "student").eval()(input_ids=ids).logits
        for d in (out / "student", run / "final" / "student"):
            with_adapter = AutoPeftModelForCausalLM.from_pretrained(d / "adapter").eval()(input_ids=ids).logits
            torch.testing.assert_close(with_adapter, merged, rtol=1e-4, atol=1e-5)
