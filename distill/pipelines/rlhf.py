"""`python -m distill.pipelines.rlhf PIPELINE.yaml [key.sub=value ...] [--dry-run]`: RLHF where the truth is known.

The stages, each one's output the next one's input through directories under `output_dir`:

1. `sft`: the SFT model: a directory (`sft.from_pretrained`; the shipped teacher is what the LM trainer on the
   synthetic language writes), or an LM recipe run here (`sft.recipe`; its `final/model/`);
2. `pairs`: prompts of the synthetic language (`prompts/`), completions sampled from the SFT model, labelled by the
   ground truth with label noise (`pairs/`, distill/pipelines/rlhf_pairs.py);
3. `reward`: a reward model trained on the pairs (`trainer: reward`; `reward/final/reward/`);
4. `rl`: each RL recipe of `rl:` (GRPO, RLOO, ...) from the SFT model against the learned reward model, the truth
   logged beside it (`<name>/metrics.jsonl`);
5. the report (`report/`, distill/pipelines/rlhf_report.py): learned reward against the truth on held-out prompts.

A stage whose inputs (its recipe file, overrides and settings, and every stage before it) are those of its last
finished run is skipped; a changed stage runs again, and every stage after it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml
from pydantic import Field, ValidationError

from distill.data.reward_task import write_reward_task
from distill.config.errors import RecipeError
from distill.pipelines.rlhf_pairs import write_pairs
from distill.pipelines.rlhf_report import write_pipeline_report
from distill.config.presets import resolve_shipped
from distill.config.recipe import describe_error, read_recipe
from distill.config.schema import Section
from distill.rl.rewards import load_reward_function
from distill.trainers import load_recipe

STAGES = ("sft", "pairs", "reward", "rl", "report")
"""The pipeline's stages, in order; `rl` runs every entry of the `rl:` mapping."""

RL_WIRING: dict[str, Callable[[str, str], list[str]]] = {
    "grpo": lambda sft, reward: [f"policy.from_pretrained={sft}", f"reward.from_pretrained={reward}"],
    # The critic starts from the reward model: its body already reads the completions the scores depend on.
    "ppo": lambda sft, reward: [f"actor.from_pretrained={sft}", f"critic.from_pretrained={reward}",
                                f"reward.from_pretrained={reward}"],
}
"""How each RL trainer takes the SFT model and the learned reward model: overrides of its recipe, by trainer name."""


class SFTStage(Section):
    from_pretrained: str | None = "distill:assets/teacher"
    """The SFT model, a causal LM directory holding its tokenizer. The shipped teacher is what `recipes/teacher_pretrain.yaml`
    (the LM trainer on the synthetic language) writes. Unused when `recipe` is set."""
    recipe: str | None = None
    """An LM recipe (`trainer: lm`) run as this stage; its `final/model/` is the SFT model."""
    overrides: list[str] = []
    """Dotted overrides of `recipe`, as on the command line."""


class PairsSpec(Section):
    truth: str = "distill.data.ground_truth:ground_truth"
    """The ground truth, a reward function (`module:function`) that labels the pairs and is logged in the RL stages."""
    prompts_seed: int = 0
    """Seed of the synthetic prompts (`distill.data.reward_task`); their eval split is the RL stages' held-out prompts."""
    n_train: int = Field(1000, ge=1)
    """Train prompts sampled for pairs (a prompt whose completions tie by the truth gives none)."""
    n_eval: int = Field(200, ge=1)
    """Held-out prompts sampled for the reward model's eval pairs (never flipped)."""
    completions_per_prompt: int = Field(4, ge=2)
    """Completions sampled per prompt; the best and the worst by the truth make its pair."""
    max_completion_length: int = Field(24, ge=1)
    """Longest completion sampled, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    label_noise: float = Field(0.0, ge=0, le=1)
    """Probability that a train pair's chosen and rejected are swapped (annotator error); 0.5 makes labels random."""
    batch_size: int = Field(128, ge=1)
    """Prompts sampled together."""
    seed: int = 0
    """Seed of the sampling and of the label noise."""


class TrainStage(Section):
    recipe: str
    """A training recipe (a file, or `distill:recipes/...`); the pipeline sets its model paths, data and output_dir."""
    overrides: list[str] = []
    """Dotted overrides of the recipe, as on the command line."""


