"""Speed and memory of one full train step, non-private vs DP-SGD engines, side by side.

Each mode runs the trainer's real step (`PrivacyPlan.optimizer`, `steps.init_state`,
`steps.shard_and_jit`; per step `zero_accum -> grad_step -> update_step`, blocked until ready) on
a randomly initialised GPT-2 (no download) and a random batch of B sequences of T tokens, with
no padding rows and dropout off:

    nonprivate  no privacy plan: the plain mean gradient
    vmap        DP-SGD, per-example gradients materialised by jax.vmap, `--microbatch` at a time
    ghost       DP-SGD with the ghost-norm book-keeping engine (jaxdp.ghost), strategy "auto"
    ghost_gram  the same, every layer's norm from Gram matrices (dp.ghost_strategy="ghost")
    ghost_inst  the same, every per-example gradient instantiated ("instantiate")
    ghost_plan  the same with the FLOPs-aware per-layer plan (jaxdp.clipping_plan), which also
                picks the microbatch (--microbatch is ignored)
    lora        DP-SGD (vmap) training only LoRA adapters, rank 8, on attn.c_attn/c_proj
    frozen      DP-SGD (vmap) training only the last block and ln_f; the rest frozen
    fused       DP-SGD with per-layer clipping fused into backpropagation (jaxdp.fused)
    nonprivate_bf16, ghost_plan_bf16   those modes with bf16 activations and matmuls (float32
                parameters, norms, clipped sums and noise); --dtype bfloat16 does it for all

Every mode runs in a fresh subprocess of this script, so that its peak memory is its own (GPU
peak memory cannot be reset within a process), and all modes run in one invocation, one after
the other in the order given. One JSON line per mode is printed to stdout at the end, with a
table on stderr; --out gets each line as its mode ends (with ratios against the non-private rows
run before it: run nonprivate first), so a run cut short keeps what it measured:

    step_s               median wall time of --steps timed steps, after --warmup untimed ones
    tokens_per_s         B * T / step_s
    compile_s            lowering + compiling zero_accum, grad_step and update_step
    setup_s              the mode's process before compiling: importing JAX, starting the
                         backend, building the model, the state and the batch; split into
                         import_s (Python's start-up and the imports), backend_s (starting
                         JAX's backend) and state_s (model, train state, batch, keys)
    run_s                the steps that ran once compiled: the warmup and timed steps (and a
                         loaded executable's check step)
    failed_load_s        serialized steps that loaded but failed their check step: loading,
                         that step and a new state (then compiled: compile_s); else null
    waited_s, ahead_s    a timed process started while the mode before it ran (it loads what
                         the compile pass left): how long it waited for that one to end
                         before starting JAX's backend (not in setup_s or process_s), and how
                         long it ran before its turn (its imports: part of import_s, setup_s
                         and process_s). Else null
    next_imports_s       how long the mode waited, before its first step, for the imports of
                         the mode started behind it (none run while it is timed); else null
    process_s            the mode's whole process, as its parent timed it (start-up, setup,
                         compile, steps, exit)
    steps, warmup, memory_limit_gib   the arguments it ran with (steps null: compile-only)
    reference_peak_bytes a plan mode's budget: the non-private step's XLA estimate it was held to
    peak_bytes           GPU: peak_bytes_in_use of device 0; CPU: peak RSS of the process
                         (includes the Python/XLA runtime; see peak_bytes_source)
    grad_step_temp_bytes XLA's compiled estimate of grad_step's scratch memory (any backend)
    update_step_temp_bytes   the same for update_step (noise, optimizer update)
    state_bytes          the train state: trainable and frozen parameters, optimizer state
    estimated_peak_bytes state_bytes + the gradient accumulator + the larger scratch of the two
                         steps: the compiler's view of one device's peak (the state is
                         replicated over the data-parallel mesh), for checking a fit without
                         the device (the target backend's compiler may schedule differently)
    grad_step_flops      XLA's cost-analysis FLOPs of one grad_step on one device (a microbatch
                         loop's body times its trip count): a hardware-independent cost, so
                         flops_ratio_vs_nonprivate (nonprivate FLOPs / these) predicts the
                         compute-bound speed ratio on any accelerator
    ratio_vs_nonprivate  nonprivate step_s / this step_s: the throughput relative to non-private
                         training (0.25 = four times slower); null without a nonprivate result
    flops_ratio_vs_nonprivate   nonprivate grad_step_flops / this one's
    error                null, or why the mode failed (engine missing, out of memory, ...); the
                         other modes still run

CPU (a quick check; the tiny model still has GPT-2's 50257-token vocabulary):

    python benchmarks/benchmark.py --model tiny --batch 8 --seq 64 --modes nonprivate,vmap

`--compile-only` skips the timed steps and reports only what the compiler knows (compile_s,
grad_step_flops, grad_step_temp_bytes, state_bytes, estimated_peak_bytes): a quick,
hardware-independent look at an engine's cost on any machine, e.g.
`--model gpt2 --batch 32 --seq 256 --compile-only` on a laptop CPU.

GPU: one command runs the whole table (GPT-2 small B32 T256 and B16 T1024, GPT-2 large B16 T256;
non-private, the clipping plan, both in bf16, then fused, ghost and vmap), each mode in its own
process, and prints one markdown table; `--compile-only` checks on any machine that every mode
compiles (and reports the FLOPs and XLA memory estimates):

    python benchmarks/benchmark.py --suite gpu --steps 5 --warmup 1 --out results.jsonl
    python benchmarks/benchmark.py --suite gpu --compile-only

A timed suite first compiles every mode, --jobs (4) at a time, each into a compilation cache
of its own and its steps serialized (`save_executables`), then times each mode alone with its
steps (and plan) loaded as the pass left them: deserialized, else from those caches
(`compile_pass`, `run_tasks`); compile_s is the compile pass's cold compile, cached_compile_s
the timed process's load, compile_cache_hits how many of the three steps were loaded and
steps_loaded_from from where. A plan's
XLA estimate also stays under --memory-limit-gib (default: the GPU's memory limit).

A run cut short (a time limit on the machine's commands) goes on where it stopped: `--resume`
keeps the rows already in --out (same arguments) and runs only the missing modes, and
`--cache-dir` keeps the compile pass's caches and rows, so that the modes compiled there before
(same machine, same jaxdp sources and JAX) are not compiled again:

    python benchmarks/benchmark.py --suite gpu --steps 5 --warmup 1 --out r.jsonl --cache-dir c
    python benchmarks/benchmark.py --suite gpu --steps 5 --warmup 1 --out r.jsonl --cache-dir c \
        --resume

One setting at a time (if a mode runs out of memory its line says so; retry with a smaller
--microbatch):

    python benchmarks/benchmark.py --model gpt2-xl --batch 16 --seq 256 \
        --modes nonprivate,ghost_plan,ghost --microbatch 4 --out results.jsonl

Invalid arguments exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MODES = (
    "nonprivate",
    "vmap",
    "ghost",
    "ghost_gram",
    "ghost_inst",
    "ghost_plan",
    "lora",
    "frozen",
    "fused",
    "nonprivate_bf16",
    "ghost_plan_bf16",
)
# `--suite gpu`: settings (model, B, T, microbatch for vmap/ghost/fused) x SUITE_MODES. The modes
# run in two passes over the settings, the DP-SGD plan and its baselines first, so that a run cut
# short still has every setting's headline rows; the table is ordered by setting.
SUITE_PASSES = (
    ("nonprivate", "ghost_plan", "nonprivate_bf16", "ghost_plan_bf16"),
    ("fused", "ghost", "vmap"),
)
SUITE_MODES = tuple(m for modes in SUITE_PASSES for m in modes)
# A timed suite first compiles every mode, this many at a time (--jobs), then times each alone.
DEFAULT_SUITE_JOBS = 4
SUITES = {
    "gpu": (("gpt2", 32, 256, 8), ("gpt2", 16, 1024, 4), ("gpt2-large", 16, 256, 4)),
}
# The ghost modes' dp.ghost_strategy (how dense layers' per-example norms are computed).
GHOST_STRATEGY = {
    "ghost": "auto",
    "ghost_gram": "ghost",
    "ghost_inst": "instantiate",
    "ghost_plan": "plan",
    "ghost_plan_bf16": "plan",
}


def _mode_dtype(mode: str, dtype: str) -> str:
    return "bfloat16" if mode.endswith("_bf16") else dtype


MODELS = ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
RESULT_KEYS = (
    "step_s",
    "tokens_per_s",
    "peak_bytes",
    "peak_bytes_source",
    "compile_s",
    "compile_cache_hits",
    "steps_loaded_from",
    "grad_step_temp_bytes",
    "update_step_temp_bytes",
    "grad_step_flops",
    "state_bytes",
    "estimated_peak_bytes",
    "n_trainable_params",
    "device",
    "backend",
    "num_devices",
)


# The compiler's cost and memory estimates of a mode's steps.
ESTIMATE_KEYS = (
    "grad_step_temp_bytes",
    "update_step_temp_bytes",
    "grad_step_flops",
    "estimated_peak_bytes",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, help="GPT-2 preset")
    parser.add_argument("--batch", type=int, help="B: examples per step")
    parser.add_argument("--seq", type=int, help="T: tokens per example")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument(
        "--microbatch", type=int, default=None, help="M for vmap/ghost (default: B, one vmap)"
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=None,
        help="run a fixed table of settings and modes instead of --model/--batch/--seq/--modes",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile and report FLOPs and XLA's memory estimate without running steps",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of the modes without a _bf16 suffix (parameters stay float32)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="compile pass: compile every mode first, this many at a time, into a compilation "
        "cache of its own (a fresh one, or --cache-dir), then time each mode alone with its "
        "executables loaded from it "
        f"(default {DEFAULT_SUITE_JOBS} for a timed --suite, else 1: each mode compiles in "
        "its own timed process)",
    )
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows in --out that already measured a (setting, mode) of this run (same "
        "dtype, microbatch, --steps, --warmup and --memory-limit-gib, or both compile-only; no "
        "error) and run only the others: a run cut short goes on where it stopped; the table "
        "shows both, ratios taken within one device",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="the compile pass's compilation caches and rows (default: a temporary directory, "
        "removed at the end); a later run given the same directory, on the same machine, does "
        "not compile again the modes compiled there by the same code and JAX (with --resume: a "
        "timed suite cut short)",
    )
    parser.add_argument(
        "--reference-peak-bytes",
        type=int,
        default=None,
        help="XLA's peak estimate of the non-private step that the ghost_plan modes' budget is "
        "checked against (set by this script when a nonprivate mode of that dtype ran first)",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="the plan modes' XLA peak estimate must also stay under this (default: the GPU's "
        "memory limit; none on a CPU), e.g. 74.5 (80 GB) to check a GPU's fit with --compile-only",
    )
    parser.add_argument("--single-mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fixed-plan", default=None, help=argparse.SUPPRESS)  # JSON
    # The compile pass's serialized steps of this mode: written by a --compile-only child,
    # loaded (when they match) by the timed one (`save_executables`, `load_executables`).
    parser.add_argument("--executables", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_limit_gib is not None and not args.memory_limit_gib > 0:
        parser.error(f"--memory-limit-gib must be positive, got {args.memory_limit_gib}.")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}.")
    if args.jobs is None:
        timed_suite = args.suite is not None and not args.compile_only
        args.jobs = DEFAULT_SUITE_JOBS if timed_suite else 1
    if args.resume and not args.out:
        parser.error("--resume needs --out: the file with the rows measured so far.")
    if args.cache_dir and (args.jobs == 1 or args.compile_only):
        parser.error(
            "--cache-dir keeps a timed run's compile pass; it needs --jobs > 1 and no "
            "--compile-only."
        )
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}.")
    if args.suite is not None:
        given = [f"--{k}" for k in ("model", "batch", "seq") if getattr(args, k) is not None]
        if given:
            parser.error(f"--suite sets the settings itself; drop {', '.join(given)}.")
        return args
    missing = [f"--{k}" for k in ("model", "batch", "seq") if getattr(args, k) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --suite).")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown mode(s) {unknown}; choose from {','.join(MODES)}.")
    if len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes: repeated mode in {','.join(args.modes)}.")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}.")
    from jaxdp.gpt2 import PRESETS, GPT2Config  # imports JAX but starts no backend

    n_positions = PRESETS[args.model].get("n_positions", GPT2Config.n_positions)
    if not 2 <= args.seq <= n_positions:
        parser.error(
            f"--seq must be in [2, {n_positions}] (n_positions of {args.model}), got {args.seq}."
        )
    if args.microbatch is None:
        args.microbatch = args.batch
    if args.microbatch < 1 or args.batch % args.microbatch:
        m, b = args.microbatch, args.batch
        parser.error(f"--microbatch must be >= 1 and divide --batch {b}, got {m}.")
    return args


def _label(args: argparse.Namespace, mode: str) -> str:
    return f"{args.model} B{args.batch} T{args.seq} {mode}"


def _log(label: str, message: str) -> None:
    print(f"[benchmark {label}] {message}", file=sys.stderr, flush=True)


def _error_message(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    return text[:500]


def _peak_bytes() -> tuple[int, str]:
    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "gpu_peak_bytes_in_use"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host_peak_rss"


def _train_step(steps: tuple, state, batch, key) -> tuple:
    """One step with the three compiled steps (zero_accum, grad_step, update_step), waited for:
    the new state and the metrics."""
    import jax

    zero_accum, grad_step, update_step = steps
    acc = grad_step(state.params, batch, key, zero_accum(state.params), state.frozen)
    state, metrics = update_step(state, acc)
    return jax.block_until_ready((state, metrics))


def _temp_bytes(compiled) -> int | None:
    """XLA's scratch memory estimate of a compiled step (None where the backend has none)."""
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    return None if temp is None else int(temp)


