"""Offline logit distillation: a trainable student learns from a frozen teacher's distributions."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from distill.config.errors import RecipeError
from distill.config.schema import RecipeBase, Role, Section
from distill.data.loading import DataBundle, build_text_data, source_options
from distill.data.packing import model_inputs
from distill.data.prompts import build_prompt_data, is_prompt_dataset, write_prompt_dataset
from distill.data.text import load_dataset_source
from distill.generation.completions import CompletionSampler, OnPolicySpec, completion_source, generation_plan
from distill.loop.monitor import before_after_table
from distill.loop.registry import register_trainer
from distill.loop.trainer import RoleTrainer
from distill.losses import chunked_sparse_kd_loss, cross_entropy, get_kd_loss, get_sparse_kd_loss
from distill.losses.chunked import chunked_kd_loss
from distill.losses.logps import logit_transform
from distill.teacher_cache import read as teacher_cache
from distill.teacher_cache.spec import CacheSpec


class KDSpec(Section):
    loss: str = "forward_kl"
    """The divergence, by registered name: forward_kl, reverse_kl, generalized_jsd, skew_forward_kl, skew_reverse_kl, tvd."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the cross-entropy on the labels: loss = alpha * CE + (1 - alpha) * KD. 1: no distillation (the
    teacher's training forward is skipped; evaluation still scores it); 0: distillation alone."""
    temperature: float = Field(1.0, gt=0)
    """Softens both distributions; the KD term is scaled by temperature**2."""
    top_k: int | None = Field(None, ge=1)
    """Keep only the teacher's top-k probabilities, renormalised."""
    params: dict[str, Any] = {}
    """Parameters of the chosen divergence, e.g. {beta: 0.5} for generalized_jsd, {alpha: 0.1} for the skew KLs;
    null or {} (on the command line: `kd.params=null`) for the loss's defaults."""
    chunked: bool = False
    """Compute the loss chunk by chunk over tokens from hidden states, never holding [tokens, vocab] logits."""
    chunk_size: int = Field(2048, ge=1)
    """Tokens per chunk of the chunked loss."""
    on_policy: OnPolicySpec | None = None
    """Train on completions generated during training (needs prompt data); null: offline on the data's text."""
    cache: CacheSpec | None = None
    """The teacher as distributions written to disk once (`python -m distill.teacher_cache RECIPE`): training reads
    them and loads no teacher model. null: the teacher runs beside the student."""

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        get_kd_loss(v)  # raises with the registered names and the nearest one
        return v

    @field_validator("params", mode="before")
    @classmethod
    def _null_is_none(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _params_fit_the_loss(self) -> "KDSpec":
        # One call on a 1-token, 2-word input: a misspelled or out-of-range parameter fails now,
        # not on the first step after the models are loaded.
        x = torch.zeros(1, 2)
        try:
            get_kd_loss(self.loss)(x, x, torch.zeros(1, dtype=torch.long), temperature=self.temperature, **self.params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`kd.params` {self.params} do not fit `kd.loss: {self.loss}`: {e}") from None
        return self


class DistillRecipe(RecipeBase):
    """A `trainer: distill` recipe."""

    student: Role
    """The model that learns: trainable (ZeRO-2 by default)."""
    teacher: Role
    """The frozen model the student imitates (ZeRO-3 by default, its placement chosen by the plan); not loaded when
    `kd.cache` reads its distributions from disk."""
    kd: KDSpec = KDSpec()
    """The divergence, its mix with the labels' cross-entropy, on-policy sampling and the teacher cache."""


@register_trainer
class DistillTrainer(RoleTrainer):
    name = "distill"
    roles = {
        "student": Role(trainable=True, deepspeed="zero2"),
        "teacher": Role(trainable=False, deepspeed="zero3"),
    }
    sections = {"kd": KDSpec}
    recipe_class = DistillRecipe
    supports_packing = True  # offline text only: check_recipe and build_data refuse prompts

    @classmethod
    def built_roles(cls, recipe) -> list[str]:
        return ["student"] if recipe.kd.cache is not None else list(cls.roles)

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        if recipe.kd.cache is not None:
            teacher_cache.check_cache(recipe, getattr(plans["student"].model_config, "vocab_size", None))
        if not recipe.kd.chunked:
            return
        for name, plan in plans.items():
            transform = logit_transform(plan.model_config)
            if transform:
                raise RecipeError(f"`kd.chunked: true` cannot reproduce `{name}`'s {transform}: set `kd.chunked: false`")

    @classmethod
    def plan_notes(cls, recipe, plans, world_size: int) -> list[str]:
        if recipe.kd.cache is not None:
            return [teacher_cache.describe(teacher_cache.complete_manifest(recipe))]
        op = recipe.kd.on_policy
        if op is None:
            return []
        return generation_plan(recipe, plans, world_size, op, ["student"] + (["teacher"] if op.seq_kd and op.lmbda < 1 else []))

    @classmethod
    def write_synthetic(cls, out_dir, seed: int, recipe=None) -> None:
        if recipe is not None and recipe.kd.on_policy is not None:
            write_prompt_dataset(out_dir, seed=seed)
        else:
            super().write_synthetic(out_dir, seed)

    @classmethod
    def check_recipe(cls, recipe) -> None:
        op = recipe.kd.on_policy
        if recipe.kd.cache is not None:
            if op is not None:
                raise RecipeError("`kd.on_policy` scores completions the student generates as it trains, which needs the "
                                  "live teacher; `kd.cache` holds the teacher on the data's text: remove one of them")
            where = teacher_cache.cache_dir(recipe)  # training reads a cache: it must be named
            if not (recipe.data.tokenizer or recipe.student.from_pretrained or recipe.teacher.from_pretrained):
                raise RecipeError(f"`data.tokenizer`: name the tokenizer of the data; the teacher cache keeps the one it "
                                  f"was written with in {where / 'tokenizer'}")
        if op is not None and recipe.data.packing:
            raise RecipeError("`data.packing: true` packs text documents; `kd.on_policy` trains on prompts and "
                              "generated completions: set `data.packing: false` or `kd.on_policy: null`")
        if op is not None and op.max_new_tokens >= recipe.data.max_length:
            raise RecipeError(f"`kd.on_policy.max_new_tokens: {op.max_new_tokens}` leaves no room for the prompt in "
                              f"`data.max_length: {recipe.data.max_length}`: raise data.max_length or lower max_new_tokens")
        if recipe.kd.chunked and recipe.student.zero_stage == 3:
            # The chunked loss needs the student's whole lm_head weight with a gradient; a gathered
            # ZeRO-3 parameter does not carry one back to its shards.
            raise RecipeError("`kd.chunked: true` needs the student at ZeRO-0/1/2: set `student.deepspeed: zero2` or `kd.chunked: false`")
        lora = recipe.student.lora
        if recipe.kd.chunked and lora is not None and isinstance(lora.target_modules, list) and "lm_head" in lora.target_modules:
            # The chunked loss multiplies by the lm_head weight itself; an adapter on it would be skipped.
            raise RecipeError("`kd.chunked: true` reads the student's lm_head weight directly, so it cannot train a LoRA "
                              "adapter on it: drop lm_head from `student.lora.target_modules` or set `kd.chunked: false`")

    # -- data: text, or prompts whose completions may be generated ---------------------------------
    def build_data(self) -> DataBundle:
        data = kd_data(self.recipe, self.tokenizer, self.rank, self.world_size, compiled=self.compiled, log=self.log)
        if self.recipe.kd.cache is not None:
            manifest = teacher_cache.complete_manifest(self.recipe)
            data, self.cached_teacher = teacher_cache.attach(self.recipe, data, self.tokenizer, manifest)
        ev = data.eval
        self._eval_has_completions = ev is None or "completion_ids" not in ev.column_names or any(ev["completion_ids"])
        return data

    def prepare_step(self, step, micro_batches):
        """One generation phase per writer and step: the prompts of every micro-batch a role writes, together."""
        op = self.recipe.kd.on_policy
        if op is None:
            return micro_batches
        writers: dict[str, list[int]] = {}
        for i in range(len(micro_batches)):
            source = completion_source(self.recipe.seed, step, i, op)
            if source != "data":
                writers.setdefault(source, []).append(i)
        out = list(micro_batches)
        for source, rows in writers.items():  # the same order on every rank: a ZeRO-3 writer's gathers pair up
            # One seed per (step, writer, rank): ranks sample differently, a resumed run the same.
            # (The writer by index: a str's hash changes between processes, which would break resuming.)
            seed = hash((self.recipe.seed, step, ("student", "teacher").index(source), self.rank)) % 2**63
            for i, batch in zip(rows, self.sampler.sample_many(self.models[source], [micro_batches[i] for i in rows], seed=seed)):
                out[i] = batch
        return out

    def step_metrics(self):
        return self.sampler.metrics() if self.recipe.kd.on_policy else {}

    @property
    def sampler(self) -> CompletionSampler:
        if "_sampler" not in self.__dict__:
            self._sampler = CompletionSampler.for_trainer(self, self.recipe.kd.on_policy, key="kd.on_policy",
                                                          padding=self.data.collator.padding)
        return self._sampler

    # -- the algorithm -----------------------------------------------------------------------------
    def loss_step(self, batch, num_tokens):
        kd = self.recipe.kd
        # The student's own samples are no target to imitate: only the divergence learns from them.
        alpha = 0.0 if batch.get("source") == "student" else kd.alpha
        if alpha == 1:
            return self.ce_step(batch, num_tokens)
        if kd.cache is not None:
            return self._cached_loss_step(batch, num_tokens, alpha)
        if kd.chunked:
            return self._chunked_loss_step(batch, num_tokens, alpha)
        inputs = model_inputs(batch)
        teacher_logits, logits = self.alongside(self.teacher, lambda: self.teacher(**inputs).logits,  # [B, T, V_t]
                                                lambda: self.student(**inputs).logits)  # [B, T, V_s]
        ce = cross_entropy(logits, batch["labels"], num_valid_tokens=num_tokens)
        div = get_kd_loss(kd.loss)(logits, teacher_logits, batch["labels"], temperature=kd.temperature, top_k=kd.top_k,
                                   num_valid_tokens=num_tokens, **kd.params)
        return {"loss": alpha * ce + (1 - alpha) * div, "ce": ce, "kd": div}

    def ce_step(self, batch, num_tokens):
        """`kd.alpha: 1`: the loss is the CE on the labels alone, so the teacher is not run (the same on every rank,
        so a ZeRO-3 teacher's collectives are skipped together)."""
        inputs = model_inputs(batch)
        if not self.recipe.kd.chunked:
            ce = cross_entropy(self.student(**inputs).logits, batch["labels"], num_valid_tokens=num_tokens)  # [B, T, V]
            return {"loss": ce, "ce": ce}
        hidden = self.student.last_hidden(**inputs)  # [B, T, H]
        head = self.student.module.get_output_embeddings().weight
        # The student against itself: a KD term of 0 weighted 0, so the chunked path computes CE only.
        total, parts = chunked_kd_loss(hidden, head, hidden.detach(), head.detach(), batch["labels"], loss="forward_kl",
                                       alpha_ce=1.0, chunk_size=self.recipe.kd.chunk_size, num_valid_tokens=num_tokens)
        return {"loss": total, "ce": parts["ce"]}

    def _cached_loss_step(self, batch, num_tokens, alpha):
        """The loss against the teacher's distributions read from the cache (`kd.cache`), decoded on the device."""
        kd = self.recipe.kd
        teacher, _ = self.cached_teacher.codecs["train"].decode(batch["teacher_records"])  # [B, T, slots]
        inputs, labels = model_inputs(batch), batch["labels"]
        common = dict(temperature=kd.temperature, top_k=kd.top_k, tail=kd.cache.tail, num_valid_tokens=num_tokens)
        if kd.chunked:
            hidden = self.student.last_hidden(**inputs)  # [B, T, H]
            total, parts = chunked_sparse_kd_loss(hidden, self.student.module.get_output_embeddings().weight, teacher,
                                                  labels, loss=kd.loss, alpha_ce=alpha, chunk_size=kd.chunk_size,
                                                  loss_kwargs=kd.params, **common)
            return {"loss": total, **parts}
        logits = self.student(**inputs).logits  # [B, T, V]
        ce = cross_entropy(logits, labels, num_valid_tokens=num_tokens)
        div = get_sparse_kd_loss(kd.loss)(logits, teacher, labels, **common, **kd.params)
        return {"loss": alpha * ce + (1 - alpha) * div, "ce": ce, "kd": div}

    def _chunked_loss_step(self, batch, num_tokens, alpha):
        kd = self.recipe.kd
        # The models compute logits for one position only; the loss takes the rest from the hidden
        # states, one chunk of tokens at a time.
        inputs = model_inputs(batch)
        t_hidden, s_hidden = self.alongside(self.teacher, lambda: self.teacher.last_hidden(**inputs),  # [B, T, H_t]
                                            lambda: self.student.last_hidden(**inputs))  # [B, T, H_s]
        t_head = self.teacher.module.get_output_embeddings().weight
        s_head = self.student.module.get_output_embeddings().weight
        # One gather of the teacher's head per micro-batch, on every rank, whatever its token count.
        with self.teacher.gathered([t_head]):
            total, parts = chunked_kd_loss(s_hidden, s_head, t_hidden, t_head.detach(), batch["labels"],
                                           loss=kd.loss, alpha_ce=alpha, chunk_size=kd.chunk_size,
                                           num_valid_tokens=num_tokens, temperature=kd.temperature, top_k=kd.top_k,
                                           loss_kwargs=kd.params)
        return {"loss": total, **parts}

    @torch.no_grad()
    def eval_step(self, batch):
        """Sums over valid tokens: student CE, teacher CE, KL(teacher || student) and the training divergence
        on the data's completions; on-policy runs add, over the student's own samples, the reverse KL
        KL(student || teacher) and the teacher's NLL of them (`sampled/...`)."""
        out = self._offline_eval(batch) if getattr(self, "_eval_has_completions", True) else {}
        if self.recipe.kd.on_policy is not None:
            # Seeded by the prompts: the same samples-to-be before and after training, whatever ran between.
            seed = hash(tuple(batch["prompt_ids"].flatten().tolist())) % 2**63
            sampled = self.sampler.sample(self.student, batch, seed=seed)
            inputs = {"input_ids": sampled["input_ids"], "attention_mask": sampled["attention_mask"]}
            labels, one = sampled["labels"], torch.ones((), device=sampled["labels"].device)
            teacher_logits, logits = self.teacher(**inputs).logits, self.student(**inputs).logits
            out.update({"sampled/reverse_kl": get_kd_loss("reverse_kl")(logits, teacher_logits, labels, num_valid_tokens=one),
                        "sampled/teacher_nll": cross_entropy(teacher_logits, labels, num_valid_tokens=one),
                        "sampled/tokens": (labels != -100).sum()})
        return out

    def _offline_eval(self, batch):
        inputs = model_inputs(batch)
        labels, one = batch["labels"], torch.ones((), device=batch["labels"].device)
        if self.recipe.kd.cache is not None:
            return self._cached_eval(batch, inputs, labels, one)
        teacher_logits, logits = self.alongside(self.teacher, lambda: self.teacher(**inputs).logits,
                                                lambda: self.student(**inputs).logits)
        kd = self.recipe.kd
        return {
            "ce": cross_entropy(logits, labels, num_valid_tokens=one),
            "teacher_ce": cross_entropy(teacher_logits, labels, num_valid_tokens=one),
            "kl_to_teacher": get_kd_loss("forward_kl")(logits, teacher_logits, labels, num_valid_tokens=one),
            "kd": get_kd_loss(kd.loss)(logits, teacher_logits, labels, temperature=kd.temperature, top_k=kd.top_k,
                                       num_valid_tokens=one, **kd.params),
            "tokens": self.count_tokens(batch),
        }

    def _cached_eval(self, batch, inputs, labels, one):
        """`_offline_eval` against the cache: the teacher's CE from its stored log-probability of each label;
        `kl_to_teacher` with the tail as one class (a lower bound of the full KL; exact when the cache holds whole
        distributions)."""
        kd = self.recipe.kd
        teacher, label_logp = self.cached_teacher.codecs["eval"].decode(batch["teacher_records"])  # [B, T, slots], [B, T]
        logits = self.student(**inputs).logits
        valid = labels != -100
        return {
            "ce": cross_entropy(logits, labels, num_valid_tokens=one),
            "teacher_ce": -torch.where(valid, label_logp, torch.zeros_like(label_logp)).sum(),
            "kl_to_teacher": get_sparse_kd_loss("forward_kl")(logits, teacher, labels, tail="bucket", num_valid_tokens=one),
            "kd": get_sparse_kd_loss(kd.loss)(logits, teacher, labels, temperature=kd.temperature, top_k=kd.top_k,
                                              tail=kd.cache.tail, num_valid_tokens=one, **kd.params),
            "tokens": self.count_tokens(batch),
        }

    def report(self, history):
        if "before" not in history:
            return
        rows = [("student eval CE (nats/token)", "ce"), ("student KL(teacher || student)", "kl_to_teacher"),
                ("teacher eval CE (nats/token)", "teacher_ce"),
                ("on own samples: KL(student || teacher)", "sampled/reverse_kl"),
                ("on own samples: teacher NLL (nats/token)", "sampled/teacher_nll")]
        self.log(before_after_table(history, [r for r in rows if r[1] in history["before"]]))


def kd_data(recipe, tokenizer, rank: int, world_size: int, *, compiled: bool = False, log=print) -> DataBundle:
    """The data of distillation: text (offline), or prompt records whose completions the data gives or a role
    generates (`kd.on_policy`); refuses combinations that cannot train, naming the key."""
    d, op = recipe.data, recipe.kd.on_policy
    train_columns = _columns(d)
    if not is_prompt_dataset(train_columns):
        if op is not None:
            raise RecipeError(f"`kd.on_policy` needs prompt records ('prompt' [+ 'completion'] or 'messages'); "
                              f"`data.train` has the columns {train_columns}")
        return build_text_data(recipe, tokenizer, rank, world_size, compiled=compiled)
    if d.packing:
        raise RecipeError(f"`data.packing: true` packs text documents; `data.train` holds prompt records "
                          f"(columns {train_columns}): set `data.packing: false`, or give text records")
    # On-policy, prompts leave room for what is generated; offline, for half of the dataset's completion.
    max_prompt = d.max_length - op.max_new_tokens if op else d.max_length // 2
    data, counts = build_prompt_data(recipe, tokenizer, rank, world_size, max_prompt_length=max_prompt,
                                     compiled=compiled, log=log)
    train = counts["train"]
    if train["with_completion"] < train["n"] and not (op and (op.lmbda == 1 or op.seq_kd)):
        raise RecipeError(f"`data.train`: {train['n'] - train['with_completion']} of {train['n']} records have no "
                          "completion to learn from: add completions, or set kd.on_policy.lmbda: 1 or "
                          "kd.on_policy.seq_kd: true so that one is generated for every batch")
    return data


def _columns(data) -> list[str]:
    try:
        return load_dataset_source(data.train, **source_options(data, "train")).column_names
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"`data.train`: {e}") from None