class PipelineRecipe(Section):
    pipeline: str = "rlhf"
    """The pipeline this file describes."""
    output_dir: str
    """Directory of every stage's output: prompts/, pairs/, reward/, one run per `rl` entry, report/."""
    sft: SFTStage = SFTStage()
    """Where the SFT model comes from."""
    pairs: PairsSpec = PairsSpec()
    """How preference pairs are sampled and labelled."""
    reward_model: TrainStage
    """The reward model's recipe (`trainer: reward`)."""
    rl: dict[str, TrainStage]
    """RL runs by name (`grpo`, `rloo`, ...), each a recipe of a trainer in `RL_WIRING`, run in order."""
    rl_overrides: list[str] = []
    """Overrides applied to every `rl` run (after its own), e.g. train.max_steps=10."""
    logged: list[str] = ["distill.data.ground_truth:grammatical"]
    """More reward functions (`module:function`) the RL runs log beside the truth with weight 0, and the report
    tabulates: what explains a gap between the learned reward and the truth."""


def load_pipeline(path: str, overrides: list[str] | None = None) -> PipelineRecipe:
    """The pipeline file with dotted overrides, validated; every stage's recipe is checked as the stage will run it
    (RecipeError naming the stage and key), before any model loads."""
    raw = read_recipe(resolve_shipped(path), overrides)
    try:
        spec = PipelineRecipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError("invalid pipeline:\n  - " + "\n  - ".join(describe_error(err, PipelineRecipe, raw) for err in e.errors())) from None
    if spec.pipeline != "rlhf":
        raise RecipeError(f"`pipeline: {spec.pipeline}`: this command runs `pipeline: rlhf`")
    load_reward_function(spec.pairs.truth, key="pairs.truth")
    for f in spec.logged:
        load_reward_function(f, key="logged")
    if not spec.rl:
        raise RecipeError("`rl` is empty: name at least one RL run, e.g. `rl: {grpo: {recipe: distill:recipes/rlhf/grpo.yaml}}`")
    for name, args in stage_commands(spec).items():
        _check(name, args)
    return spec


def sft_model(spec: PipelineRecipe) -> str:
    """The SFT model's directory: the SFT stage's `final/model/` when it trains one, else `sft.from_pretrained`."""
    out = Path(spec.output_dir)
    return str(out / "sft" / "final" / "model") if spec.sft.recipe else resolve_shipped(spec.sft.from_pretrained or "")


def stage_commands(spec: PipelineRecipe) -> dict[str, list[str]]:
    """`python -m distill.train` arguments of each training stage, by name: the recipe, its overrides, then the
    pipeline's wiring (model paths, data, output_dir)."""
    out, p = Path(spec.output_dir), spec.pairs
    prompts, pairs, sft = out / "prompts", out / "pairs", sft_model(spec)
    cmds = {}
    if spec.sft.recipe:
        cmds["sft"] = [resolve_shipped(spec.sft.recipe), *spec.sft.overrides, f"output_dir={out / 'sft'}", "overwrite=true"]
    cmds["reward"] = [resolve_shipped(spec.reward_model.recipe), *spec.reward_model.overrides, f"reward.from_pretrained={sft}",
                      f"data.train={pairs / 'train.jsonl'}", f"data.eval={pairs / 'eval.jsonl'}", "data.synthetic_seed=null",
                      f"output_dir={out / 'reward'}", "overwrite=true"]
    for name, stage in spec.rl.items():
        recipe = resolve_shipped(stage.recipe)
        raw = read_recipe(recipe, [*stage.overrides, *spec.rl_overrides])
        trainer = raw.get("trainer")
        if trainer not in RL_WIRING:
            raise RecipeError(f"`rl.{name}.recipe`: {stage.recipe} is `trainer: {trainer}`; the pipeline's RL stages run "
                              f"{', '.join(RL_WIRING)} (RLOO is `grpo.advantage: rloo`)")
        cmds[name] = [recipe, *stage.overrides, *spec.rl_overrides, *RL_WIRING[trainer](sft, str(out / "reward" / "final" / "reward")),
                      f"data.train={prompts / 'train.jsonl'}", f"data.eval={prompts / 'eval.jsonl'}", "data.synthetic_seed=null",
                      *_logged(trainer, raw.get(trainer) or {}, [p.truth, *spec.logged]), f"output_dir={out / name}", "overwrite=true"]
    return cmds


def _logged(section: str, g: dict, extra: list[str]) -> list[str]:
    """Overrides that add the truth and the other `extra` functions to an RL recipe's reward functions (its `section`,
    the trainer's name) with weight 0: logged (`rewards/<name>`, in training and on the held-out prompts), never
    trained on."""
    funcs = list(g.get("reward_funcs") or [])
    weights = list(g.get("reward_weights") or [1.0] * len(funcs))
    return [f"{section}.reward_funcs={json.dumps(funcs + extra)}",
            f"{section}.reward_weights={json.dumps(weights + [0.0] * len(extra))}"]