def _memory_limit(args: argparse.Namespace) -> int | None:
    """Bytes a plan's XLA estimate must stay under: --memory-limit-gib, or the GPU's limit."""
    if args.memory_limit_gib:
        return int(args.memory_limit_gib * 2**30)
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def _flops(compiled, loop_trips: int) -> float | None:
    """XLA's FLOP estimate; a while loop's body is counted once, so scale it by its trips."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = None if not cost else cost.get("flops")
    return None if flops is None else float(flops) * loop_trips


LAUNCHED = "JAXDP_BENCHMARK_LAUNCHED"  # set by the parent for a mode's process: time.time()
# Set by the parent for a timed process (`_ModeProcess`, `run_tasks`): WAIT, it waits after its
# imports for "go" on stdin before it starts JAX's backend (it was started while the mode before
# it still runs); IMPORTED, a file it creates once imported; NEXT_IMPORTED, that file of the mode
# after it, which it waits for before its steps (so that no import runs while it is timed).
WAIT = "JAXDP_BENCHMARK_WAIT"
IMPORTED = "JAXDP_BENCHMARK_IMPORTED"
NEXT_IMPORTED = "JAXDP_BENCHMARK_NEXT_IMPORTED"
NEXT_IMPORTS_TIMEOUT_S = 60.0  # (the next process died while importing: its steps run anyway)


class _Turn:
    """A timed process's hand-over with the modes before and after it (see WAIT)."""

    def __init__(self) -> None:
        self.mine = not os.environ.get(WAIT)  # whether it may use the device
        self.waited_s: float | None = None  # for "go"
        self.next_imports_s: float | None = None  # for the next mode's imports

    def announce(self) -> None:
        """Imported (or failed to): the mode before it may run its steps."""
        if path := os.environ.pop(IMPORTED, None):
            Path(path).touch()

    def wait(self) -> None:
        """After the imports: waits for the parent's "go" (the device is free)."""
        self.announce()
        if self.mine:
            return
        from jax._src import xla_bridge

        if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
            raise RuntimeError("JAX's backend started during the imports, before its turn")
        t0 = time.time()
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("benchmark: the parent ended before this mode's turn; not run")
        self.waited_s, self.mine = time.time() - t0, True

    def before_steps(self, label: str) -> None:
        """Before its first step: waits until the next mode's process has imported."""
        path = os.environ.get(NEXT_IMPORTED)
        if not path or self.next_imports_s is not None:
            return
        t0 = time.perf_counter()
        while not os.path.exists(path):
            if time.perf_counter() - t0 > NEXT_IMPORTS_TIMEOUT_S:
                _log(label, f"the next mode's imports did not end in {NEXT_IMPORTS_TIMEOUT_S} s")
                break
            time.sleep(0.005)
        self.next_imports_s = time.perf_counter() - t0

    def fields(self) -> dict[str, float | None]:
        return {"waited_s": self.waited_s, "next_imports_s": self.next_imports_s}


