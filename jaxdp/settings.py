"""Typed settings of a training run: frozen dataclasses, validated once, where they are made.

    Settings(model=ModelSettings(...), data=DataSettings(...), dp=DPSettings(...), ...)

Every field, with its default and meaning, is here; `jaxdp.config.default_config()` is made
from these defaults (the config files and `--config.a.b=...` overrides), and
`jaxdp.config.to_settings` turns such a ConfigDict into `Settings`, the only place a ConfigDict
is read. The trainer (`jaxdp.run.run`), the service and the commands take `Settings`. An
invalid value is a `ConfigError` naming the field and what to use, raised on construction:
before any slow work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxdp import data, ghost, steps
from jaxdp.accounting import ACCOUNTANTS, SAMPLINGS
from jaxdp.clipping import CLIPPING_MODES
from jaxdp.gpt2 import COMPUTE_DTYPES, PRESETS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """The settings cannot be run as given (one line says what to change)."""


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"Unknown {name} {value!r}; use one of {', '.join(map(str, allowed))}.")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        raise ConfigError(f"{name} must be a positive number, got {value!r}.")


def _integer(name: str, value: Any, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not (isinstance(value, int) and value >= low):
        raise ConfigError(f"{name} must be an integer >= {low}{why}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    name_or_path: str = "gpt2"  # HF id, local HF dir, or (with init="random") a preset name
    init: str = "pretrained"  # "pretrained" | "random"
    dropout: float | None = None  # overrides resid/embd/attn_pdrop; None: the model's own
    revision: str | None = None
    # The base model's name in the released model card and PEFT adapter_config.json; None: the
    # name_or_path (a local directory by its absolute path). A service names its registered model.
    public_name: str | None = None
    # Trainable subset: regexes fully matching parameter paths such as "h.11.attn.c_attn.kernel",
    # "ln_f.scale", "wte.embedding"; empty: everything (or only the adapters with LoRA).
    trainable: tuple[str, ...] = ()
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on lora_targets
    lora_alpha: float = 16.0  # the adapter output is scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj")  # layers of each block

    def __post_init__(self):
        _choice("model.init", self.init, ("pretrained", "random"))
        _integer("model.lora_rank", self.lora_rank, 0)
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}.")
        if self.init == "random" and self.name_or_path.split("/")[-1] not in PRESETS:
            raise ConfigError(
                f"model.init='random' needs a preset name in model.name_or_path "
                f"({', '.join(PRESETS)}), got {self.name_or_path!r}."
            )


@dataclasses.dataclass(frozen=True)
class DataSettings:
    # "hf" (a `datasets` dataset) | "text_files" | "jsonl" | "csv" | "tfds" (extra)
    source: str = "hf"
    train_files: tuple[str, ...] = ()  # text_files / jsonl / csv
    eval_files: tuple[str, ...] = ()
    hf_dataset: str = "wikitext"  # hf/tfds: dataset name (hf: also a local dataset dir)
    hf_config: str | None = "wikitext-2-raw-v1"  # None: the dataset has no configs
    hf_train_split: str = "train"
    hf_eval_split: str = "validation"  # "" for no evaluation
    text_field: str = "text"  # jsonl / csv / hf / tfds: the column with the text
    user_field: str = "user_id"  # privacy_unit="user": the column naming each record's user
    # The privacy unit (jaxdp/data.py): "block" (block_size tokens cut from the concatenated
    # text), "record" (a line or paragraph of a text file, a JSONL/CSV/dataset row) or "user"
    # (all records with the same user_field).
    privacy_unit: str = "block"
    record_separator: str = "line"  # text files as records: "line" | "paragraph"
    max_blocks_per_unit: int = 1  # record/user: the first k blocks of a unit are used
    tokenizer: str = "gpt2"  # HF id or local dir (vocab.json + merges.txt is enough)
    block_size: int = 128  # tokens per row (per example with block units)
    max_eval_examples: int | None = None  # evaluate on the first k eval rows
    # The number of privacy units a plan was made for in advance (the service calibrates at
    # submission): a dataset with another count is refused rather than accounted wrongly.
    expected_units: int | None = None

    def __post_init__(self):
        _choice("data.source", self.source, data.SOURCES)
        _choice("data.privacy_unit", self.privacy_unit, data.UNITS)
        _choice("data.record_separator", self.record_separator, data.SEPARATORS)
        _integer("data.block_size", self.block_size, 2, " (one prediction needs two tokens)")
        _integer("data.max_blocks_per_unit", self.max_blocks_per_unit, 1)
        if self.source in ("text_files", "jsonl", "csv") and not self.train_files:
            raise ConfigError(f"data.source={self.source!r} needs data.train_files.")
        if self.privacy_unit == "user" and self.source == "text_files":
            raise ConfigError(
                "data.privacy_unit='user' needs records with a user column (data.user_field): "
                "use data.source='jsonl', 'csv' or 'hf'."
            )

    @property
    def one_row_units(self) -> bool:
        """Every privacy unit is one row (block): what the ghost and fused engines clip."""
        return self.privacy_unit == "block" or self.max_blocks_per_unit == 1


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """Adaptive clipping (jaxdp/adaptive.py): the clip norm (flat) or the per-layer thresholds
    follow a target quantile of the gradient norms, from a count released with its own noise."""

    enabled: bool = False
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None  # None: expected_batch_size / 20
    min_clip_norm: float = 1e-3
    max_clip_norm: float = 1e3


@dataclasses.dataclass(frozen=True)
class DPSettings:
    enabled: bool = True
    l2_clip_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrate to target_epsilon
    target_epsilon: float | None = 8.0  # None (with a noise_multiplier): no budget stop
    target_delta: float | None = None  # None: 1 / (10 * num_examples)
    expected_batch_size: float = 64.0  # B = q * N (may be fractional); the batch size without DP
    microbatch_size: int = 8  # examples per device per vmap chunk (bounds memory)
    physical_batch_size: int | None = None  # None: fits the drawn batch w.h.p.
    clipping: str = "flat"  # "flat" | "per_layer"
    # "vmap" | "ghost" (exact norms without per-example gradients) | "fused" (per-layer
    # clipping inside backpropagation: about the cost of a non-private step)
    engine: str = "vmap"
    adaptive: AdaptiveSettings = AdaptiveSettings()
    # Noise-free gradient diagnostics in W/private (m-coherence, norm quantiles, SNR): NOT
    # covered by epsilon. DP estimates (SNR from the noisy sum, sigma/B) are always public.
    diagnostics: bool = False
    # ghost engine, per dense layer: "auto" | "ghost" | "instantiate", or "plan": each layer's
    # choice by cost under a memory budget (jaxdp.clipping_plan)
    ghost_strategy: str = "auto"
    group_size: int = 1  # > 1: micro-batch clipping of fixed groups; costs 2x in accounting
    # Micro-batch clipping's number of content-hash cells: a public number fixed before
    # training (e.g. the units you expect / group_size), never computed from the data.
    num_cells: int | None = None
    accountant: str = "pld"  # "pld" | "rdp"
    sampling: str = "poisson"  # "poisson" | "shuffle" (APPROXIMATE epsilon, labelled as such)
    # Noise, Poisson draws and dropout are keyed by secrets drawn from the OS's cryptographic
    # randomness at the first start of a workdir (kept in W/private/). Setting a seed here fixes
    # them for tests and reproductions; every epsilon is then labelled as not private against
    # anyone who knows the seed.
    noise_seed: int | None = None
    secure_noise: bool = False  # each noise value a sum of 4 normals / 2 (see jaxdp/noise.py)

    def __post_init__(self):
        _choice("dp.sampling", self.sampling, SAMPLINGS)
        _choice("dp.clipping", self.clipping, CLIPPING_MODES)
        _choice("dp.engine", self.engine, steps.ENGINES)
        _choice("dp.ghost_strategy", self.ghost_strategy, (*ghost.STRATEGIES, "plan"))
        _choice("dp.accountant", self.accountant, ACCOUNTANTS)
        _positive("dp.l2_clip_norm", self.l2_clip_norm)
        _positive("dp.expected_batch_size", self.expected_batch_size)
        _integer("dp.microbatch_size", self.microbatch_size, 1)
        if self.physical_batch_size is not None:
            _integer("dp.physical_batch_size", self.physical_batch_size, 1)
        for name in ("noise_multiplier", "target_epsilon"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"dp.{name} must be a non-negative number, got {value}.")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ConfigError(
                f"dp.target_delta must be in (0, 1) (and well below 1 / N), got "
                f"{self.target_delta}."
            )
        self._check_grouping()
        if not self.enabled:
            return
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("Set dp.noise_multiplier or dp.target_epsilon (or both).")
        if self.engine == "fused" and self.clipping != "per_layer":
            raise ConfigError("dp.engine='fused' clips per layer: set dp.clipping='per_layer'.")
        if self.engine == "fused" and self.group_size != 1:
            raise ConfigError(
                "dp.engine='fused' clips one row per privacy unit: use dp.group_size=1 (or the "
                "vmap engine)."
            )

    def _check_grouping(self) -> None:
        """Micro-batch clipping (group_size > 1)."""
        if self.group_size < 1 or (self.enabled and self.microbatch_size < self.group_size):
            raise ConfigError(
                f"dp.microbatch_size ({self.microbatch_size}) must be at least dp.group_size "
                f"({self.group_size} >= 1): a cell's drawn members share one microbatch."
            )
        if self.group_size > 1 and self.sampling != "poisson":
            raise ConfigError("dp.group_size > 1 needs dp.sampling='poisson'.")
        if (
            self.enabled
            and self.group_size > 1
            and not (isinstance(self.num_cells, int) and self.num_cells >= 1)
        ):
            raise ConfigError(
                f"dp.group_size={self.group_size} needs dp.num_cells: a public number of cells "
                f"fixed before training (e.g. the number of units you expect / group_size), "
                f"never computed from the data (a removal that changed it would move every "
                f"example to another cell), got {self.num_cells!r}."
            )
        if self.engine == "ghost" and self.group_size != 1:
            raise ConfigError(
                "dp.engine='ghost' supports per-example clipping only (group_size=1)."
            )


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    name: str = "adamw"  # "sgd" | "adam" | "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" | "cosine" (decays to 0 at num_steps)

    def __post_init__(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _positive("optim.learning_rate", self.learning_rate)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    shape: tuple[int, ...] = (-1,)  # devices per axis; -1: all the remaining devices
    axes: tuple[str, ...] = ("data",)  # ("data",) data parallel; ("data", "fsdp") also FSDP


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Multi-host start-up (docs: Running on a cluster)."""

    initialize: str = "auto"  # "auto" (SLURM/env detected) | "always" (TPU pods) | "never"
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    num_steps: int = 1000  # logical (noisy) steps
    num_epochs: float | None = None  # if set: num_steps = ceil(epochs / q)
    # "float32" | "bfloat16": activations and matmuls; parameters, optimizer state, per-example
    # norms, clip factors, the clipped sum and the noise are float32 either way
    dtype: str = "float32"
    seed: int = 0  # public: model init, LoRA init, generated samples (not noise or sampling)
    log_every: int = 10
    eval_every: int = 100
    eval_batch_size: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    sample_prompts: tuple[str, ...] = ("Robert went on a trip to Las Vegas,",)
    sample_max_new_tokens: int = 32
    sample_top_k: int = 0  # 0: greedy
    export_hf: bool = True  # write W/hf at the end (LoRA adapters merged in)
    export_peft: bool = True  # with LoRA on a pretrained base: also W/peft (adapters only)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also TensorBoard logs, when tensorboardX is installed

    def __post_init__(self):
        _choice("train.dtype", self.dtype, COMPUTE_DTYPES)
        for name in ("eval_every", "log_every", "checkpoint_every", "eval_batch_size"):
            _positive(f"train.{name}", getattr(self, name))
        if self.num_epochs is None:
            _integer("train.num_steps", self.num_steps, 1)
        elif not self.num_epochs > 0:
            raise ConfigError(f"train.num_epochs must be positive, got {self.num_epochs!r}.")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a training run is given; the checks that span sections run here."""

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    dp: DPSettings = DPSettings()
    optim: OptimSettings = OptimSettings()
    mesh: MeshSettings = MeshSettings()
    distributed: DistributedSettings = DistributedSettings()
    train: TrainSettings = TrainSettings()

    def __post_init__(self):
        d, dp, t = self.data, self.dp, self.train
        if dp.enabled and t.dtype != "float32" and dp.engine == "ghost":
            if dp.ghost_strategy in ("auto", "ghost"):
                raise ConfigError(
                    f"train.dtype={t.dtype!r} with dp.engine='ghost' needs dp.ghost_strategy "
                    f"'plan' or 'instantiate': in low precision the ghost engine norms only "
                    f"per-example gradients it instantiates (the values it sums), never Gram "
                    f"matrices."
                )
        if dp.engine in ("ghost", "fused") and dp.enabled and not d.one_row_units:
            raise ConfigError(
                f"dp.engine={dp.engine!r} clips one row per privacy unit: use data.privacy_unit="
                f"'block' or data.max_blocks_per_unit=1, or the vmap engine, which norms each "
                f"unit's summed gradient."
            )
        if d.privacy_unit != "block" and dp.group_size > 1:
            raise ConfigError(
                "dp.group_size > 1 (micro-batch clipping) needs data.privacy_unit='block'."
            )
        if dp.enabled and d.privacy_unit != "block" and dp.microbatch_size < d.max_blocks_per_unit:
            raise ConfigError(
                f"dp.microbatch_size ({dp.microbatch_size}) must be at least "
                f"data.max_blocks_per_unit ({d.max_blocks_per_unit}): a unit's rows are summed "
                f"within one microbatch."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (tuples kept): config.json, the run record's settings."""
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any]) -> Settings:
        """A copy with some fields of some sections changed, validated again:
        `settings.replace(dp={"engine": "ghost"}, train={"num_steps": 10})`."""
        changed = {}
        for name, fields in sections.items():
            section = getattr(self, name)
            if name == "dp" and isinstance(fields.get("adaptive"), dict):
                fields = {
                    **fields,
                    "adaptive": dataclasses.replace(section.adaptive, **fields["adaptive"]),
                }
            changed[name] = dataclasses.replace(section, **fields)
        return dataclasses.replace(self, **changed)


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "data": DataSettings,
    "dp": DPSettings,
    "optim": OptimSettings,
    "mesh": MeshSettings,
    "distributed": DistributedSettings,
    "train": TrainSettings,
}


def from_dict(values: dict[str, Any]) -> Settings:
    """Settings from nested dicts (a ConfigDict's `to_dict()`, a saved config.json); lists
    become tuples; an unknown section or field is a ConfigError naming it."""

    def section(cls, fields: dict[str, Any], path: str):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ConfigError(f"Unknown setting {path}.{unknown[0]}; known: {', '.join(known)}.")
        out = {}
        for name, value in fields.items():
            if name == "adaptive" and cls is DPSettings:
                value = section(AdaptiveSettings, value, f"{path}.adaptive")
            elif isinstance(value, list):
                value = tuple(value)
            out[name] = value
        return cls(**out)

    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown settings section {unknown[0]!r}; known: {', '.join(SECTIONS)}.")
    return Settings(**{k: section(SECTIONS[k], v, k) for k, v in values.items()})