def _check(name: str, args: list[str]) -> None:
    try:
        load_recipe(args[0], args[1:])
    except RecipeError as e:
        raise RecipeError(f"stage `{name}` ({args[0]}): {e}") from None


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Runs the stages of `spec` in order, skipping those whose inputs match their last finished run."""

    def __init__(self, spec: PipelineRecipe, *, log: Callable[[str], None] = print):
        self.spec, self.log, self.out = spec, log, Path(spec.output_dir)
        self.done_file = self.out / "stages.json"

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "pipeline.yaml").write_text(yaml.safe_dump(self.spec.model_dump(), sort_keys=False))
        done = json.loads(self.done_file.read_text()) if self.done_file.is_file() else {}
        cmds, spec = stage_commands(self.spec), self.spec
        upstream = _fingerprint(spec.sft.model_dump())
        if "sft" in cmds:
            upstream = self._stage("sft", done, upstream, self.out / "sft" / "summary.json", lambda: self._train("sft", cmds["sft"]),
                                   _recipe_text(cmds["sft"][0]), cmds["sft"])
        upstream = self._stage("pairs", done, upstream, self.out / "pairs" / "meta.json", self._pairs, spec.pairs.model_dump())
        upstream = self._stage("reward", done, upstream, self.out / "reward" / "summary.json",
                               lambda: self._train("reward", cmds["reward"]), _recipe_text(cmds["reward"][0]), cmds["reward"])
        for name in spec.rl:
            self._stage(name, done, upstream, self.out / name / "summary.json", lambda n=name: self._train(n, cmds[n]),
                        _recipe_text(cmds[name][0]), cmds[name])
        table = write_pipeline_report(self.out, list(spec.rl), logged=[f.rpartition(":")[2] for f in spec.logged])
        self.log(table)
        self.log(f"pipeline: report in {self.out / 'report'} (summary.md, rewards.png, policy.png)")
        return {"table": table}

    def _stage(self, name: str, done: dict, upstream: str, marker: Path, run: Callable[[], None], *inputs) -> str:
        key = _fingerprint(upstream, *inputs)
        if done.get(name) == key and marker.is_file():
            self.log(f"pipeline: stage `{name}` is done ({marker.parent}); skipped")
            return key
        self.log(f"pipeline: stage `{name}`")
        run()
        done[name] = key
        self.done_file.write_text(json.dumps(done, indent=2) + "\n")
        return key

    def _train(self, name: str, args: list[str]) -> None:
        code = subprocess.run([sys.executable, "-m", "distill.train", *args]).returncode
        if code != 0:
            raise StageFailed(f"stage `{name}` failed (exit status {code}); its messages are above. Rerun the same command "
                              "to continue from this stage")

    def _pairs(self) -> None:
        p = self.spec.pairs
        prompts = self.out / "prompts"
        write_reward_task(prompts, seed=p.prompts_seed, n_train=max(p.n_train, 2000), n_eval=max(p.n_eval, 200))
        try:
            meta = write_pairs(self.out / "pairs", model_dir=sft_model(self.spec), prompts_dir=prompts,
                               truth=load_reward_function(p.truth, key="pairs.truth"), n_train=p.n_train, n_eval=p.n_eval,
                               completions_per_prompt=p.completions_per_prompt, max_completion_length=p.max_completion_length,
                               temperature=p.temperature, label_noise=p.label_noise, batch_size=p.batch_size, seed=p.seed)
        except ValueError as e:  # no pair at all: the sampling settings, not a bug
            raise StageFailed(f"stage `pairs`: {e}") from None
        t = meta["train"]
        self.log(f"pairs: {t['pairs']} train pairs from {t['prompts']} prompts ({t['ties_skipped']} tied), {t['flipped']:.1%} "
                 f"flipped; {meta['eval']['pairs']} eval pairs; the SFT model's mean truth {t['truth_mean']:.3f}")


class StageFailed(RuntimeError):
    """A training stage exited with an error; its own messages were printed."""


def _recipe_text(path: str) -> str:
    return Path(path).read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.pipelines.rlhf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="a pipeline file, e.g. recipes/rlhf/pipeline.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pairs.label_noise=0.3 output_dir=runs/rlhf_noisy")
    p.add_argument("--dry-run", action="store_true", help="validate the pipeline and every stage's recipe, print the "
                   "commands, run nothing")
    args = p.parse_intermixed_args(argv)
    try:
        spec = load_pipeline(args.pipeline, args.overrides)
        if args.dry_run:
            for name, cmd in stage_commands(spec).items():
                if name == "reward":
                    print(f"pairs: {spec.pairs.n_train} + {spec.pairs.n_eval} prompts x {spec.pairs.completions_per_prompt} "
                          f"completions from {sft_model(spec)}, label noise {spec.pairs.label_noise}")
                print(f"{name}: python -m distill.train {' '.join(cmd)}")
            return 0
        Pipeline(spec).run()
    except RecipeError as e:
        print(f"distill: pipeline: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"distill: pipeline: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