_TURN = _Turn()
_CACHE_HITS: list[str] = []  # the persistent compilation cache's hit events in this process


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Builds, compiles and times `mode`'s train step in this process."""
    # When the parent launched this process (its setup_s includes Python's start-up).
    launched = float(os.environ.get(LAUNCHED, time.time()))
    # JAX is imported in the child process only: the parent never starts a backend, so that
    # each mode's peak memory is its own.
    import jax
    import numpy as np
    import optax

    from jaxdp import clipping_plan, lora, sharding
    from jaxdp import steps as steps_lib
    from jaxdp.gpt2 import GPT2Config, init_model
    from jaxdp.plan import PrivacyPlan

    imported = time.time()
    _TURN.wait()  # (started ahead: the device is the mode before it's until then)
    waited_s = _TURN.waited_s or 0.0

    def on_event(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            _CACHE_HITS.append(event)

    jax.monitoring.register_event_listener(on_event)

    B, T = args.batch, args.seq
    dtype = _mode_dtype(mode, args.dtype)
    label = _label(args, mode)
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "num_devices": jax.device_count(),
        "dtype": dtype,
    }
    backend_started = time.time()
    if B % jax.device_count():
        raise ValueError(f"--batch {B} must be divisible by the {jax.device_count()} devices.")

    # Model and state, exactly as the trainer builds them.
    config = GPT2Config.preset(
        args.model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, compute_dtype=dtype
    )

    setup: dict[str, float] = {}
    builds: list[int | None] = []  # one per build (a replanned mode builds again)

    def build(microbatch, strategy) -> dict[str, Any]:
        """The mode's state and compiled steps for one (microbatch, ghost strategy)."""
        result: dict[str, Any] = {}
        trainable: tuple[str, ...] = ()
        if mode == "lora":
            trainable = (lora.LORA_PATTERN,)
        elif mode == "frozen":
            trainable = (rf"h\.{config.n_layer - 1}\..*", r"ln_f\..*")
        plan, engine = None, steps_lib.Engine()
        if not mode.startswith("nonprivate"):
            # A benchmark's plan: random data, nothing private (a fixed noise key is fine here).
            plan = PrivacyPlan(
                num_examples=1000 * B,
                expected_batch_size=B,
                num_steps=args.warmup + args.steps,
                l2_clip_norm=1.0,
                noise_multiplier=1.0,
                target_delta=1e-6,
                clipping="per_layer" if mode == "fused" else "flat",
            )
            engine = steps_lib.Engine(
                "ghost" if mode in GHOST_STRATEGY else "fused" if mode == "fused" else "vmap",
                strategy,
                microbatch // jax.device_count(),  # per device
            )
        base = optax.adamw(1e-4)
        tx = base if plan is None else plan.optimizer(base, jax.random.key(0))

        def init():
            model = init_model(config, seed=0)
            if mode == "lora":
                lora.apply_lora(model, rank=8, alpha=16.0)
            return steps_lib.init_state(model, tx, trainable)

        mesh = sharding.make_mesh()

        def placed_state():
            if args.compile_only:  # shapes only: even GPT-2 XL's state is never allocated
                static = {}

                def abstract_init():
                    static["graphdef"], state = init()
                    return state

                state = jax.eval_shape(abstract_init)
                graphdef = static["graphdef"]
            else:
                graphdef, state = init()
            return steps_lib.shard_and_jit(tx, plan, engine, state, mesh, graphdef=graphdef)

        state, steps = placed_state()
        result["n_trainable_params"] = sum(x.size for x in jax.tree.leaves(state.params))

        # A random batch, no padding rows, placed as the trainer places it.
        rng = np.random.default_rng(0)
        columns = {
            "tokens": rng.integers(0, config.vocab_size, size=(B, T), dtype=np.int32),  # [B, T]
            "is_padding": np.zeros((B,), dtype=bool),  # [B]
        }
        batch = sharding.global_batch(columns, np.arange(B), mesh)
        replicated = sharding.replicated(mesh)
        base_key = jax.random.key(0)
        keys = [
            jax.device_put(jax.random.fold_in(base_key, i), replicated)
            for i in range(args.warmup + args.steps)
        ]

        # Ahead-of-time compile, so compile_s excludes execution and step_s excludes compilation.
        _log(label, "compiling")
        # Imports, backend, state, batch: the first build's (a replanned mode builds again).
        if "setup_s" not in setup:
            now = time.time()
            setup["setup_s"] = now - launched - waited_s
            setup["import_s"] = imported - launched
            setup["backend_s"] = backend_started - imported - waited_s
            setup["state_s"] = now - backend_started
        builds.append(microbatch)
        hits_before = len(_CACHE_HITS)
        ran_first_step, first_step_s = False, 0.0
        identity = None
        if args.executables:
            identity = _executables_identity(args, mode, microbatch, strategy)
        t0 = time.perf_counter()
        loaded = None
        if identity and not args.compile_only:
            loaded = load_executables(args.executables, identity, label)
        if loaded is not None:  # no tracing, lowering or compiling: the compile pass's steps
            zero_accum, grad_step, update_step = loaded
            result["compile_s"] = time.perf_counter() - t0
            # One step first (the first warmup step, if any; else an extra one with a key of
            # its own): a loaded executable that cannot run fails here, not in timed steps.
            first_key = keys[0]
            if not args.warmup:
                first_key = jax.device_put(jax.random.fold_in(base_key, len(keys)), replicated)
            failure = None
            try:
                _TURN.before_steps(label)
                t1 = time.perf_counter()
                state, _ = _train_step(loaded, state, batch, first_key)
                acc = zero_accum(state.params)
                first_step_s = time.perf_counter() - t1
                result["compile_cache_hits"] = 3
                result["steps_loaded_from"] = "serialized executables"
                ran_first_step = True
            except Exception as e:
                from jaxdp.memory import out_of_memory

                if out_of_memory(e):  # the mode's own failure, not the executables'
                    raise
                failure = _error_message(e)  # (the traceback, which holds the state, ends here)
            if failure is not None:
                _log(label, f"serialized steps failed to run ({failure}); compiling")
                # Its state may be donated: built again, after the first one is let go.
                loaded = state = acc = zero_accum = grad_step = update_step = None
                state, steps = placed_state()
                # Loading, the failed step and the new state: none of it is compiling.
                result["failed_load_s"] = time.perf_counter() - t0
                t0, hits_before = time.perf_counter(), len(_CACHE_HITS)
        if loaded is None:
            zero_accum = steps.zero_accum.lower(state.params).compile()
            compile_s = time.perf_counter() - t0
            if args.compile_only:
                acc = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                    jax.eval_shape(steps.zero_accum, state.params),
                    zero_accum.output_shardings,
                )
            else:  # lowered with its real shardings; lowering donates nothing
                acc = zero_accum(state.params)
            t0 = time.perf_counter()
            grad_step = steps.grad_step.lower(
                state.params, batch, keys[0], acc, state.frozen
            ).compile()
            update_step = steps.update_step.lower(state, acc).compile()
            result["compile_s"] = compile_s + time.perf_counter() - t0
            # With a persistent compilation cache (the suite's timed pass): how many of the
            # three steps were loaded from it rather than compiled here.
            cache_on = (
                jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
            )
            result["compile_cache_hits"] = len(_CACHE_HITS) - hits_before if cache_on else None
            if result["compile_cache_hits"]:
                result["steps_loaded_from"] = "compilation cache"
        temp, update_temp = _temp_bytes(grad_step), _temp_bytes(update_step)
        result["grad_step_temp_bytes"] = temp
        result["update_step_temp_bytes"] = update_temp
        nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
        result["state_bytes"] = int(nbytes(state))
        if temp is not None:
            # The state and the accumulator live through both steps; the update step (noise,
            # optimizer) runs after the gradient step's scratch is freed.
            scratch = max(temp, update_temp or 0)
            result["estimated_peak_bytes"] = int(nbytes(state) + nbytes(acc) + scratch)
        result["grad_step_flops"] = _flops(grad_step, 1 if plan is None else B // microbatch)
        return dict(
            result=result,
            identity=identity,
            ran_first_step=ran_first_step,
            first_step_s=first_step_s,
            state=state,
            zero_accum=zero_accum,
            grad_step=grad_step,
            update_step=update_step,
            batch=batch,
            keys=keys,
            acc=acc,
        )

    microbatch, strategy = args.microbatch, GHOST_STRATEGY.get(mode, "auto")
    compile_s = 0.0  # of every plan tried
    if strategy == "plan" and args.fixed_plan:  # the compile pass's plan, not planned again
        fixed = json.loads(args.fixed_plan)
        microbatch, strategies = fixed["microbatch"], fixed["strategies"]
        if not isinstance(strategies, str):
            strategies = tuple(tuple(pair) for pair in strategies)
        built = build(microbatch, strategies)
        result["plan"], result["plan_choice"] = fixed["description"], fixed
    elif strategy != "plan":
        built = build(microbatch, strategy)
    else:  # the FLOPs-aware per-layer plan picks M and each layer's strategy
        # Planned by the cost model, checked by the compiler against the non-private step's
        # estimate (--reference-peak-bytes, from the same run): over budget, it is replanned
        # with the model's budget tightened by the overshoot (at most three times).
        # The device's memory caps it too (--memory-limit-gib; on a GPU by default its limit).
        budget, model_budget = clipping_plan.DEFAULT_BUDGET, clipping_plan.DEFAULT_BUDGET
        ref = args.reference_peak_bytes
        limit = _memory_limit(args)
        caps = [c for c in (ref and budget * ref, limit) if c]
        cap = min(caps) if caps else None
        last = None
        for attempt in range(4):
            built = None  # (a replanned mode's state replaces, not joins, the last one)
            try:
                chosen = clipping_plan.plan(
                    config, T, B, budget=model_budget, allow_gram=dtype == "float32"
                )
            except ValueError:  # nothing tighter exists: the last plan, over budget, stands
                if last is None:
                    raise
                chosen, attempt = last, 3
            built = build(chosen.microbatch_size, chosen.strategies)
            compile_s += built["result"]["compile_s"]
            last = chosen
            microbatch, est = chosen.microbatch_size, built["result"].get("estimated_peak_bytes")
            result["plan"] = chosen.describe()
            if not cap or not est or est <= cap or attempt == 3:
                if ref and est and est > budget * ref:
                    result["plan"] += f"; XLA estimate {est / ref:.2f}x, over the {budget}x budget"
                if limit and est and est > limit:
                    result["plan"] += (
                        f"; XLA estimate {est / 2**30:.1f} GiB, over the memory limit "
                        f"{limit / 2**30:.1f} GiB"
                    )
                break
            _log(label, f"plan over budget by XLA's estimate ({est / cap:.2f}x); replanning")
            model_budget *= 0.98 * cap / est
        result["plan_choice"] = {
            "microbatch": chosen.microbatch_size,
            "strategies": chosen.strategies,
            "description": result["plan"],
        }
    result.update(built["result"], **setup)
    if compile_s:  # a replanned mode compiled every plan it tried
        result["compile_s"] = compile_s
    result["microbatch"] = None if mode.startswith("nonprivate") else microbatch
    state = built["state"]
    zero_accum, grad_step, update_step = (
        built["zero_accum"],
        built["grad_step"],
        built["update_step"],
    )
    batch, keys, acc = built["batch"], built["keys"], built["acc"]
    if args.compile_only:
        # Only steps compiled in this process are serialized: one loaded from the persistent
        # compilation cache (a replanned plan's unchanged steps, a kept --cache-dir's after an
        # edit) serializes, but on a CPU failed to run when loaded in another process ("Function
        # ... not found"). Such a mode's timed process lowers its steps from the cache instead.
        from_cache = result.get("compile_cache_hits")
        if args.executables and len(builds) == 1 and not from_cache:
            compiled = (zero_accum, grad_step, update_step)
            save_executables(args.executables, built["identity"], compiled, label)
        elif args.executables:
            why = "replanned" if len(builds) > 1 else f"{from_cache} of 3 from the cache"
            _log(label, f"steps not serialized ({why}; the compilation cache has them)")
            Path(args.executables).unlink(missing_ok=True)  # nor are an earlier run's kept
        _log(label, f"compiled in {result['compile_s']:.1f}s")
        return result
    cached, source = result["compile_cache_hits"], result.get("steps_loaded_from")
    how = f" ({cached} of 3 steps loaded from the {source or 'compilation cache'})"
    how = "" if cached is None else how
    _log(label, f"compiled in {result['compile_s']:.1f}s{how}; running")
    del acc

    _TURN.before_steps(label)
    times, started = [], time.perf_counter()
    first = 1 if built["ran_first_step"] and args.warmup else 0  # (a warmup step ran already)
    for i, key in enumerate(keys[first:], start=first):
        t0 = time.perf_counter()
        state, metrics = _train_step((zero_accum, grad_step, update_step), state, batch, key)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    loss = float(metrics["train_loss"])
    result["run_s"] = built["first_step_s"] + time.perf_counter() - started
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite train_loss {loss}")

    result["step_s"] = statistics.median(times)
    result["tokens_per_s"] = B * T / result["step_s"]
    result["peak_bytes"], result["peak_bytes_source"] = _peak_bytes()
    return result


def run_single(args: argparse.Namespace) -> None:
    """Child process: one mode, one JSON line on stdout, errors included in it."""
    mode = args.single_mode
    try:
        result = measure(args, mode)
        result["error"] = None
    except (Exception, MemoryError) as e:  # engine missing, out of memory, ...
        _TURN.announce()  # (failed while importing: the mode before it need not wait)
        _log(_label(args, mode), f"failed: {_error_message(e)}")
        result = {"error": _error_message(e)}
        try:
            if not _TURN.mine:  # failed before its turn: the device is another mode's
                raise RuntimeError
            import jax

            result.update(device=jax.devices()[0].device_kind, backend=jax.default_backend())
        except Exception:
            pass
    result.update(_TURN.fields())
    print(json.dumps(result), flush=True)


def _child_command(args: argparse.Namespace, mode: str) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--model={args.model}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--modes={mode}",
        f"--microbatch={args.microbatch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--dtype={args.dtype}",
        f"--single-mode={mode}",
    ]
    if args.reference_peak_bytes:
        command.append(f"--reference-peak-bytes={args.reference_peak_bytes}")
    if args.memory_limit_gib:
        command.append(f"--memory-limit-gib={args.memory_limit_gib}")
    if getattr(args, "fixed_plan", None):
        command.append(f"--fixed-plan={args.fixed_plan}")
    if getattr(args, "executables", None):
        command.append(f"--executables={args.executables}")
    return command + (["--compile-only"] if args.compile_only else [])


