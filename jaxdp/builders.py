"""What the trainer is made of, each built from its section of the settings: the data's
sources and rows, the privacy plan, the model, the engine and the optimizer.

Each function reads the part of `jaxdp.settings.Settings` it is given and nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optax

from jaxdp import clipping_plan, data, hf, lora, sharding, steps
from jaxdp.adaptive import AdaptiveClipping
from jaxdp.gpt2 import GPT2Config, GPT2LMHeadModel, init_model
from jaxdp.plan import PrivacyPlan
from jaxdp.settings import (
    ConfigError,
    DataSettings,
    DPSettings,
    ModelSettings,
    OptimSettings,
    Settings,
)
from jaxdp.workdir import Workdir

log = logging.getLogger("jaxdp")

# The ratio of the noise's standard deviation to the largest possible clipped mean gradient
# (sigma / B) above which training cannot move: every coordinate's noise exceeds the whole
# gradient's norm.
HOPELESS_NOISE_RATIO = 1.0


# ---- Data ----------------------------------------------------------------------------------------


def checked_sources(s: Settings) -> tuple[data.TextSource, data.TextSource | None]:
    """(training source, evaluation source or None), each checked (files there, readable), and
    the Hub reachable for what comes from it: before any slow work."""
    train, evaluation = text_sources(s.data)
    for source in (train, evaluation):
        if source is not None:
            source.check()
    hf.check_hub_access(
        model=s.model.name_or_path if s.model.init == "pretrained" else None,
        tokenizer=s.data.tokenizer,
        dataset=s.data.hf_dataset if s.data.source == "hf" else None,
    )
    return train, evaluation


def text_sources(d: DataSettings) -> tuple[data.TextSource, data.TextSource | None]:
    """(training source, evaluation source or None) of the data config."""
    common = dict(
        text_field=d.text_field,
        user_field=d.user_field if d.privacy_unit == "user" else None,
        record_separator=d.record_separator,
    )
    if d.source in ("text_files", "jsonl", "csv"):
        train = data.TextSource(d.source, files=tuple(d.train_files), **common)
        if not d.eval_files:
            return train, None
        return train, data.TextSource(d.source, files=tuple(d.eval_files), **common)

    def split(name):
        return data.TextSource(
            d.source, dataset=d.hf_dataset, config=d.hf_config, split=name, **common
        )

    return split(d.hf_train_split), (split(d.hf_eval_split) if d.hf_eval_split else None)


def load_rows(wd: Workdir, train_source, eval_source, tokenizer, d, lead: bool):
    """(train rows, eval rows) for the privacy unit (`jaxdp.data.UnitRows`), tokenized once into
    the private token cache by process 0 and memory-mapped by every process. Evaluation uses
    the same rows (records are evaluated as records, one unit each)."""
    cache = wd.private / "cache"
    rows = lambda source, unit: data.load_rows(
        source,
        tokenizer,
        d.block_size,
        unit=unit,
        max_blocks_per_unit=d.max_blocks_per_unit,
        cache_dir=cache,
    )

    def load():
        train = rows(train_source, d.privacy_unit)
        if eval_source is None:
            return train, data.block_rows(np.zeros(0, np.uint16), d.block_size)
        return train, rows(eval_source, "block" if d.privacy_unit == "block" else "record")

    blocks, error = None, None
    if lead:  # tokenizes once; the others wait, then memory-map the cache
        try:
            wd.make_private()
            blocks = load()
        except ValueError as e:  # a missing column, text that is not UTF-8, ...
            error = ConfigError(str(e))
        except Exception as e:  # reaches the other processes as an error, not a hang
            error = e
    sharding.sync_processes("jaxdp_token_cache")
    if error is not None:
        raise error
    try:
        return blocks if lead else load()
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ---- Privacy plan --------------------------------------------------------------------------------


def check_units(d: DataSettings, rows: data.UnitRows) -> None:
    """The training data has units, as many as a plan made in advance expects."""
    if d.expected_units is not None and rows.num_units != d.expected_units:
        raise ConfigError(
            f"The training data has {rows.num_units} privacy units, but the plan was made for "
            f"data.expected_units={d.expected_units}."
        )
    if rows.num_units == 0:
        what = "complete block" if d.privacy_unit == "block" else "record"
        raise ConfigError(
            f"The training data gives no {what} of {rows.block_size} tokens; use more text or a "
            f"smaller data.block_size."
        )


def privacy_plan(
    cfg: Settings,
    num_examples: int,
    unit: str | None = None,
    unit_kind: str = "block",
) -> PrivacyPlan:
    """The plan for `num_examples` privacy units (described by `unit`)."""
    dp, t = cfg.dp, cfg.train
    steps_or_epochs = dict(steps=t.num_steps) if t.num_epochs is None else dict(epochs=t.num_epochs)
    unit = unit or f"example (one block of {cfg.data.block_size} tokens)"
    units = dict(unit=unit, unit_kind=unit_kind)
    try:
        if not dp.enabled:
            return PrivacyPlan.non_private(
                num_examples=num_examples,
                batch_size=dp.expected_batch_size,
                **units,
                **steps_or_epochs,
            )
        return PrivacyPlan.create(
            num_examples=num_examples,
            expected_batch_size=dp.expected_batch_size,
            l2_clip_norm=dp.l2_clip_norm,
            noise_multiplier=dp.noise_multiplier,
            target_epsilon=dp.target_epsilon,
            target_delta=dp.target_delta,
            accountant=dp.accountant,
            sampling=dp.sampling,
            clipping=dp.clipping,
            group_size=dp.group_size,
            num_cells=dp.num_cells if dp.group_size > 1 else None,
            secure_noise=dp.secure_noise,
            adaptive=adaptive_clipping(dp),
            **units,
            **steps_or_epochs,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def adaptive_clipping(dp: DPSettings) -> AdaptiveClipping | None:
    """dp.adaptive as settings (None when off); sigma_b defaults to expected_batch_size / 20."""
    a = dp.adaptive
    if not a.enabled:
        return None
    sigma_b = a.count_noise_multiplier
    return AdaptiveClipping(
        target_quantile=a.target_quantile,
        learning_rate=a.learning_rate,
        count_noise_multiplier=dp.expected_batch_size / 20 if sigma_b is None else sigma_b,
        min_clip_norm=a.min_clip_norm,
        max_clip_norm=a.max_clip_norm,
    )


def warn_about_hopeless_settings(plan: PrivacyPlan, m: ModelSettings) -> None:
    ratio = plan.noise_multiplier / plan.expected_batch_size
    if plan.enabled and ratio >= HOPELESS_NOISE_RATIO:
        log.warning(
            "noise_multiplier / expected_batch_size = %.3g: the noise on every coordinate of the "
            "mean gradient is larger than the whole clipped gradient can be, so training will "
            "barely move the loss. Raise the target epsilon, the batch size or the dataset size.",
            ratio,
        )
    if m.lora_rank and m.init == "random":
        log.warning(
            "LoRA adapters on a randomly initialised base model: the frozen weights are noise. "
            "LoRA is meant for fine-tuning pretrained weights (model.init='pretrained')."
        )


# ---- Model and engine ----------------------------------------------------------------------------


def model_configuration(m: ModelSettings) -> GPT2Config:
    """The architecture (a preset, or a pretrained model's config.json): cheap, no weights."""
    overrides = {}
    if m.dropout is not None:
        overrides = dict(resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    if m.init == "random":
        return GPT2Config.preset(m.name_or_path, **overrides)
    config = hf.load_hf_config(hf.resolve_model_dir(m.name_or_path, revision=m.revision))
    return dataclasses.replace(config, **overrides)


def model_config_and_tokenizer(s: Settings) -> tuple[GPT2Config, Any]:
    """The architecture in the compute dtype, and the tokenizer, checked against each other
    and the block size."""
    config = dataclasses.replace(model_configuration(s.model), compute_dtype=s.train.dtype)
    if config.n_positions < s.data.block_size:
        raise ConfigError(
            f"data.block_size={s.data.block_size} exceeds the model's n_positions="
            f"{config.n_positions}; use a smaller block size."
        )
    tokenizer = data.load_tokenizer(s.data.tokenizer)
    if s.model.init == "random":  # the embedding is sized to the tokenizer
        config = dataclasses.replace(config, vocab_size=len(tokenizer))
    elif config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only "
            f"{config.vocab_size}: they do not belong together."
        )
    return config, tokenizer


def engine(s: Settings, plan: PrivacyPlan, config: GPT2Config) -> steps.Engine:
    """The clipping engine of `dp.engine`, its per-layer strategies planned if asked."""
    strategy = s.dp.ghost_strategy
    if strategy == "plan" and plan.enabled and s.dp.engine == "ghost":
        strategy = plan_layers(config, s.data.block_size, s.dp.microbatch_size)
    elif strategy == "plan":
        strategy = "auto"  # no ghost engine: nothing to plan
    return steps.Engine(
        s.dp.engine,
        strategy,
        s.dp.microbatch_size if plan.enabled else None,
        diagnostics=s.dp.diagnostics and plan.enabled,
    )


def plan_layers(config: GPT2Config, seq_len: int, microbatch: int) -> str | tuple:
    """dp.ghost_strategy="plan": each dense layer's strategy for this microbatch size
    (`jaxdp.clipping_plan`; a low-precision model instantiates every layer, its only option)."""
    if config.compute_dtype != "float32":
        log.info("Clipping plan: a %s model: every layer instantiated.", config.compute_dtype)
        return "instantiate"
    try:
        chosen = clipping_plan.plan(config, seq_len, microbatch, microbatch_sizes=[microbatch])
    except ValueError as e:  # even Gram norms everywhere are over the memory budget
        log.warning("%s Using Gram-matrix norms for every layer (the least memory).", e)
        return "ghost"
    log.info("Clipping plan: %s", chosen.describe())
    return chosen.strategies


def build_model(m: ModelSettings, config: GPT2Config, seed: int) -> GPT2LMHeadModel:
    """The model: random (public `seed`) or pretrained weights, plus LoRA adapters."""
    if m.init == "random":
        model = init_model(config, seed=seed)
    else:
        model = hf.from_pretrained(m.name_or_path, revision=m.revision, config=config)
    if m.lora_rank:
        lora.apply_lora(model, m.lora_rank, m.lora_alpha, m.lora_targets, seed=seed)
    return model


def trainable_patterns(m: ModelSettings) -> tuple[str, ...]:
    """model.trainable, or only the LoRA adapters when LoRA is on and nothing else is asked."""
    if m.trainable:
        return tuple(m.trainable)
    return (lora.LORA_PATTERN,) if m.lora_rank else ()


def lora_record(m: ModelSettings) -> dict[str, Any] | None:
    if not m.lora_rank:
        return None
    return {"rank": m.lora_rank, "alpha": m.lora_alpha, "targets": list(m.lora_targets)}


def base_model(m: ModelSettings) -> str | None:
    """The pretrained base model for the model card and PEFT: `model.public_name` if set, else
    name_or_path (a local one by absolute path)."""
    if m.init != "pretrained":
        return None
    if m.public_name:
        return str(m.public_name)
    base = str(m.name_or_path)
    if Path(base).expanduser().is_dir():  # a local base: where it is, for any cwd
        base = str(Path(base).expanduser().resolve())
    return base


# ---- Optimizer -----------------------------------------------------------------------------------


def build_optimizer(o: OptimSettings, num_steps: int) -> optax.GradientTransformation:
    if o.schedule == "constant":
        lr = optax.constant_schedule(o.learning_rate)
    else:
        lr = optax.cosine_decay_schedule(o.learning_rate, max(1, num_steps - o.warmup_steps))
    if o.warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), lr], [o.warmup_steps]
        )
    if o.name == "sgd":
        return optax.sgd(lr, momentum=o.momentum or None)
    if o.name == "adam":
        return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
