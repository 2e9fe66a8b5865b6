"""Run on 2 processes: PPO's steps equal one process's plain-torch PPO on every rank's rollouts; resume; the quickstart.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.ppo_check ROOT OUT_JSON exact|quickstart

`exact`: an actor (ZeRO-2, clipped at its own norm) and a critic (ZeRO-2, unclipped, its own rate) train for 2 rollouts
of 2 PPO epochs x 2 minibatches against a reference (ZeRO-3, the actor's initial weights, for the k1 penalty) and a
sequence-classification reward model (ZeRO-3, loaded from a directory), 2 completions per prompt. Rank 0 then replays
the run in one process with whole plain-torch models: every rank's recorded rollouts scored again, the KL-shaped
rewards, GAE, the advantages whitened over both ranks' tokens, each minibatch the rows every rank picked, AdamW,
`clip_grad_norm_`. Writes each role's largest weight difference, the logged and the replayed losses, gradient norms
and rewards; and whether a run resumed from the checkpoint of step 4 (a rollout's end) ends with the same weights.

`quickstart`: recipes/ppo_quickstart.yaml, shortened (16 steps, the actor's rate doubled); writes the eval before and
after.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import distill
from distill.trainers.ppo import PPOTrainer

STEPS, EPOCHS, MINIBATCHES = 8, 2, 2
SETTINGS = {"actor": {"lr": 2e-3, "grad_clip": 0.5}, "critic": {"lr": 5e-3, "grad_clip": 0}}
PPO = {"num_generations": 2, "max_completion_length": 8, "ppo_epochs": EPOCHS, "num_minibatches": MINIBATCHES,
       "kl_coef": 0.1, "gamma": 0.9, "lam": 0.8, "clip_eps": 0.1, "value_clip": 0.05}


class Recording(PPOTrainer):
    """Keeps each rollout's sampled rows, as GRPO's rollout returns them."""

    def sample_rollout(self, prompts, seed):
        batch = super().sample_rollout(prompts, seed)
        self.__dict__.setdefault("rollouts", []).append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch


def recipe(data: Path, reward: Path, out: Path, **train) -> dict:
    from tests.helpers import TINY_LLAMA

    roles = {name: {"deepspeed": "zero2", "optimizer": {"lr": s["lr"]}, "grad_clip": s["grad_clip"],
                    "scheduler": {"name": "constant", "warmup_steps": 0}} for name, s in SETTINGS.items()}
    roles["actor"]["config"] = TINY_LLAMA
    return {"trainer": "tests.scripts.ppo_check:Recording", "output_dir": str(out), "overwrite": True, "seed": 0, **roles,
            "reference": {"deepspeed": "zero3"}, "reward": {"from_pretrained": str(reward), "deepspeed": "zero3"},
            "ppo": PPO, "data": {"train": str(data / "train.jsonl"), "tokenizer": str(data / "tokenizer"), "max_length": 32},
            "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": STEPS, "log_every": 1, "progress": False,
                      "report_to": "none", **train},
            "launch": {"num_processes": 2}}


def replay(initial: dict, configs: dict, reward_dir: Path, rollouts: list[list[dict]], pad: int, seed: int = 0) -> dict:
    """The whole run in one process, plain torch: per rollout, the experience of every rank's rows, then each step's
    minibatch (the rows each rank picks) through the same losses. Returns the weights, and per step the losses,
    gradient norms and the rollout's mean score."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from distill.losses.ppo import gae, masked_whiten, policy_loss, shaped_rewards, token_kl, value_loss
    from distill.trainers.grpo import completion_logps
    from distill.rl.batch import split_rows
    from distill.trainers.ppo import critic_values

    def built(cls, config, state):
        model = cls.from_config(config)
        model.load_state_dict(state)
        return model

    actor = built(AutoModelForCausalLM, configs["actor"], initial["actor"])
    critic = built(AutoModelForTokenClassification, configs["critic"], initial["critic"])
    reference = built(AutoModelForCausalLM, configs["actor"], initial["actor"]).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    opts = {n: torch.optim.AdamW(m.parameters(), lr=SETTINGS[n]["lr"], weight_decay=0.0) for n, m in (("actor", actor), ("critic", critic))}
    out = {"actor/loss": [], "critic/loss": [], "actor/grad_norm": [], "critic/grad_norm": [], "reward": []}
    for r, per_rank in enumerate(rollouts):
        first = r * EPOCHS * MINIBATCHES + 1
        exps = []
        with torch.no_grad():
            for b in per_rank:
                ids = b["input_ids"].masked_fill(b["attention_mask"] == 0, pad)
                scores = reward(input_ids=ids, attention_mask=b["attention_mask"]).logits[:, 0].float()
                mask = b["loss_mask"] * b["real"][:, None]
                old, ref = completion_logps(actor, b, 1.0), completion_logps(reference, b, 1.0)
                values = critic_values(critic, b)
                rewards = shaped_rewards(scores, token_kl(old, ref, mask, "k1"), mask, PPO["kl_coef"])
                adv, returns = gae(rewards, values, mask, PPO["gamma"], PPO["lam"])
                exps.append({**b, "loss_mask": mask, "old_logps": old, "old_values": values, "advantages": adv,
                             "returns": returns, "scores": scores})
        # Whitened over both ranks' tokens at once: the completions of the two ranks have their own widths.
        width = max(e["advantages"].shape[1] for e in exps)
        wide = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
        whole = masked_whiten(torch.cat([wide(e["advantages"]) for e in exps]), torch.cat([wide(e["loss_mask"]) for e in exps]))
        for e, w in zip(exps, whole.split([len(e["advantages"]) for e in exps])):
            e["advantages"] = w[:, :e["advantages"].shape[1]]
        all_scores = torch.cat([e["scores"] for e in exps])
        for k in range(EPOCHS * MINIBATCHES):
            epoch, part = divmod(k, MINIBATCHES)
            order = list(range(len(exps[0]["advantages"])))
            if epoch:  # each later pass shuffles the rows, seeded by the recipe's seed, the rollout's first step, the pass
                random.Random(hash((seed, first, epoch))).shuffle(order)
            size = len(order) // MINIBATCHES
            picked = torch.tensor(order[part * size:(part + 1) * size])
            minis = [{key: v[picked] for key, v in e.items() if torch.is_tensor(v) and v.dim() > 0} for e in exps]
            n = sum(m["loss_mask"].sum() for m in minis)
            for opt in opts.values():
                opt.zero_grad()
            losses = {"actor": 0.0, "critic": 0.0}
            for m in minis:
                for mb in split_rows(m, 2):  # the trainer's micro-batches
                    lp = completion_logps(actor, mb, 1.0)
                    pol = policy_loss(lp, mb["old_logps"], mb["advantages"], mb["loss_mask"], n, clip_eps=PPO["clip_eps"])
                    val = value_loss(critic_values(critic, mb), mb["old_values"], mb["returns"], mb["loss_mask"], n,
                                     clip=PPO["value_clip"])
                    losses["actor"] = losses["actor"] + pol.loss
                    losses["critic"] = losses["critic"] + val.loss
            for name, model in (("actor", actor), ("critic", critic)):
                losses[name].backward()
                clip = SETTINGS[name]["grad_clip"] or float("inf")
                out[f"{name}/grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
                out[f"{name}/loss"].append(float(losses[name]))
                opts[name].step()
            out["reward"].append(float(all_scores.mean()) if k == 0 else None)
    out["weights"] = {"actor": actor.state_dict(), "critic": critic.state_dict()}
    return out


def host_syncs(t) -> list[str]:
    """Where distill's code brings a tensor to Python (item, tolist, float, int, bool) during one more step of a trained
    `t` that is not a rollout's first: it trains on the last rollout's rows. Collective."""
    conversions = ("item", "tolist", "__float__", "__int__", "__bool__")
    ours, seen = str(Path(distill.__file__).parent), []
    originals = {name: getattr(torch.Tensor, name) for name in conversions}

    def counted(name):
        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                seen.append(f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return originals[name](self, *a, **k)
        return wrapper

    for name in conversions:
        setattr(torch.Tensor, name, counted(name))
    try:
        t.train_step(STEPS + 2, next(t.data.train_batches(start_step=STEPS)))
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return seen


def _weights(run: Path, role: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / role / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "actor/loss" in line]


def exact(root: Path, out_json: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from distill.data.loading import pad_id
    from distill.data.reward_task import write_reward_task
    from distill.config.recipe import validate_recipe
    from distill.runtime.roles import forget_roles
    from tests.helpers import TINY_LLAMA

    data, reward_dir = root / "ppo_data", root / "ppo_reward"
    whole, resumed = out_json.parent / "whole", out_json.parent / "resumed"
    ready = root / "ppo_ready"
    if os.environ.get("RANK", "0") == "0":  # before any trainer: no process group yet
        write_reward_task(data, seed=0, n_train=400, n_eval=8)
        tok = AutoTokenizer.from_pretrained(data / "tokenizer")
        if not (reward_dir / "config.json").exists():
            torch.manual_seed(7)
            config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, vocab_size=len(tok),
                                 num_labels=1, pad_token_id=pad_id(tok))
            LlamaForSequenceClassification(config).save_pretrained(reward_dir)
        ready.touch()
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    t = Recording(validate_recipe(recipe(data, reward_dir, whole, save_every=4), Recording), log=lambda s: None)
    initial = {n: t.models[n].state_dict() for n in SETTINGS}  # gathered on rank 0 (collective)
    configs = {n: t.plans[n].model_config for n in SETTINGS}
    pad = pad_id(t.tokenizer)
    t.train()
    everyone = [None] * t.world_size
    dist.all_gather_object(everyone, t.rollouts)
    dist.barrier()
    forget_roles()

    if dist.get_rank() == 0:
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(whole / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
        (resumed / "checkpoints" / "latest").write_text("step_00000004")
    dist.barrier()
    again = Recording(validate_recipe({**recipe(data, reward_dir, resumed, save_every=4), "resume": True, "overwrite": False},
                                      Recording), log=lambda s: None)
    again.train()
    syncs = host_syncs(again)
    everyone_syncs = [None] * again.world_size
    dist.all_gather_object(everyone_syncs, syncs)

    if dist.get_rank() == 0:
        unset_hf_deepspeed_config()  # the replay is plain torch, whole
        rollouts = [[per_rank[r] for per_rank in everyone] for r in range(len(everyone[0]))]
        ref = replay(initial, configs, reward_dir, rollouts, pad)
        metrics = _metrics(whole)
        out = {"steps": [m["step"] for m in metrics], "resumed_steps": [m["step"] for m in _metrics(resumed)],
               "rollouts": len(rollouts), "roles": {}}
        for name in SETTINGS:
            got, back, want = _weights(whole, name), _weights(resumed, name), ref["weights"][name]
            out["roles"][name] = {
                "max_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
                "moved": max(float((got[k] - initial[name][k]).abs().max()) for k in want),
                "resumed_equal": got.keys() == back.keys() and all(torch.equal(got[k], back[k]) for k in got)}
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "reward"):
            out[key] = {"logged": [m.get(key) for m in metrics], "replayed": ref[key]}
        out["clip_frac"] = [m["policy/clip_frac"] for m in metrics]
        out["value_clip_frac"] = [m["value/clip_frac"] for m in metrics]
        out["kl"] = [m.get("kl") for m in metrics]
        out["host_syncs"] = everyone_syncs
        out_json.write_text(json.dumps(out))


def quickstart(root: Path, out_json: Path) -> None:
    from tests.helpers import REPO

    run = out_json.parent / "run"
    t = PPOTrainer.from_recipe(str(REPO / "recipes" / "ppo_quickstart.yaml"), f"output_dir={run}",
                               f"data.train={root / 'ppo_quick' / 'train.jsonl'}", f"data.eval={root / 'ppo_quick' / 'eval.jsonl'}",
                               "train.max_steps=16", "actor.optimizer.lr=1e-3", "train.eval_batches=1", "train.progress=false", "train.report_to=none",
                               "train.eval_samples=0", log=lambda s: None)
    history = t.train()
    if dist.get_rank() == 0:
        out_json.write_text(json.dumps({"before": history["before"], "after": history["after"], "metrics": _metrics(run)}))


def main(argv: list[str] | None = None) -> None:
    from tests.helpers import end_of_script

    args = argv or sys.argv[1:]
    {"exact": exact, "quickstart": quickstart}[args[2]](Path(args[0]), Path(args[1]))
    end_of_script()


if __name__ == "__main__":
    main()