class _ModeProcess:
    """One mode's process (this environment, XLA_FLAGS etc., plus `env`). With `wait`, it
    imports what it needs, creates the file `imported` and then waits (`go`) before it starts
    JAX's backend: the timed pass starts the next mode's process while the current one runs, so
    that its imports are done by the time the device is free; nothing touches the device before
    `go`. With `next_imported`, it waits for that file (the next mode's) before its steps."""

    def __init__(
        self,
        command: list[str],
        env: dict[str, str] | None,
        wait: bool = False,
        imported: str | None = None,
        next_imported: str | None = None,
    ):
        # stderr streams through, so a hard crash (OOM kill, XLA abort) is visible where it
        # happens.
        self.started = time.perf_counter()
        self.wait = wait
        self.went: float | None = None  # when `go` was sent
        env = {**os.environ, **(env or {}), LAUNCHED: repr(time.time())}
        handover = {WAIT: "1" if wait else None, IMPORTED: imported, NEXT_IMPORTED: next_imported}
        for name, value in handover.items():
            env.pop(name, None)  # (not inherited from this environment)
            if value is not None:
                env[name] = value
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if wait else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def go(self) -> None:
        if self.wait and self.went is None:
            self.went = time.perf_counter()
            try:
                self.proc.stdin.write("go\n")
                self.proc.stdin.close()
            except OSError:  # it ended already (its result says why)
                pass

    def result(self) -> dict[str, Any]:
        """Its JSON line, with process_s: the whole process as timed here (start-up, compile,
        steps, exit) less waited_s, the time it waited for `go`; and for a process that
        waited, ahead_s: how long it ran before `go` (its imports, while another mode ran).
        A process that was started ahead but ended before its turn, or without a result, has
        neither (its time on the device is not known)."""
        self.go()
        try:
            stdout = self.proc.stdout.read()  # (stderr streams through; stdin is closed)
            self.proc.wait()
        except BaseException:  # interrupted: it does not outlive its parent
            self.stop()
            raise
        process_s = time.perf_counter() - self.started
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if lines:
            try:
                result = json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
            else:
                waited = result.get("waited_s")
                if self.went is None:
                    return {**result, "process_s": process_s}
                if waited is None:  # it ended before its turn
                    return {**result, "process_s": None}
                result["ahead_s"] = max(0.0, self.went - self.started - waited)
                return {**result, "process_s": process_s - waited}
        if self.proc.returncode < 0:
            why = f"killed by signal {-self.proc.returncode} (out of host memory?)"
        else:
            why = f"exited with status {self.proc.returncode}"
        error = f"benchmark subprocess {why} without a result; see its stderr"
        return {"error": error, "process_s": None if self.went is not None else process_s}

    def stop(self) -> None:
        """Ends it, if it is still running (a parent interrupted or failing)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _cache_env(cache_dir: str | None, compile_pass: bool) -> dict[str, str]:
    """Children's environment. Without `cache_dir`, no persistent compilation cache (not even
    one set in this environment): every compile is cold, as a user's first one. In a run with
    a compile pass, compiling processes allocate GPU memory as they need it (several share the
    device) and each writes its executables to a cache of its own (`cache_dir`), so that no
    compile loads another mode's steps; XLA's autotuning cache is not shared either. The timed
    pass loads them from the merged cache."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if compile_pass else {}
    if cache_dir is None:  # nor one inherited from the environment: compiles are cold
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    else:
        env.update(
            JAX_ENABLE_COMPILATION_CACHE="true",
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="none",
        )
    return env


