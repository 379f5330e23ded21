"""`report.png`: training/eval loss and epsilon against steps, from `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(metrics_path: str | Path, out_path: str | Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["train_loss"] for r in records], label="train loss")
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    eps = [(r["step"], r["epsilon"]) for r in records if r.get("epsilon") is not None]
    if eps:
        approx = any(r.get("epsilon_is_approximate") for r in records)
        ax_eps.plot(*zip(*eps, strict=True), color="tab:red")
        ax_eps.set_ylabel("epsilon (APPROXIMATE)" if approx else "epsilon")
        ax_eps.set_title(f"delta = {records[-1]['delta']:.3g}")
    else:
        ax_eps.text(0.5, 0.5, "non-private run: no epsilon", ha="center", va="center")
    ax_eps.set_xlabel("step")
    ax_eps.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
