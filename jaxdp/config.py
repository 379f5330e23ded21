"""The run configuration: every field `scripts/train.py` understands, with defaults.

Config files in `configs/` start from `default_config()` and change what they need; unknown
fields are rejected (the ConfigDict is locked), so a typo such as `--config.dp.noise_mutliplier`
is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ml_collections


def _optional(kind: type, default=None):
    """A typed field that may be None (a fresh reference each time: never share one)."""
    return ml_collections.FieldReference(default, field_type=kind)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = "gpt2"  # HF id, local HF dir, or (with init="random") a preset name
    c.model.init = "pretrained"  # "pretrained" | "random"
    c.model.dropout = _optional(float)  # overrides resid/embd/attn_pdrop; None: model's own
    c.model.revision = _optional(str)
    # The base model's name in the released model card and PEFT adapter_config.json; None: the
    # name_or_path (a local directory by its absolute path). A service names its registered model.
    c.model.public_name = _optional(str)
    # Trainable subset: regexes fully matching parameter paths such as "h.11.attn.c_attn.kernel",
    # "ln_f.scale", "wte.embedding"; empty: everything (or only the adapters with LoRA).
    c.model.trainable = ()
    c.model.lora_rank = 0  # > 0: LoRA adapters of this rank on model.lora_targets
    c.model.lora_alpha = 16.0  # the adapter output is scaled by lora_alpha / lora_rank
    c.model.lora_targets = ("attn.c_attn", "attn.c_proj")  # layers of each block

    c.data = ml_collections.ConfigDict()
    # "hf" (a `datasets` dataset) | "text_files" | "jsonl" | "csv" | "tfds" (extra)
    c.data.source = "hf"
    c.data.train_files = ()  # text_files / jsonl / csv
    c.data.eval_files = ()
    c.data.hf_dataset = "wikitext"  # hf/tfds: dataset name (hf: also a local dataset dir)
    c.data.hf_config = _optional(str, "wikitext-2-raw-v1")  # None: the dataset has no configs
    c.data.hf_train_split = "train"
    c.data.hf_eval_split = "validation"  # "" for no evaluation
    c.data.text_field = "text"  # jsonl / csv / hf / tfds: the column with the text
    c.data.user_field = "user_id"  # privacy_unit="user": the column naming each record's user
    # The privacy unit (jaxdp/data.py): "block" (block_size tokens cut from the concatenated
    # text), "record" (a line or paragraph of a text file, a JSONL/CSV/dataset row) or "user"
    # (all records with the same user_field).
    c.data.privacy_unit = "block"
    c.data.record_separator = "line"  # text files as records: "line" | "paragraph"
    c.data.max_blocks_per_unit = 1  # record/user: the first k blocks of a unit are used
    c.data.tokenizer = "gpt2"  # HF id or local dir (vocab.json + merges.txt is enough)
    c.data.block_size = 128  # tokens per row (per example with block units)
    c.data.max_eval_examples = _optional(int)  # evaluate on the first k eval rows
    # The number of privacy units a plan was made for in advance (the service calibrates at
    # submission): a dataset with another count is refused rather than accounted wrongly.
    c.data.expected_units = _optional(int)

    c.dp = ml_collections.ConfigDict()
    c.dp.enabled = True
    c.dp.l2_clip_norm = 1.0
    c.dp.noise_multiplier = _optional(float)  # None: calibrate to target_epsilon
    c.dp.target_epsilon = _optional(float, 8.0)  # None (with a noise_multiplier): no budget stop
    c.dp.target_delta = _optional(float)  # None: 1 / (10 * num_examples)
    c.dp.expected_batch_size = 64.0  # B = q * N (may be fractional); the batch size without DP
    c.dp.microbatch_size = 8  # examples per device per vmap chunk (bounds memory)
    c.dp.physical_batch_size = _optional(int)  # None: fits the drawn batch w.h.p.
    c.dp.clipping = "flat"  # "flat" | "per_layer"
    # "vmap" | "ghost" (exact norms without per-example gradients) | "fused" (per-layer
    # clipping inside backpropagation: about the cost of a non-private step)
    c.dp.engine = "vmap"
    # Adaptive clipping (jaxdp/adaptive.py): the clip norm (flat) or the per-layer thresholds
    # follow a target quantile of the gradient norms, from a count released with its own noise.
    c.dp.adaptive = ml_collections.ConfigDict()
    c.dp.adaptive.enabled = False
    c.dp.adaptive.target_quantile = 0.5
    c.dp.adaptive.learning_rate = 0.2
    c.dp.adaptive.count_noise_multiplier = _optional(float)  # None: expected_batch_size / 20
    c.dp.adaptive.min_clip_norm = 1e-3
    c.dp.adaptive.max_clip_norm = 1e3
    # Noise-free gradient diagnostics in W/private (m-coherence, norm quantiles, SNR): NOT
    # covered by epsilon. DP estimates (SNR from the noisy sum, sigma/B) are always public.
    c.dp.diagnostics = False
    # ghost engine, per dense layer: "auto" | "ghost" | "instantiate", or "plan": each layer's
    # choice by cost under a memory budget (jaxdp.clipping_plan)
    c.dp.ghost_strategy = "auto"
    c.dp.group_size = 1  # > 1: micro-batch clipping of fixed groups; costs 2x in accounting
    # Micro-batch clipping's number of content-hash cells: a public number fixed before
    # training (e.g. the units you expect / group_size), never computed from the data.
    c.dp.num_cells = _optional(int)
    c.dp.accountant = "pld"  # "pld" | "rdp"
    c.dp.sampling = "poisson"  # "poisson" | "shuffle" (APPROXIMATE epsilon, labelled as such)
    # Noise, Poisson draws and dropout are keyed by secrets drawn from the OS's cryptographic
    # randomness at the first start of a workdir (kept in W/private/). Setting a seed here fixes
    # them for tests and reproductions; every epsilon is then labelled as not private against
    # anyone who knows the seed.
    c.dp.noise_seed = _optional(int)
    c.dp.secure_noise = False  # each noise value a sum of 4 normals / 2 (see jaxdp/noise.py)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # "sgd" | "adam" | "adamw"
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.momentum = 0.0  # sgd only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # "constant" | "cosine" (decays to 0 at num_steps)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1,)  # devices per axis; -1: all the remaining devices
    c.mesh.axes = ("data",)  # ("data",) data parallel; ("data", "fsdp") also shards params

    c.distributed = ml_collections.ConfigDict()  # multi-host (README: Running on a cluster)
    c.distributed.initialize = "auto"  # "auto" (SLURM/env detected) | "always" (TPU pods) | "never"
    c.distributed.coordinator_address = _optional(str)  # "host:port" of process 0
    c.distributed.num_processes = _optional(int)
    c.distributed.process_id = _optional(int)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000  # logical (noisy) steps
    c.train.num_epochs = _optional(float)  # if set: num_steps = ceil(epochs / q)
    # "float32" | "bfloat16": activations and matmuls; parameters, optimizer state, per-example
    # norms, clip factors, the clipped sum and the noise are float32 either way
    c.train.dtype = "float32"
    c.train.seed = 0  # public: model init, LoRA init, generated samples (not noise or sampling)
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batch_size = 16
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.sample_prompts = ("Robert went on a trip to Las Vegas,",)
    c.train.sample_max_new_tokens = 32
    c.train.sample_top_k = 0  # 0: greedy
    c.train.export_hf = True  # write W/hf at the end (LoRA adapters merged in)
    c.train.export_peft = True  # with LoRA on a pretrained base: also W/peft (adapters only)
    c.train.progress = True  # tqdm progress bar
    c.train.tensorboard = True  # also TensorBoard logs, when tensorboardX is installed

    return c


def optional_fields(config: ml_collections.ConfigDict | None = None, prefix: str = "") -> set[str]:
    """Dotted paths of the fields that may be None (those of `default_config()` by default)."""
    config = default_config() if config is None else config
    out = set()
    for key, value in config.items(preserve_field_references=True):
        if isinstance(value, ml_collections.ConfigDict):
            out |= optional_fields(value, f"{prefix}{key}.")
        elif isinstance(value, ml_collections.FieldReference):
            out.add(prefix + key)
    return out


NONE_WORDS = ("None", "none", "null")


def split_none_overrides(argv: list[str], flag: str = "config") -> tuple[list[str], list[str]]:
    """(argv without `--config.a.b=None` overrides, the paths `a.b` they set to None).

    absl parses a float field's override as a float, so `--config.dp.target_epsilon=None` would
    be an error; the caller sets these fields to None itself (`set_none`)."""
    keep, paths = [], []
    for arg in argv:
        name, eq, value = arg.partition("=")
        prefix = f"--{flag}."
        if eq and name.startswith(prefix) and value in NONE_WORDS:
            paths.append(name[len(prefix) :])
        else:
            keep.append(arg)
    return keep, paths


def parse_flags(flag_values, prog: str, args: list[str]) -> list[str]:
    """`flag_values([prog, *args])` (absl), returning the unparsed arguments. ml_collections
    registers a config file's --config.a.b override flags from sys.argv, so sys.argv holds
    these arguments meanwhile: a command's main(argv) also works when called in-process."""
    saved, sys.argv = sys.argv, [prog, *args]
    try:
        return flag_values([prog, *args])
    finally:
        sys.argv = saved


def set_none(
    config: ml_collections.ConfigDict, path: str, optional: set[str] | None = None
) -> None:
    """Sets an optional field to None; a field that needs a value is a ValueError. `optional`:
    the fields that may be None (default: `optional_fields()` of the training config)."""
    optional = optional_fields() if optional is None else optional
    if path not in optional:
        raise ValueError(f"{path} cannot be None; fields that can: {', '.join(sorted(optional))}.")
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = None


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config path[:arg]` loads it, locked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxdp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config
