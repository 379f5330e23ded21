"""Audit a DP training configuration with canaries: exposure and a one-run epsilon lower bound.

    jaxdp audit --config configs/tiny_offline.py --workdir runs/audit \
        --num-canaries 64 --candidates 100

(`python scripts/audit.py ...` is the same command.)

Trains the config twice on the same data plus canaries — once as configured (DP) and once with
dp.enabled=False — each canary ("My secret code is 482915.", random digits) included
independently with probability 1/2, as its own training example, `--repeats` times. Then:

- exposure of every canary (rank among `--candidates` random secrets of the same format);
- the one-run membership-inference lower bound on epsilon (Steinke, Nasr & Jagielski 2023, as
  implemented by jax_privacy's auditing module) with its confidence, scoring canaries by loss;
- a check that the DP run's lower bound does not exceed its reported epsilon (for repeats > 1,
  the group-privacy epsilon). A violation is a bug: the script then exits with status 1.

Writes W/audit.json and W/audit.png (exposure of included canaries, DP vs non-private).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jaxdp import audit, checkpoint
from jaxdp import run as run_lib
from jaxdp.config import load_config_file, to_settings
from jaxdp.data import load_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg]")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--num-canaries", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="copies of each included canary")
    p.add_argument("--candidates", type=int, default=100, help="random secrets per exposure")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.num_steps=100 (repeatable)",
    )
    args = p.parse_args(argv)
    if args.num_canaries < 4 or args.candidates < 1 or args.repeats < 1:
        p.error("need --num-canaries >= 4, --candidates >= 1, --repeats >= 1")
    return args


def load_config(args):
    path, _, arg = args.config.partition(":")
    cfg = load_config_file(path, arg or None)
    for item in args.set:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        current, parsed = getattr(node, leaf), json.loads(value)
        node[leaf] = type(current)(parsed) if None not in (current, parsed) else parsed
    cfg.train.progress = False
    return cfg


def audit_run(model, secret_blocks, included, candidate_blocks, delta, confidence):
    losses = audit.example_losses(model, secret_blocks)
    cand_losses = audit.example_losses(model, candidate_blocks)
    exposures = [audit.exposure(float(loss), cand_losses) for loss in losses]
    exp = np.array([e for _, e in exposures])
    return {
        "canaries": [
            {"loss": float(loss), "included": bool(inc), "rank": rank, "exposure": e}
            for loss, inc, (rank, e) in zip(losses, included, exposures, strict=True)
        ],
        "mean_exposure_included": float(np.mean(exp[included])),
        "mean_exposure_excluded": float(np.mean(exp[~included])),
        **audit.one_run_epsilon_lower_bound(losses[included], losses[~included], delta, confidence),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
    rng = np.random.default_rng(args.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    T = cfg.data.block_size
    n = args.num_canaries
    secrets = audit.random_secrets(n, rng)
    included = rng.random(n) < 0.5
    blocks = np.stack([audit.canary_block(tokenizer, audit.TEMPLATE.format(s), T) for s in secrets])
    inserted = np.repeat(blocks[included], args.repeats, axis=0)
    candidates = np.stack(
        [
            audit.canary_block(tokenizer, audit.TEMPLATE.format(s), T)
            for s in audit.random_secrets(args.candidates, rng)
        ]
    )

    report = {
        "method": "exposure (Carlini et al. 2019); one-run audit (Steinke, Nasr & Jagielski "
        "2023) by jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run (one-sided, "
        "Bonferroni over thresholds), canaries scored by loss",
        "num_canaries": n,
        "num_included": int(included.sum()),
        "repeats": args.repeats,
        "candidates": args.candidates,
        "confidence": args.confidence,
        "runs": {},
    }
    for name, dp_enabled in (("dp", cfg.dp.enabled), ("nonprivate", False)):
        run_cfg = cfg.copy_and_resolve_references()
        run_cfg.dp.enabled = dp_enabled
        run_cfg = to_settings(run_cfg)
        workdir = args.workdir / name
        summary = run_lib.run(run_cfg, workdir, extra_train_blocks=inserted)
        model, _ = checkpoint.load_model_from_workdir(workdir)
        # (A non-private run states no delta: the audit's bound uses the DP run's default.)
        eps = summary["epsilon"]
        delta = summary.get("delta") or 1 / (10 * summary["num_examples"])
        group_eps, group_delta = (
            (None, None) if eps is None else audit.group_privacy(eps, delta, args.repeats)
        )
        audit_delta = min(1.0, group_delta if group_delta is not None else delta)
        result = audit_run(model, blocks, included, candidates, audit_delta, args.confidence)
        result.update(
            reported_epsilon=eps,
            delta=delta,
            group_epsilon=group_eps,
            group_delta=group_delta,
            epsilon_is_approximate=summary["epsilon_is_approximate"],
        )
        report["runs"][name] = result
        print(
            f"{name}: exposure in/out {result['mean_exposure_included']:.2f}/"
            f"{result['mean_exposure_excluded']:.2f} bits, AUROC {result['auroc']:.2f}, "
            f"epsilon >= "
            f"{result['epsilon_lower_bound']:.3f} ({args.confidence:.0%} confidence), "
            f"reported {eps}",
            file=sys.stderr,
        )

    dp = report["runs"]["dp"]
    violated = (
        dp["group_epsilon"] is not None
        and not dp["epsilon_is_approximate"]
        and dp["epsilon_lower_bound"] > dp["group_epsilon"]
    )
    report["lower_bound_exceeds_reported_epsilon"] = violated
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, args.workdir / "audit.png")
    print(
        json.dumps(
            {k: report[k] for k in ("num_canaries", "num_included", "repeats")}
            | {
                f"{name}_{key}": r[key]
                for name, r in report["runs"].items()
                for key in ("mean_exposure_included", "epsilon_lower_bound", "reported_epsilon")
            }
        )
    )
    if violated:
        print("BUG: the audited lower bound exceeds the reported epsilon.", file=sys.stderr)
        return 1
    return 0


def _plot(report, path):
    fig = Figure(figsize=(7, 4))  # no pyplot: the global matplotlib backend is left alone
    ax = fig.subplots()
    top = math.log2(report["candidates"] + 1)
    bins = np.linspace(0, top, 21)
    for name, run in report["runs"].items():
        values = [c["exposure"] for c in run["canaries"] if c["included"]]
        eps = run["reported_epsilon"]
        label = f"{name} (eps={eps:.2g})" if eps is not None else name
        ax.hist(values, bins=bins, alpha=0.6, label=label)
    ax.set_xlabel("exposure of included canaries (bits)")
    ax.set_ylabel("canaries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
