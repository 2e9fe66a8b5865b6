"""The recipe's schema: every section a pydantic model with `extra="forbid"`, so a misspelled key fails with the
key's full path and the nearest valid name. Role blocks (`student:`, `teacher:`, ...) sit at the top level; which
ones exist is decided by the trainer the recipe names, whose class declares its roles and defaults.
"""
from __future__ import annotations

import os
from typing import Any, Literal

import datasets
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from distill.config.presets import resolve_deepspeed, resolve_shipped

TRACKERS = ("tensorboard", "wandb")
"""Trackers `train.report_to` may name; each is an accelerate `LoggerType` of the same name."""


class Section(BaseModel):
    # protected_namespaces: `Role.model_class` is a recipe key, not pydantic's.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, protected_namespaces=())


class OptimizerSpec(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer: torch's AdamW or SGD, run by DeepSpeed on each rank's partition (see `fused`)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    fused: bool | None = None
    """torch's fused implementation: one kernel per step over the role's parameters instead of several
    multi-tensor passes. null: fused on GPU, the multi-tensor one on CPU."""


class SchedulerSpec(Section):
    name: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate shape after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup: step k (from 0) uses lr * (k + 1) / (warmup_steps + 1)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak (linear and cosine)."""


class LoRASpec(Section):
    """A LoRA adapter on a trainable role (needs `peft`): the base weights stay frozen, only the adapter trains."""

    r: int = Field(16, ge=1)
    """Rank of the update B @ A of each adapted layer."""
    alpha: float = Field(32.0, gt=0)
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Layers to adapt, by name suffix (e.g. [q_proj, v_proj]), or `all-linear`: every Linear but the output head."""

    @field_validator("target_modules")
    @classmethod
    def _some(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("name at least one module, e.g. [q_proj, v_proj], or use `all-linear`")
        return v


class Role(Section):
    """One model of the run and how DeepSpeed holds it. Trainer classes declare defaults with it."""

    trainable: bool = False
    """Whether the role gets gradients and an optimizer."""
    from_pretrained: str | None = None
    """A local directory (or hub name) loaded with `from_pretrained` of the `model_class`; `distill:assets/teacher`
    is the small teacher the package ships."""
    model_class: Literal["causal_lm", "sequence_classification", "token_classification"] = "causal_lm"
    """What the role's model is: a causal LM (`AutoModelForCausalLM`), a sequence classifier
    (`AutoModelForSequenceClassification`, e.g. a reward model with `num_labels: 1`), or a token classifier
    (`AutoModelForTokenClassification`, e.g. a critic with `num_labels: 1`: one value per token)."""
    config: dict[str, Any] | None = None
    """A transformers config (with `model_type`) for a randomly initialised model; `vocab_size`
    defaults to the tokenizer's length."""
    deepspeed: int | str | dict[str, Any] = 2
    """ZeRO stage shorthand (0-3), a config name in `configs/deepspeed/` (`zero2`, `zero3`,
    `zero3_offload`), a path to a DeepSpeed JSON file, or an inline DeepSpeed config."""
    offload: Literal["none", "cpu"] = "none"
    """Offload to CPU: parameters (ZeRO-3 only) and, for trainable roles, optimizer state."""
    placement: Literal["auto", "sharded", "replicated", "offload"] = "auto"
    """Frozen roles only: where the weights live. `replicated`: a whole copy on every GPU (ZeRO-0,
    the fastest forward); `sharded`: ZeRO-3 with whole decoder layers gathered at once; `offload`:
    ZeRO-3 with parameters in CPU memory. `auto` picks replicated when the weights fit in half the GPU
    memory left after the other roles, else sharded, else offload; it applies when the role's
    `deepspeed` stage is 3 (the default of frozen roles). Explicit values win over `deepspeed`'s stage."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """This role's weights and compute dtype. A trainable bf16 role keeps fp32 master weights in its
    optimizer; a frozen bf16 role is bf16 only."""
    optimizer: OptimizerSpec | None = None
    """Trainable roles only; defaults to AdamW."""
    scheduler: SchedulerSpec | None = None
    """Trainable roles only; defaults to cosine without warmup."""
    grad_clip: float | None = Field(None, ge=0)
    """Trainable roles only: clip this role's global gradient norm to this value; 0: no clipping; null:
    `train.grad_clip`. Each trainable role clips its own gradients, over its own parameters."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (trainable roles)."""
    compile: bool | None = None
    """torch.compile each decoder layer (one static graph per batch shape): fewer, fused kernels. null (the default):
    on GPUs where the role's weights are whole on each GPU (ZeRO 0-2, a replicated frozen role) and it has no LoRA
    adapter; off on CPU. What it gains, and the compile time it costs: docs/performance.md. Each new batch shape compiles once, so batches
    are padded to one of 8 widths up to `data.max_length`; generation runs uncompiled. `true` is refused with ZeRO-3
    (its per-module hooks gather weights inside the layers); `false` for plain layers."""
    weights_from: str | None = None
    """Load the same weights as this other role when neither `from_pretrained` nor `config` is given
    (a DPO reference starts as the policy)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory to run. Off unless you trust the source."""
    lora: LoRASpec | None = None
    """Train a LoRA adapter instead of the whole model (trainable roles); see docs/lora.md."""

    @field_validator("from_pretrained")
    @classmethod
    def _shipped(cls, v: str | None) -> str | None:
        return None if v is None else resolve_shipped(v)

    @model_validator(mode="after")
    def _check(self) -> "Role":
        if self.from_pretrained is not None and self.config is not None:
            raise ValueError("give either `from_pretrained` or `config`, not both")
        if self.trainable:
            self.optimizer = self.optimizer or OptimizerSpec()
            self.scheduler = self.scheduler or SchedulerSpec()
        elif self.optimizer is not None or self.scheduler is not None or self.grad_clip is not None:
            raise ValueError("a frozen role has no optimizer, scheduler or grad_clip: remove them, or set `trainable: true`")
        if self.lora is not None and not self.trainable:
            raise ValueError("`lora` adapts a role that trains; this role is frozen: remove `lora`, or set `trainable: true`")
        if self.trainable and self.placement != "auto":
            raise ValueError("`placement` chooses where a frozen role's weights live; a trainable role's follow from "
                             "`deepspeed` and `offload`: remove `placement`")
        if self.compile and self.placement in ("sharded", "offload"):
            raise ValueError(f"`compile` needs the weights whole on the GPU; `placement: {self.placement}` shards them: "
                             "use `placement: replicated`, or remove `compile`")
        if self.placement in ("replicated", "sharded") and self.offload == "cpu":
            raise ValueError(f"`placement: {self.placement}` keeps the weights on the GPUs, `offload: cpu` moves them to CPU: "
                             "use `placement: offload` (and remove `offload`), or remove `offload`")
        return self

    @property
    def zero_stage(self) -> int:
        return int(resolve_deepspeed(self.deepspeed)["zero_optimization"].get("stage", 0))


def dataset_label(ds: Any) -> str:
    """How a recipe written to disk (recipe.yaml, a checkpoint's) names a dataset given as an object: by its
    fingerprint, which `datasets` derives from the data, so a resumed run given the same data matches."""
    if isinstance(ds, datasets.DatasetDict):
        return "<datasets.DatasetDict " + ", ".join(f"{k}: {v._fingerprint}" for k, v in ds.items()) + ">"
    return f"<datasets.Dataset {ds._fingerprint}: {len(ds)} rows, columns {ds.column_names}>"


def role_grad_clip(role: Role, train: "TrainSpec") -> float | None:
    """The clipping norm a trainable role runs with: its own `grad_clip` (0: none), else `train.grad_clip`."""
    if role.grad_clip is not None:
        return role.grad_clip or None
    return train.grad_clip


class DataSpec(Section):
    model_config = ConfigDict(arbitrary_types_allowed=True)  # a `datasets.Dataset` given from Python

    train: str | datasets.Dataset | datasets.DatasetDict
    """Training data: a local .jsonl/.json/.parquet/.txt file, a directory of them, a directory written by
    `datasets`' `save_to_disk`, or a hub name. From Python (`distill.run`), also a `datasets.Dataset` (or a
    `DatasetDict`, read at `train_split`), with the columns a file would have."""
    eval: str | datasets.Dataset | datasets.DatasetDict | None = None
    """Evaluation data, same forms as `train`; a directory, saved DatasetDict or hub name gives its `eval_split`."""
    train_split: str = "train"
    """The split of `data.train` when it is a directory (files `<split>*.jsonl`, ...), a saved DatasetDict or a hub
    dataset; ignored for a single file."""
    eval_split: str | None = None
    """The split of `data.eval`, as `train_split`; null: the first of `eval`, `validation`, `test` that the source has
    (never its train split)."""
    dataset_config: str | None = None
    """The configuration (subset) of a hub dataset, `name=` of `datasets.load_dataset`, for `train` and `eval`."""
    revision: str | None = None
    """The revision (branch, tag or commit) of a hub dataset, for `train` and `eval`."""
    text_field: str = "text"
    """The column holding the text."""
    max_length: int = Field(128, ge=2)
    """Tokens per sequence; longer texts are truncated at the end and counted in the log."""
    append_eos: bool = True
    """End every text of text data with the tokenizer's eos token where the tokenizer does not add one itself
    (GPT-2-style BPE tokenizers add none), so a model learns where documents end. Prompt completions and
    preference responses always end with eos. false: texts as the tokenizer encodes them."""
    tokenizer: str | None = None
    """Tokenizer directory (or hub name); defaults to the first role loaded `from_pretrained` whose directory holds a
    tokenizer. Every `from_pretrained` directory that holds one must tokenize sample texts the same way."""
    synthetic_seed: int | None = None
    """Write the project's synthetic data (text, prompts or preference pairs, as the trainer needs) with this seed into
    the directory of `train`, as `train.jsonl`, `eval.jsonl` and `tokenizer/`, when that directory does not exist yet.
    Existing files are never written: a directory that holds the data is used as it is, and one that holds other
    files is refused."""
    @field_serializer("train", "eval", when_used="json")
    def _name_datasets(self, v: Any) -> Any:
        return v if v is None or isinstance(v, str) else dataset_label(v)

    packing: bool = False
    """Concatenate whole tokenized documents into rows of exactly `max_length` tokens (greedy, in dataset order;
    a document that does not fit starts the next row, none is split), with position_ids restarting at every
    document and attention kept within it, so the losses equal unpacked ones. Helps when most documents are much
    shorter than `max_length`: unpacked, their padding is computed and thrown away. Text data of the `distill`
    (offline) and `lm` trainers only; needs sdpa, eager or flex_attention."""


class TrainSpec(Section):
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per rank per forward."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; defaults to `epochs` passes over the data."""
    epochs: int = Field(1, ge=1)
    """Passes over the training data when `max_steps` is not set."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping. A trainable role's own `grad_clip`
    overrides it for that role."""
    log_every: int = Field(10, ge=1)
    """Steps between metric lines."""
    eval_every: int | None = Field(None, ge=1)
    """Steps between evaluations; evaluation also runs before the first and after the last step."""
    eval_batches: int | None = Field(None, ge=1)
    """Cap on evaluation batches per rank (null: the whole eval set)."""
    eval_samples: int = Field(3, ge=0)
    """Eval prompts (prompt records' prompts; for text, the start of an eval text) that the trainable role continues
    greedily at each evaluation: printed, written to samples.jsonl and shown by `distill.report`. 0: none."""
    eval_sample_tokens: int = Field(32, ge=1)
    """Most tokens generated per sample (fewer where `data.max_length` leaves less room)."""
    progress: bool = True
    """A progress bar on rank 0."""
    save_every: int | None = Field(None, ge=1)
    """Steps between checkpoints (checkpoints/step_N/); one is also written at the end and on SIGTERM/SIGINT."""
    max_bad_steps: int = Field(5, ge=1)
    """Stop the run after this many steps in a row with a NaN/Inf loss (each such step is skipped)."""
    overlap_frozen: bool | None = None
    """Run a frozen role's forward (teacher, reference) in a second thread on its own CUDA stream while
    the trainable role's forward runs, so each fills the other's idle GPU time. Only frozen roles that
    are replicated (no collectives in their forward) overlap; others run in turn. null: on with GPUs,
    unless a trainable role uses gradient checkpointing (the two do not combine)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    report_to: Literal["auto", "none", "tensorboard", "wandb"] | list[Literal["tensorboard", "wandb"]] = "auto"
    """Experiment trackers (through accelerate) that get every metric line of metrics.jsonl: `tensorboard`
    (events in <output_dir>/tensorboard/distill/), `wandb` (run files in <output_dir>/wandb/), a list of
    both, `none`, or `auto`: TensorBoard when the `tensorboard` package is installed, else none."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, v: Any) -> Any:
        choices = f"auto, none, {', '.join(TRACKERS)}, or a list of {' and '.join(TRACKERS)}"
        for name in v if isinstance(v, list) else [v]:
            if not isinstance(name, str) or name not in TRACKERS + (("auto", "none") if not isinstance(v, list) else ()):
                raise ValueError(f"unknown tracker {name!r}: choose {choices}")
        return v


class LaunchSpec(Section):
    num_processes: int = Field(1, ge=1)
    """Processes to start when the recipe is run with plain `python -m distill.train`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the processes compute. `cuda`: one GPU per process; a machine with fewer visible GPUs than processes
    is refused before any process starts. `cpu`: GPUs are hidden from the run's processes (gloo between them).
    `auto`: one GPU per process when this machine has enough, else the CPU (a CPU-size recipe runs unchanged on a
    laptop, a 1-GPU workstation or a node). The roles table says which was chosen and why."""
    compile_cache: str | None = "~/.cache/distill/compile"
    """Where torch keeps what compiling costs (inductor's FX graphs, AOTAutograd's, the Triton kernels), so a relaunch
    or `--resume` reuses what the first launch compiled; shared by every run (entries are keyed by their content).
    An exported TORCHINDUCTOR_CACHE_DIR wins; null leaves torch's default (under /tmp)."""
    timeout_s: int = Field(1800, ge=10)
    """Collective timeout: a rank that waits longer than this ends the job instead of hanging."""


class RecipeBase(Section):
    trainer: str
    """The algorithm: a registered trainer name (`distill`, `lm`, ...)."""
    output_dir: str
    """Run directory: metrics.jsonl, recipe.yaml, final/<role>/."""
    overwrite: bool = False
    """Start afresh in an output_dir that already holds a run: the earlier run's files (checkpoints, metrics,
    final weights, tracker logs) are deleted first; other files there are left alone."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    resume: bool | Literal["auto"] = False
    """Continue from the latest complete checkpoint in output_dir: true (one must exist), auto (if one exists).
    The checkpoint's recipe must equal this one in every key that changes the result (see `resume_allow`)."""
    resume_allow: list[str] = []
    """Keys that may differ from the checkpoint's recipe when resuming, deliberately: e.g. `[train.max_steps]` to
    train longer. A key names itself and everything under it (`student.optimizer`); `*` allows any change. Other
    differences that change the result are refused, by name."""
    data: DataSpec
    """Where the training and evaluation text comes from and how it is tokenised."""
    train: TrainSpec = TrainSpec()
    """Batch sizes, length of the run, logging, evaluation, checkpoints and trackers."""
    launch: LaunchSpec = LaunchSpec()
    """How many processes plain `python -m distill.train` starts, and the collective timeout."""

    @field_validator("output_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(v)


