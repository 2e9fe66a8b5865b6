"""Bad input ends with one message naming the key or file and the fix, before any process group or model,
in a run and in a dry run alike (`distill.train.main`, in this process: no launch happens)."""
import json
import os
import shutil

import pytest
import torch
import yaml

from distill.cli.train import main
from tests.helpers import tiny_recipe


def _recipe(tmp_path, assets, **sections):
    raw = tiny_recipe(assets, tmp_path / "run", **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _teacher_copy(assets, tmp_path, name="teacher"):
    return shutil.copytree(assets["teacher"], tmp_path / name)


def _corrupt_config(assets, tmp_path):
    t = _teacher_copy(assets, tmp_path)
    (t / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return [f"teacher.from_pretrained={t}"], f"{t / 'config.json'} is not valid JSON"


def _truncated_weights(assets, tmp_path):
    t = _teacher_copy(assets, tmp_path)
    weights = t / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    return [f"teacher.from_pretrained={t}"], f"weight file {weights} is truncated or corrupt"


def _small_vocab_teacher(assets, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t = tmp_path / "small_vocab"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=20)).save_pretrained(t)
    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(t)
    return [f"teacher.from_pretrained={t}"], f"`teacher.from_pretrained` ({t}/config.json) has vocab_size 20, but the tokenizer has"


def _small_vocab_student(assets, tmp_path):
    return ["student.config.vocab_size=20"], "`student.config` has vocab_size 20, but the tokenizer has"


def _bad_jsonl(assets, tmp_path):
    lines = open(assets["train"]).read().splitlines()
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines[:10] + ['{"text": "cut short'] + lines[10:]) + "\n")
    return [f"data.train={bad}"], f"{bad} line 11 is not valid JSON"


def _output_dir_is_a_file(assets, tmp_path):
    (tmp_path / "taken").write_text("x")
    return [f"output_dir={tmp_path / 'taken'}"], "is a file, not a directory"


def _output_dir_not_writable(assets, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses it too
        return ["output_dir=/sys/distill-test/run"], "cannot write to /sys/distill-test/run"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return [f"output_dir={locked / 'run'}"], "cannot write to"


def _zero_stage(assets, tmp_path):
    return ["student.deepspeed=5"], "`student.deepspeed`: ZeRO stage 5 does not exist"


CASES = {f.__name__[1:]: f for f in (_corrupt_config, _truncated_weights, _small_vocab_teacher, _small_vocab_student,
                                      _bad_jsonl, _output_dir_is_a_file, _output_dir_not_writable, _zero_stage)}


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_message_before_anything_loads(assets, tmp_path, capsys, case, dry):
    overrides, expected = CASES[case](assets, tmp_path)
    path, _ = _recipe(tmp_path, assets)
    code = main([str(path), *overrides, *(["--dry-run"] if dry else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and err.count("distill:") == 1, err
    assert "Traceback" not in err
    assert not torch.distributed.is_initialized()


def test_resume_from_a_checkpoint_of_another_model_shape_is_refused(assets, tmp_path, capsys):
    """The recipe is the same (the student comes from a directory whose model changed); the shapes differ."""
    from transformers import AutoConfig

    from distill.trainers import load_recipe

    student = _teacher_copy(assets, tmp_path, "student")
    path, raw = _recipe(tmp_path, assets, student={"config": None, "from_pretrained": str(student)})
    recipe, _ = load_recipe(path)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    (ckpt / "student").mkdir(parents=True)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2, "tokens_seen": 0}))
    (ckpt.parent / "latest").write_text(ckpt.name)
    narrow = AutoConfig.from_pretrained(student)
    narrow.hidden_size = 32
    narrow.save_pretrained(ckpt / "student")
    assert main([str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt} holds a `student` of another shape" in err and "model.embed_tokens.weight" in err, err


def test_a_tampered_checkpoint_file_is_not_unpickled(tmp_path):
    """DeepSpeed's own loads run with weights_only=True inside `safe_torch_load`: an object that would run
    code on unpickling is refused, naming the file; DeepSpeed's checkpoint records are allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from distill.config.errors import RecipeError
    from distill.loop.checkpoint import safe_torch_load

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": {"w": torch.ones(2)}, "payload": Payload()}, tmp_path / "evil.pt")
    torch.save({"loss_scaler": LossScaler(1.0), "w": torch.ones(2)}, tmp_path / "fine.pt")
    with safe_torch_load():
        assert torch.equal(torch.load(tmp_path / "fine.pt", weights_only=False)["w"], torch.ones(2))
        with pytest.raises(RecipeError, match="evil.pt holds objects other than tensors"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # as DeepSpeed asks
    assert not marker.exists()