def _row(result: dict[str, Any]) -> dict[str, Any]:
    row = {
        "mode": None,
        "model": None,
        "batch": None,
        "seq": None,
        "microbatch": None,
        "dtype": None,
        "ghost_strategy": None,
    }
    row.update({k: None for k in RESULT_KEYS})
    row["steps"] = None  # timed steps (null: compile-only)
    row["warmup"] = None
    row["ratio_vs_nonprivate"] = None
    row["ratio_vs_nonprivate_same_dtype"] = None
    row["flops_ratio_vs_nonprivate"] = None
    row["memory_ratio_vs_nonprivate"] = None
    row["cached_compile_s"] = None
    row["setup_s"] = None
    row["import_s"] = None
    row["backend_s"] = None
    row["state_s"] = None
    row["run_s"] = None
    row["failed_load_s"] = None  # serialized steps that loaded but failed their check step
    row["waited_s"] = None  # a timed process started ahead: waiting for the mode before it
    row["ahead_s"] = None  # ... and running (importing) before its turn
    row["next_imports_s"] = None  # waiting before its steps for the next mode's imports
    row["memory_limit_gib"] = None
    row["reference_peak_bytes"] = None  # a plan mode's budget: the non-private XLA estimate
    row["process_s"] = None
    row["compile_jobs"] = None
    row["compile_pass_error"] = None
    row["plan"] = None
    row["error"] = None
    row.update(result)
    return row


Task = tuple[argparse.Namespace, str]  # (a setting: args with model, batch, seq, ...; a mode)


def _key(args: argparse.Namespace, mode: str) -> tuple[str, int, int, str]:
    return (args.model, args.batch, args.seq, mode)


def _reference_mode(mode: str) -> str | None:
    """The non-private mode whose XLA peak estimate is the budget of a plan mode."""
    if GHOST_STRATEGY.get(mode) != "plan":
        return None
    return "nonprivate_bf16" if mode.endswith("_bf16") else "nonprivate"


def _reference(args: argparse.Namespace, mode: str, earlier: list[dict[str, Any]]) -> int | None:
    """A plan mode's budget: the XLA estimate of its setting's non-private row
    (`_reference_mode`) among `earlier`, if any, else --reference-peak-bytes."""
    ref = _reference_mode(mode)
    if ref is None:
        return None
    return next(
        (
            r["estimated_peak_bytes"]
            for r in earlier
            if _key(args, ref) == (r["model"], r["batch"], r["seq"], r["mode"])
            and r["estimated_peak_bytes"]
        ),
        args.reference_peak_bytes,
    )


def _start(
    args: argparse.Namespace, mode: str, reference: int | None, env, **handover
) -> _ModeProcess:
    child = argparse.Namespace(**{**vars(args), "reference_peak_bytes": reference})
    return _ModeProcess(_child_command(child, mode), env, **handover)


def _finish(
    args: argparse.Namespace, mode: str, reference: int | None, process: _ModeProcess
) -> dict[str, Any]:
    return {**_task_row(args, mode, process.result()), "reference_peak_bytes": reference}


