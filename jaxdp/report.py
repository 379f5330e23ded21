"""The run's plots: `report.png` (publishable) and `private/report.png` (noise-free diagnostics).

Figures are built as `matplotlib.figure.Figure` objects, without pyplot and without touching
matplotlib's global backend, so that a notebook's inline plots keep working.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from jaxdp.tracking import PRIVATE, PUBLIC, read_metrics


def plot_public(
    metrics_path: str | Path,
    out_path: str | Path,
    *,
    title: str = "",
    target_epsilon: float | None = None,
) -> Path:
    """Eval loss (held-out data) and epsilon against steps, and (DP runs) the noisy gradient
    statistics: the SNR estimated from the noisy sum and the adaptive clip norm(s). All are
    covered by the run's epsilon."""
    records = read_metrics(metrics_path, PUBLIC)
    dp_stats = any(r.get("snr_estimate") is not None for r in records)
    fig = Figure(figsize=(16 if dp_stats else 11, 4))
    axes = fig.subplots(1, 3 if dp_stats else 2)
    ax_loss, ax_eps = axes[0], axes[1]
    if dp_stats:
        _plot_dp_gradients(axes[2], records)
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["eval_loss"] for r in evals], "o-", label="eval loss (held out)")
        ax_loss.legend()
    else:
        ax_loss.text(0.5, 0.5, "no evaluation data", ha="center", va="center")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.grid(alpha=0.3)
    _plot_epsilon(ax_eps, records, target_epsilon)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_private(
    metrics_path: str | Path,
    public_metrics_path: str | Path,
    out_path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Noise-free training diagnostics (NOT covered by epsilon) beside the eval loss."""
    records = read_metrics(metrics_path, PRIVATE)
    public = read_metrics(public_metrics_path, PUBLIC)
    diagnostics = any(r.get("norm_p50") is not None for r in records)
    fig = Figure(figsize=(16 if diagnostics else 11, 4))
    axes = fig.subplots(1, 3 if diagnostics else 2)
    ax_loss, ax_clip = axes[0], axes[1]
    if diagnostics:
        _plot_diagnostics(axes[2], records)
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["train_loss"] for r in records], label="train loss (noise-free)")
    evals = [r for r in public if r.get("eval_loss") is not None]
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if any(r.get("clip_fraction") is not None for r in records):
        ax_clip.plot(steps, [r.get("clip_fraction") for r in records], color="tab:purple")
        ax_clip.set_ylim(-0.02, 1.02)
    ax_clip.set_xlabel("step")
    ax_clip.set_ylabel("fraction of examples clipped")
    ax_clip.grid(alpha=0.3)
    fig.suptitle(
        f"{title}\nPRIVATE: computed from the training data without noise, NOT covered by "
        f"epsilon. Do not publish."
    )
    fig.tight_layout()
    return _save(fig, out_path)


def _plot_dp_gradients(ax, records: list[dict]) -> None:
    """SNR estimated from the noisy sum; adaptive clipping's clip norm (or the thresholds'
    root mean square, per layer) on a second axis."""
    snr = [(r["step"], r["snr_estimate"]) for r in records if r.get("snr_estimate") is not None]
    if snr:
        ax.plot(*zip(*snr, strict=True), color="tab:green", label="SNR (noisy estimate)")
    ax.set_xlabel("step")
    ax.set_ylabel("||clipped sum|| / (sigma C sqrt(d))")
    ax.grid(alpha=0.3)
    clip = [
        (r["step"], r["clip_norm"] if "clip_norm" in r else _rms(r["clip_thresholds"]))
        for r in records
        if r.get("clip_norm") is not None or r.get("clip_thresholds") is not None
    ]
    if clip:
        per_layer = "clip_norm" not in next(r for r in records if r.get("step") == clip[0][0])
        twin = ax.twinx()
        twin.plot(*zip(*clip, strict=True), color="tab:orange", label="clip norm")
        twin.set_ylabel("per-layer threshold (rms)" if per_layer else "adaptive clip norm C_t")
    ax.set_title("DP releases (covered by epsilon)")
    ax.legend(loc="upper left")


def _rms(values: list[float]) -> float:
    return (sum(v * v for v in values) / len(values)) ** 0.5


def _plot_diagnostics(ax, records: list[dict]) -> None:
    """Noise-free: per-unit gradient norm quantiles and m-coherence."""
    steps = [r["step"] for r in records if r.get("norm_p50") is not None]
    for q, style in (("50", "-"), ("90", "--"), ("99", ":")):
        values = [r[f"norm_p{q}"] for r in records if r.get("norm_p50") is not None]
        ax.plot(steps, values, style, color="tab:blue", label=f"grad norm p{q}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("per-unit gradient norm")
    ax.grid(alpha=0.3)
    coherence = [(r["step"], r["m_coherence"]) for r in records if r.get("m_coherence")]
    if coherence:
        twin = ax.twinx()
        twin.plot(*zip(*coherence, strict=True), color="tab:red", label="m-coherence")
        twin.set_ylabel("m-coherence ||sum g||^2 / sum ||g||^2")
    ax.legend(loc="upper left")


def _plot_epsilon(ax, records: list[dict], target_epsilon: float | None) -> None:
    eps = [(r["step"], r["epsilon"]) for r in records if r.get("epsilon") is not None]
    if not eps:
        ax.text(0.5, 0.5, "no privacy guarantee: no epsilon", ha="center", va="center")
    else:
        approx = any(r.get("epsilon_is_approximate") for r in records)
        ax.plot(*zip(*eps, strict=True), color="tab:red", label="epsilon spent")
        if target_epsilon is not None:
            ax.axhline(target_epsilon, color="gray", ls="--", label="target epsilon")
        ax.set_ylabel("epsilon (APPROXIMATE)" if approx else "epsilon")
        ax.set_title(f"delta = {records[-1]['delta']:.3g}")
        ax.legend()
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _save(fig: Figure, out_path: str | Path) -> Path:
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    return out


def model_card(record: dict, *, base_model: str | None = None) -> str:
    """A Hugging Face model card (README.md) stating the model's privacy guarantee, from the
    run's privacy record (`PrivacyPlan.record`): the same numbers as privacy.json."""
    front = ["---", "library_name: transformers", "tags:", "- differential-privacy", "- dp-sgd"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = [*front, "", "# A GPT-2 fine-tuned with differential privacy (jaxdp)", ""]
    eps, per = record.get("epsilon"), record.get("epsilon_per", "example")
    if eps is None:
        lines += [
            f"**No differential-privacy guarantee**: {record['guarantee']}.",
            "",
            f"Trained for {record['steps']} steps on {record['num_examples']} examples.",
        ]
        return "\n".join(lines) + "\n"
    approx = (
        " (APPROXIMATE: batches were not Poisson-sampled)"
        if record["epsilon_is_approximate"]
        else ""
    )
    lines += [
        f"**(ε, δ) = ({eps:.4g}, {record['delta']:.3g}) per {per}**{approx}, "
        f"for the trained weights and everything computed from them.",
        "",
        "| | |",
        "| --- | --- |",
        f"| privacy unit | {record['privacy_unit']} |",
        f"| neighbouring datasets | {record['neighbouring_relation']} |",
        f"| mechanism | {record['guarantee']}: DP-SGD, {record['steps']} steps, sampling "
        f"probability {record['sampling_prob']:.4g}, noise multiplier "
        f"{record['noise_multiplier']:.4g}, clip norm {record['l2_clip_norm']:g} |",
        f"| accountant | {record['accountant']} (Google's dp-accounting) |",
        f"| randomness | {record['randomness']} |",
        f"| public parameters | {record['public_parameters']} |",
    ]
    if record.get("group_privacy"):
        lines += ["", f"**Note**: {record['group_privacy']}."]
    lines += ["", f"Not covered: {record['not_covered']}."]
    return "\n".join(lines) + "\n"
