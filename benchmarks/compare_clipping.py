"""Fixed vs adaptive clipping, flat vs per-layer (fused), at several epsilons: one markdown table.

    python benchmarks/compare_clipping.py --steps 150 --epsilons 3 8 --out runs/clipping.md

Trains `configs/tiny_offline.py` (a tiny random GPT-2 on WikiText-2 valid, evaluated on the
first 64 blocks of WikiText-2 test, expected batch 32) once per (epsilon, variant), with the
same steps, learning rate and initial clip norm C = 1:

    fixed flat            dp.clipping="flat", C fixed, vmap engine
    adaptive flat         dp.adaptive (median of the per-example norms), vmap engine
    adaptive per-layer    dp.clipping="per_layer", dp.adaptive, the fused engine

and reports the final eval perplexity (exp of the eval loss), the median wall time of a step
(after the first 3, leaving out steps that evaluated) and the final clip norm. Each run lives in
--workdir/<epsilon>-<variant> (existing ones are reused as they are).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fixed flat": {"dp.engine": "vmap", "dp.clipping": "flat", "dp.adaptive.enabled": False},
    "adaptive flat": {"dp.engine": "vmap", "dp.clipping": "flat", "dp.adaptive.enabled": True},
    "adaptive per-layer (fused)": {
        "dp.engine": "fused",
        "dp.clipping": "per_layer",
        "dp.adaptive.enabled": True,
    },
}


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def one_run(epsilon: float, variant: str, args) -> dict:
    from jaxdp import run as run_lib
    from jaxdp.config import load_config_file, to_settings

    cfg = load_config_file(str(REPO / "configs" / "tiny_offline.py"))
    cfg.dp.target_epsilon = epsilon
    cfg.train.num_steps = args.steps
    cfg.train.eval_every = args.steps
    cfg.train.checkpoint_every = args.steps
    cfg.train.log_every = 10
    cfg.train.progress = False
    for k, v in VARIANTS[variant].items():
        _set(cfg, k, v)
    workdir = args.workdir / f"eps{epsilon:g}-{variant.split()[0]}-{variant.split()[1]}"
    times: list[tuple[int, float]] = []
    evals: set[int] = set()

    def timer(event) -> None:
        if event.kind == "step":
            times.append((event.step, time.perf_counter()))
        elif event.kind == "eval":
            evals.add(event.step)

    summary = run_lib.run(to_settings(cfg), workdir, callbacks=[timer])
    intervals = [
        t1 - t0
        for (s0, t0), (s1, t1) in zip(times, times[1:], strict=False)
        if s1 > 3 and s1 not in evals
    ]
    public = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in public if r.get("public/eval_loss") is not None][-1]
    last = public[-1]
    clip = last.get("public/clip_norm")
    thresholds = last.get("public/clip_thresholds")
    return {
        "epsilon": summary["epsilon"],
        "variant": variant,
        "eval_perplexity": math.exp(last_eval["public/eval_loss"]),
        "step_ms": 1000 * statistics.median(intervals) if intervals else None,
        "final_clip": clip
        if clip is not None
        else (
            f"rms {math.sqrt(sum(x * x for x in thresholds) / len(thresholds)):.3g} over "
            f"{len(thresholds)} groups"
            if thresholds
            else 1.0
        ),
        "steps": summary["steps"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "compare_clipping")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    rows = [one_run(e, v, args) for e in args.epsilons for v in VARIANTS]
    lines = [
        "| target ε | clipping | ε spent | eval perplexity | step (ms) | final clip norm |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for target, r in zip([e for e in args.epsilons for _ in VARIANTS], rows, strict=True):
        clip = r["final_clip"]
        clip = f"{clip:.3g}" if isinstance(clip, float) else clip
        lines.append(
            f"| {target:g} | {r['variant']} | {r['epsilon']:.3f} | {r['eval_perplexity']:.1f} | "
            f"{r['step_ms']:.0f} | {clip} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