def run_one(
    args: argparse.Namespace,
    mode: str,
    earlier: list[dict[str, Any]] = (),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One mode of one setting in its own process, as a table row. A plan mode is budgeted
    against the XLA estimate of its setting's non-private row (`_reference_mode`) among
    `earlier`, if any, else --reference-peak-bytes."""
    _log(_label(args, mode), "starting")
    reference = _reference(args, mode, list(earlier))
    return _finish(args, mode, reference, _start(args, mode, reference, env))


def _task_row(args: argparse.Namespace, mode: str, result: dict[str, Any]) -> dict[str, Any]:
    """A table row of `mode` in the setting `args` with the child's `result`."""
    row = _row({"microbatch": None if mode.startswith("nonprivate") else args.microbatch})
    row.update(result)
    row.update(
        mode=mode,
        model=args.model,
        batch=args.batch,
        seq=args.seq,
        dtype=_mode_dtype(mode, args.dtype),
        ghost_strategy=GHOST_STRATEGY.get(mode),
        steps=None if args.compile_only else args.steps,
        warmup=None if args.compile_only else args.warmup,
        memory_limit_gib=args.memory_limit_gib,
    )
    return row


def _row_key(row: dict[str, Any]) -> tuple:
    """What makes two rows measurements of the same thing (--resume): the setting, the mode,
    its dtype, the microbatch asked for (a plan picks its own), the steps and the memory
    limit."""
    keys = ("model", "batch", "seq", "mode", "dtype", "steps", "warmup", "memory_limit_gib")
    asked = None if row.get("ghost_strategy") == "plan" else row.get("microbatch")
    return (*(row.get(k) for k in keys), asked)


def _task_key(args: argparse.Namespace, mode: str) -> tuple:
    return _row_key(_task_row(args, mode, {}))


def _read_rows(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a file of rows (a line cut short by a killed run is skipped)."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                _log("resume", f"{path}:{number}: not a JSON row (a run cut short?); skipped")
                continue
            if isinstance(row, dict) and "mode" in row:
                rows.append(row)
    return rows


def resumable(tasks: list[Task], out: str) -> list[dict[str, Any]]:
    """The rows in `out` that already measured one of `tasks` (the last one of each), without
    an error, marked "resumed"; a timed row for a timed run, a compile-only row for a
    compile-only run."""
    wanted = {_task_key(args, mode) for args, mode in tasks}
    kept: dict[tuple, dict[str, Any]] = {}
    for row in _read_rows(out) if os.path.exists(out) else []:
        if "steps" not in row:  # written by an older version: not comparable
            continue
        key = _row_key(row)
        timed = row["steps"] is not None
        measured = row.get("step_s") is not None if timed else True
        if key in wanted and row.get("error") is None and measured:
            kept[key] = _row({**row, "resumed": True})  # (the table's note says so)
    return list(kept.values())


def _write(out: str | None, row: dict[str, Any]) -> None:
    if out:  # as each mode ends: a run cut short keeps what it measured
        with open(out, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            cut = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"  # a line cut short
            f.write((b"\n" if cut else b"") + json.dumps(row).encode() + b"\n")


def run_tasks(
    tasks: list[Task],
    out: str | None,
    env: dict[str, str] | None = None,
    compiled: dict[tuple, dict[str, Any]] | None = None,
    earlier: list[dict[str, Any]] = (),
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """The tasks one after the other, each mode alone on the machine. With `compiled` (the
    compile pass's rows), each mode loads its steps (and a plan mode its plan) as the pass
    left them: serialized in `cache_dir` (no tracing or lowering), else from the pass's
    compilation cache (`env`; lowering included). Its compile_s is the pass's,
    cached_compile_s this process's load. A mode the pass failed to compile, or whose steps
    were not all found, is compiled in its timed process, and compile_s is that compile.
    Ratios are taken against the non-private rows among `earlier` (--resume) and those run so
    far. A mode that loads its steps starts its process while the mode before it runs, and
    waits for it to end before it touches the device (its imports are then done: the row's
    waited_s, ahead_s); the mode before it runs no step until those imports are done
    (next_imports_s)."""
    rows: list[dict[str, Any]] = list(earlier)
    first = [None if compiled is None else compiled[_key(args, mode)] for args, mode in tasks]

    def loaded_args(args: argparse.Namespace, mode: str, row) -> tuple | None:
        """A task's arguments and budget if it loads what the compile pass left in `row` (its
        command then depends on no row of this pass), else None."""
        if row is None or row["error"] is not None:
            return None
        args = argparse.Namespace(**vars(args))
        if row.get("plan_choice"):
            args.fixed_plan = json.dumps(row["plan_choice"])
        args.executables = _executables_path(cache_dir, args, mode)
        return args, row["reference_peak_bytes"]  # the budget its plan was chosen for

    loadable = [loaded_args(*task, row) for task, row in zip(tasks, first, strict=True)]

    # The next loadable mode's process starts as this one does and imports while this one
    # sets up (without touching the device: `_ModeProcess`); this one's steps wait for those
    # imports to end (a file in `handover`), the next one for this one to end.
    ahead: tuple[argparse.Namespace, int | None, _ModeProcess] | None = None
    process: _ModeProcess | None = None
    with tempfile.TemporaryDirectory(prefix="jaxdp-bench-handover-") as handover:

        def next_imported(i: int) -> str | None:
            """The file task i+1's process creates once imported, if it is started ahead."""
            if i + 1 < len(tasks) and loadable[i + 1] is not None:
                return os.path.join(handover, f"imported-{i + 1}")
            return None

        try:
            for i, (args, mode) in enumerate(tasks):
                _log(_label(args, mode), "starting")
                if ahead is not None:
                    args, reference, process = ahead
                    ahead = None
                    process.go()
                else:
                    if loadable[i] is not None:
                        args, reference = loadable[i]
                    else:  # compiled in its own process: a plan budgeted against this pass's rows
                        reference = _reference(args, mode, rows)
                    process = _start(args, mode, reference, env, next_imported=next_imported(i))
                if imported := next_imported(i):
                    next_args, next_reference = loadable[i + 1]
                    waiting = _start(
                        next_args,
                        tasks[i + 1][1],
                        next_reference,
                        env,
                        wait=True,
                        imported=imported,
                        next_imported=next_imported(i + 1),
                    )
                    ahead = (next_args, next_reference, waiting)
                row = _finish(args, mode, reference, process)
                if first[i] is not None and first[i]["error"] is not None:
                    row["compile_pass_error"] = first[i]["error"]  # e.g. out of memory (--jobs)
                elif (
                    first[i] is not None and row["error"] is None and row["compile_cache_hits"] == 3
                ):
                    for key in ESTIMATE_KEYS:  # a loaded executable may not report them
                        if row[key] is None:
                            row[key] = first[i][key]
                    row["cached_compile_s"] = row["compile_s"]
                    row["compile_s"] = first[i]["compile_s"]
                    row["compile_jobs"] = first[i]["compile_jobs"]
                rows.append(row)
                add_ratios(rows)  # against the non-private rows run so far
                _write(out, row)
        finally:  # interrupted or failing: no mode's process outlives this one
            for started in (process, ahead and ahead[2]):
                if started is not None:
                    started.stop()
    return rows[len(earlier) :]


COMPILE_ROWS = "compile_rows.jsonl"  # in --cache-dir: the compile pass's rows


def code_version() -> str:
    """A fingerprint of what compiled a --cache-dir's rows: jaxdp's sources and the versions of
    JAX, Flax, Optax, NumPy and ml_dtypes."""
    import hashlib
    from importlib import metadata

    digest = hashlib.sha256()
    # The libraries that shape the traced program, besides jaxdp's sources.
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes"):
        digest.update(f"{name}=={metadata.version(name)};".encode())
    package = Path(importlib.util.find_spec("jaxdp").origin).resolve().parent
    for path in sorted([*package.rglob("*.py"), Path(__file__).resolve()]):
        name = path.relative_to(package.parent) if path.is_relative_to(package) else path.name
        digest.update(str(name).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _name(args: argparse.Namespace, mode: str) -> str:
    """A mode's name in --cache-dir."""
    return f"{args.model}-B{args.batch}-T{args.seq}-{mode}-{_mode_dtype(mode, args.dtype)}"


def _executables_path(cache_dir: str | None, args: argparse.Namespace, mode: str) -> str | None:
    """Where the compile pass serializes a mode's steps (`save_executables`)."""
    if cache_dir is None:
        return None
    return os.path.join(cache_dir, "executables", f"{_name(args, mode)}.pkl")


def _plugin_versions() -> dict[str, str]:
    """The installed JAX backend plugins (CUDA, ROCm) and their versions."""
    from importlib import metadata

    return {
        d.metadata["Name"]: d.version
        for d in metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax_cuda", "jax-rocm"))
    }


# Environment settings of where executables are cached and how memory is allocated: they differ
# between the compile pass and the timed pass, and do not change the compiled program.
_NOT_THE_PROGRAM = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_ENABLE_COMPILATION_CACHE",
    "JAX_PERSISTENT_CACHE_",
    "XLA_PYTHON_CLIENT_",
)


def _cpu_features() -> str:
    """A fingerprint of this CPU's model and instruction-set flags (Linux; else the platform's
    processor name): a CPU backend's executable is native code for them, and host names repeat
    across containers."""
    import hashlib

    try:
        with open("/proc/cpuinfo") as f:
            lines = [x for x in f if x.startswith(("model name", "flags"))]
        text = "".join(sorted(set(lines)))
    except OSError:
        text = platform.processor() or platform.machine()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _executables_identity(
    args: argparse.Namespace, mode: str, microbatch: int | None, strategy
) -> dict[str, Any]:
    """What a mode's serialized steps were compiled for: a timed process loads them only when
    all of it matches its own (the same sources, JAX and plugins, environment settings, host,
    device, setting and plan)."""
    import jax

    identity = {
        "code_version": code_version(),
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "mode": mode,
        "dtype": _mode_dtype(mode, args.dtype),
        "microbatch": microbatch,
        "strategy": strategy,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        # What else changes the program: the backend's and plugin's versions, XLA's and JAX's
        # settings from the environment, and (a CPU's executable is native code) the host.
        "platform_version": jax.devices()[0].client.platform_version,
        "plugins": _plugin_versions(),
        "environment": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("XLA_", "JAX_")) and not k.startswith(_NOT_THE_PROGRAM)
        },
        "host": platform.node(),
        "cpu": _cpu_features(),
    }
    return json.loads(json.dumps(identity))  # tuples as lists, as when read back


def save_executables(path: str, identity: dict[str, Any], compiled: tuple, label: str) -> None:
    """Writes a mode's three compiled steps (`jax.experimental.serialize_executable`) with their
    `identity`, so that its timed process neither traces, lowers nor compiles them. A step that
    cannot be serialized leaves no file (the timed process then loads the compilation cache)."""
    import pickle

    from jax.experimental import serialize_executable

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        steps = [serialize_executable.serialize(c) for c in compiled]
        blob = pickle.dumps({"identity": identity, "steps": steps})
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)  # a killed writer leaves no half file under the name
    except Exception as e:  # a backend without serialization, a full disk: the shortcut is
        _log(label, f"steps not serialized ({_error_message(e)})")  # lost, not the compile
        Path(path).unlink(missing_ok=True)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_executables(path: str, identity: dict[str, Any], label: str) -> tuple | None:
    """The three steps `save_executables` wrote for this `identity`, or None (nothing there,
    written for something else, or not loadable: then the steps are lowered and compiled, from
    the compilation cache where it has them). Only for files this script wrote: unpickling runs
    code, as loading any compiled executable does."""
    import pickle

    from jax.experimental import serialize_executable

    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
        if saved["identity"] != identity:
            keys = set(identity) | set(saved["identity"])
            differ = sorted(k for k in keys if saved["identity"].get(k) != identity.get(k))
            _log(label, f"serialized steps were compiled for another {', '.join(differ)}")
            return None
        return tuple(serialize_executable.deserialize_and_load(*step) for step in saved["steps"])
    except Exception as e:
        _log(label, f"serialized steps not loaded ({_error_message(e)}); compiling")
        return None


def compile_pass(
    tasks: list[Task],
    jobs: int,
    cache_dir: str | None = None,
    out: str | None = None,
    earlier: list[dict[str, Any]] = (),
) -> dict[tuple, dict[str, Any]]:
    """Compiles every task (`--compile-only` children, `jobs` at a time); a plan mode waits
    for its setting's non-private row (its memory budget; or takes it from `earlier`). Larger
    settings start first. With `cache_dir`, the executables end up in cache_dir/merged (each
    child writes its own cache first), each mode's serialized steps in cache_dir/executables
    and the rows in cache_dir/compile_rows.jsonl; a task
    compiled there before (a row without error, by the same code, and a plan budgeted against
    its non-private row) is not compiled again. `out` gets each row as it is done."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    keys = {_key(args, mode) for args, mode in tasks}
    if len(keys) != len(tasks):
        raise ValueError("compile_pass: a (setting, mode) task is given twice")
    done: dict[tuple, dict[str, Any]] = {}
    version = None if cache_dir is None else code_version()
    if cache_dir is not None and os.path.exists(os.path.join(cache_dir, COMPILE_ROWS)):
        for row in _read_rows(os.path.join(cache_dir, COMPILE_ROWS)):
            if row.get("error") is None and row.get("code_version") == version:
                done[_row_key(row)] = _row(row)
    rows: dict[tuple, dict[str, Any]] = {}
    for args, mode in tasks:
        row = done.get(_task_key(argparse.Namespace(**{**vars(args), "compile_only": True}), mode))
        ref = _reference_mode(mode)
        if row is not None and ref and row["reference_peak_bytes"] is None:
            # Planned without its budget (its non-private compile had failed): plan again.
            row = None if _key(args, ref) in keys else row
        if row is not None:
            _log(_label(args, mode), f"compiled earlier in {cache_dir}: not compiled again")
            rows[_key(args, mode)] = row
    earlier = [*earlier, *rows.values()]
    tasks = [(args, mode) for args, mode in tasks if _key(args, mode) not in rows]
    # Non-private modes first (plans wait on them), then by model size, longest compiles first.
    size = {m: i for i, m in enumerate(MODELS)}
    order = sorted(
        tasks,
        key=lambda t: (
            not t[1].startswith("nonprivate"),
            -size[t[0].model],
            -t[0].batch * t[0].seq,
        ),
    )
    futures: dict[tuple, Any] = {}
    finished: list[dict[str, Any]] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def own_cache(args: argparse.Namespace, mode: str) -> str | None:
        return None if cache_dir is None else os.path.join(cache_dir, "modes", _name(args, mode))

    def work(args: argparse.Namespace, mode: str) -> dict[str, Any]:
        try:
            ref = _reference_mode(mode)
            dependency = futures.get(_key(args, ref)) if ref else None
            known = list(earlier) if dependency is None else [dependency.result()]
            child = argparse.Namespace(**{**vars(args), "compile_only": True})
            child.executables = _executables_path(cache_dir, args, mode)
            cache = own_cache(args, mode)
            row = run_one(child, mode, known, _cache_env(cache, compile_pass=True))
        except Exception as e:  # a bug here must not lose the other rows
            row = _task_row(args, mode, {"error": _error_message(e)})
        row["compile_jobs"] = jobs
        row["code_version"] = version
        with lock:
            finished.append(row)
            _log(
                _label(args, mode),
                f"compile pass: {len(finished)} of {len(tasks)} done, "
                f"{time.perf_counter() - t0:.0f} s",
            )
            if out:
                add_ratios(finished)
                _write(out, row)
            if cache_dir is not None:
                _write(os.path.join(cache_dir, COMPILE_ROWS), row)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for args, mode in order:  # a dependency is always submitted first
            futures[_key(args, mode)] = pool.submit(work, args, mode)
        rows.update({key: future.result() for key, future in futures.items()})
    if finished:  # where this pass's time went, summed over its processes (run `jobs` at once)
        total = lambda key: sum(r.get(key) or 0.0 for r in finished)
        _log(
            "compile pass",
            f"{len(finished)} modes in {time.perf_counter() - t0:.0f} s; their processes, "
            f"summed: {total('process_s'):.0f} s, of which setup {total('setup_s'):.0f} s "
            f"(imports {total('import_s'):.0f}, backend {total('backend_s'):.0f}, model and "
            f"state {total('state_s'):.0f}) and compiling {total('compile_s'):.0f} s",
        )
    if cache_dir is not None:  # every mode's cache, also those of a run cut short before this
        merged, modes = os.path.join(cache_dir, "merged"), os.path.join(cache_dir, "modes")
        os.makedirs(merged, exist_ok=True)
        for name in sorted(os.listdir(modes)) if os.path.isdir(modes) else []:
            shutil.copytree(os.path.join(modes, name), merged, dirs_exist_ok=True)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the non-private rows of its setting (model, B, T, device): step time against
    float32 and against its own dtype, FLOPs and XLA's peak estimate against its own dtype."""

    def ok(r):
        return r is not None and r["error"] is None

    for r in rows:
        if not ok(r):
            continue
        where = ("model", "batch", "seq", "device")  # a resumed run may mix devices
        setting = [x for x in rows if all(x.get(k) == r.get(k) for k in where)]
        base = {x["dtype"]: x for x in setting if x["mode"].startswith("nonprivate") and ok(x)}
        fp32 = next((x for x in setting if x["mode"] == "nonprivate" and ok(x)), None)
        if ok(fp32) and fp32["step_s"] and r["step_s"]:
            r["ratio_vs_nonprivate"] = fp32["step_s"] / r["step_s"]
        same = base.get(r["dtype"])
        if not ok(same):
            continue
        if same["step_s"] and r["step_s"]:
            r["ratio_vs_nonprivate_same_dtype"] = same["step_s"] / r["step_s"]
        if same["grad_step_flops"] and r["grad_step_flops"]:
            r["flops_ratio_vs_nonprivate"] = same["grad_step_flops"] / r["grad_step_flops"]
        if same["estimated_peak_bytes"] and r["estimated_peak_bytes"]:
            r["memory_ratio_vs_nonprivate"] = (
                r["estimated_peak_bytes"] / same["estimated_peak_bytes"]
            )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table of a suite's (or one setting's) rows."""

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    parallel = {r["compile_jobs"] for r in rows if (r.get("compile_jobs") or 1) > 1}
    jobs = f" ({max(parallel)} at once)" if parallel else ""
    head = (
        "| model | B | T | mode | dtype | M | tokens/s | vs non-private fp32 | vs non-private "
        "same dtype | peak GiB | XLA est. GiB (vs non-private) | FLOPs vs non-private | "
        f"compile s{jobs} | note |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        est = gib(r.get("estimated_peak_bytes"))
        mem = r.get("memory_ratio_vs_nonprivate")
        est_text = "-" if est is None else f"{est:.1f}" + ("" if mem is None else f" ({mem:.2f}x)")
        note = r["error"] or r.get("plan") or ""
        extra = []
        if r.get("resumed"):
            extra.append("kept from an earlier run (--resume)")
        if r.get("compile_pass_error"):
            extra.append(f"compile pass failed ({r['compile_pass_error']}); compiled alone")
        elif r["step_s"] and r.get("compile_cache_hits") not in (None, 3):
            extra.append("not found in the compile pass's cache; compiled alone")
        note = "; ".join([note] * bool(note) + extra)
        out.append(
            f"| {r['model']} | {r['batch']} | {r['seq']} | {r['mode']} | {r['dtype']} | "
            f"{f(r['microbatch'], 'd')} | {f(r['tokens_per_s'], ',.0f')} | "
            f"{f(r['ratio_vs_nonprivate'], '.3f')} | "
            f"{f(r.get('ratio_vs_nonprivate_same_dtype'), '.3f')} | "
            f"{f(gib(r['peak_bytes']), '.1f')} | {est_text} | "
            f"{f(r['flops_ratio_vs_nonprivate'], '.3f')} | {f(r['compile_s'], '.0f')} | "
            f"{note.replace('|', '/')} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.single_mode is not None:
        run_single(args)
        return 0

    t0 = time.perf_counter()
    if args.suite is not None:
        settings = SUITES[args.suite]
        tasks: list[Task] = []
        for modes in SUITE_PASSES:
            for model, batch, seq, microbatch in settings:
                setting = argparse.Namespace(**{**vars(args), "model": model, "batch": batch})
                setting.seq, setting.microbatch = seq, microbatch
                tasks += [(setting, mode) for mode in modes]
    else:
        tasks = [(args, mode) for mode in args.modes]
    jobs = args.jobs
    where = "suite" if args.suite else args.model
    kept = resumable(tasks, args.out) if args.resume else []
    if args.resume:
        done = {_row_key(r) for r in kept}
        tasks = [(a, m) for a, m in tasks if _task_key(a, m) not in done]
        _log(where, f"--resume: {len(kept)} rows kept from {args.out}, {len(tasks)} to run")

    if not tasks:
        rows = []
        how = "nothing left to run"
    elif jobs == 1:  # every mode compiles (and runs) in its own process, one after the other
        rows = run_tasks(tasks, args.out, _cache_env(None, compile_pass=False), earlier=kept)
        how = "each compiled alone"
    elif args.compile_only:
        compiled = compile_pass(tasks, jobs, out=args.out, earlier=kept)
        rows = [compiled[_key(a, m)] for a, m in tasks]
        how = f"compiled {jobs} at a time"
    else:
        _log(where, f"compile pass: {jobs} modes at a time")
        with tempfile.TemporaryDirectory(prefix="jaxdp-compile-cache-") as temporary:
            cache = args.cache_dir or temporary
            compiled = compile_pass(tasks, jobs, cache_dir=cache, earlier=kept)
            t1 = time.perf_counter()
            _log(where, "timed pass: one mode at a time")
            merged = _cache_env(os.path.join(cache, "merged"), compile_pass=False)
            rows = run_tasks(tasks, args.out, merged, compiled, earlier=kept, cache_dir=cache)
            t2 = time.perf_counter()
        total = lambda key: sum(r.get(key) or 0.0 for r in rows)
        setup, run, waits = total("setup_s"), total("run_s"), total("next_imports_s")
        # (a failed mode's row has no setup_s: nor does its ahead_s count here)
        ahead = sum(r.get("ahead_s") or 0.0 for r in rows if r.get("setup_s") is not None)
        loading = sum((r["cached_compile_s"] or r["compile_s"] or 0.0) for r in rows)
        how = (
            f"compile s: a cold compile, {jobs} modes compiling at once; compile pass "
            f"{t1 - t0:.0f} s, timed pass {t2 - t1:.0f} s, of "
            f"which the modes' setup {setup - ahead:.0f} s (imports {total('import_s'):.0f}, "
            f"{ahead:.0f} of them while the mode before ran; backend "
            f"{total('backend_s'):.0f}, model and state "
            f"{total('state_s'):.0f}), loading (or compiling) their steps "
            f"{loading:.0f} s, waiting for the next mode's imports {waits:.0f} s, running "
            f"them {run:.0f} s and the rest (estimates, exit) "
            f"{t2 - t1 - (setup - ahead) - loading - waits - run:.0f} s"
        )
    ran = len(rows)
    rows = kept + rows
    if args.suite is not None:
        order = {s[:3]: i for i, s in enumerate(settings)}
        rows.sort(
            key=lambda r: (order[(r["model"], r["batch"], r["seq"])], SUITE_MODES.index(r["mode"]))
        )
    else:
        rows.sort(key=lambda r: args.modes.index(r["mode"]))
    add_ratios(rows)  # against every non-private row, also those that ran after a mode

    devices = sorted({r["device"] for r in rows if r["device"]})
    device = " and ".join(devices) or "?"
    if len(devices) > 1:  # e.g. --resume on another machine
        _log(where, f"WARNING: rows from different devices ({device}); ratios are within one")
    counted = f"{ran} modes" + (f" (and {len(kept)} kept from {args.out})" if kept else "")
    print(
        f"\n{counted} on {device} in {time.perf_counter() - t0:.0f} s "
        f"({'compile only' if args.compile_only else f'{args.steps} timed steps each'}; "
        f"{how}):\n",
        file=sys.stderr,
    )
    print(markdown_table(rows), file=sys.stderr, flush=True)
    print("\n".join(json.dumps(r) for r in rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
