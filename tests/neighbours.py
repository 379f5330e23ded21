"""The neighbouring-dataset harness: run the same thing on D, D + x and D - x with the SAME
secrets, then compare every publishable byte.

An adversary reads every released file, knows every training example but one, and reruns our
code. So whatever a run releases must be (`jaxdp.release.Source`):

- SETTING: identical on the three datasets;
- PUBLIC_N: exactly what the plan built from the settings and that dataset's number of units N
  gives (N counted here, by brute force, not by the library's loaders);
- NOISED: a function of the released model (recomputed here from hf/ on the public eval data)
  or a per-step release of the noise transform, present at the same steps in all three runs.

Renderings (report.png, the model card, tensorboard/) must equal a re-rendering from the
released fields, and nothing else may be released: the same files, with the same modification
times, on the three datasets. Reuse `run_trainer_on_neighbours` and `check_run_release` for any
new output of a run; `compare_fields` for any record (the service's job results).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import optax
from conftest import REPO

from jaxdp import builders, data, evaluators, randomness, release
from jaxdp import run as run_lib
from jaxdp.config import to_settings
from jaxdp.release import PRIVACY_FIELDS, Source
from jaxdp.workdir import Workdir

NAMES = ("D", "D+x", "D-x")
SEED = 1234  # the same secrets for the three runs (dp.noise_seed)

# ---- Datasets ---------------------------------------------------------------------------------

WORDS = (REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt").read_text().split()


def _text(i: int, words: int) -> str:
    start = (i * 37) % (len(WORDS) - words)
    return " ".join(WORDS[start : start + words])


def neighbour_texts(unit: str, n: int = 40) -> dict[str, list[str]]:
    """The lines of D (n short records: each under one block of 16 tokens), D + x (x a long
    record, a user with several records, or more text for blocks) and D - x (D without its last
    unit), as JSONL lines for user units."""
    if unit == "user":
        records = [{"text": _text(i, 6), "user_id": i // 2} for i in range(n)]
        x = [{"text": _text(n + j, 30), "user_id": "newcomer"} for j in range(3)]
        minus = [r for r in records if r["user_id"] != records[-1]["user_id"]]
        rows = {"D": records, "D+x": records + x, "D-x": minus}
        return {name: [json.dumps(r) for r in records] for name, records in rows.items()}
    lines = [_text(i, 6) for i in range(n if unit == "record" else 4 * n)]
    x = [_text(n, 60)] if unit == "record" else [_text(n + j, 40) for j in range(4)]
    return {"D": lines, "D+x": lines + x, "D-x": lines[:-1] if unit == "record" else lines[:-8]}


def count_units(path: Path, unit: str, tokenizer, block_size: int) -> int:
    """N by brute force (one text at a time), independently of jaxdp.data's loaders."""
    if unit == "user":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ids = {(type(r["user_id"]).__name__, json.dumps(r["user_id"])) for r in rows}
        return len(ids)
    lines = path.read_text().splitlines()
    if unit == "record":
        return sum(1 for line in lines if line.strip())
    tokens = sum(
        len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"]) for line in lines
    )
    return tokens // block_size


# ---- Running ----------------------------------------------------------------------------------


def configure(cfg, unit: str, train: Path, public_eval: Path):
    """`cfg` reading `train` with privacy `unit`, evaluating on `public_eval`, with the
    harness's shared secrets."""
    cfg.dp.noise_seed = SEED
    cfg.data.privacy_unit = unit
    cfg.data.source = "jsonl" if unit == "user" else "text_files"
    cfg.data.train_files = (str(train),)
    cfg.data.eval_files = (str(public_eval),)
    if unit != "block" and cfg.data.max_blocks_per_unit == 1 and cfg.dp.engine == "vmap":
        cfg.data.max_blocks_per_unit = 3
    cfg.dp.microbatch_size = max(cfg.dp.microbatch_size, cfg.data.max_blocks_per_unit)
    return cfg


def run_trainer_on_neighbours(make_cfg, root: Path, unit: str) -> tuple[dict, dict, Any]:
    """Trains `make_cfg()` on D, D + x and D - x with the same secrets, each written in turn to
    the same file (so the settings are the same to the byte): (workdirs, N per dataset, the
    config)."""
    texts = neighbour_texts(unit)
    root.mkdir(parents=True, exist_ok=True)
    train = root / ("train.jsonl" if unit == "user" else "train.txt")
    public_eval = root / ("eval.jsonl" if unit == "user" else "eval.txt")
    evals = [_text(1000 + i, 12) for i in range(24)]
    if unit == "user":
        evals = [json.dumps({"text": t, "user_id": i}) for i, t in enumerate(evals)]
    public_eval.write_text("".join(line + "\n" for line in evals))
    workdirs, counts, cfg = {}, {}, None
    for name in NAMES:
        train.write_text("".join(line + "\n" for line in texts[name]))
        cfg = configure(make_cfg(), unit, train, public_eval)
        tokenizer = data.load_tokenizer(cfg.data.tokenizer)
        counts[name] = count_units(train, unit, tokenizer, cfg.data.block_size)
        workdirs[name] = root / name
        run_lib.run(to_settings(cfg), workdirs[name])
    assert counts["D-x"] < counts["D"] < counts["D+x"], counts
    return workdirs, counts, cfg


# ---- Comparing --------------------------------------------------------------------------------


def released(root: Path) -> dict[str, Path]:
    wd = Workdir(root)
    return {p.relative_to(wd.root).as_posix(): p for p in release.public_paths(wd)}


def compare_fields(
    records: dict[str, dict[str, Any]],
    fields: dict[str, Source],
    expected_public: dict[str, dict[str, Any]],
    what: str,
) -> None:
    """Records of the three datasets: the same keys, SETTING fields equal, PUBLIC_N fields as
    `expected_public[name]` says (a function of that dataset's N and the settings alone)."""
    keys = {name: set(r) for name, r in records.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, f"{what}: keys differ: {keys}"
    for key in keys["D"]:
        source = fields[key]  # (a KeyError: a field without a declared source)
        values = {name: r[key] for name, r in records.items()}
        if source is Source.SETTING:
            assert len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1, (
                f"{what}: setting {key!r} depends on the data: {values}"
            )
        elif source is Source.PUBLIC_N:
            for name, value in values.items():
                want = expected_public[name][key]
                assert json.dumps(value, sort_keys=True) == json.dumps(want, sort_keys=True), (
                    f"{what} of {name}: {key!r} = {value!r} is not the plan's {want!r} for N"
                )


def _plan(cfg, n: int):
    unit = data.describe_unit(
        cfg.data.privacy_unit, cfg.data.block_size, cfg.data.max_blocks_per_unit
    )
    return builders.privacy_plan(to_settings(cfg), n, unit=unit, unit_kind=cfg.data.privacy_unit)


def check_run_release(cfg, workdirs: dict[str, Path], counts: dict[str, int]) -> None:
    """Every publishable byte of three runs on neighbouring datasets (module docstring)."""
    files = {name: released(wd) for name, wd in workdirs.items()}
    paths = {name: set(f) for name, f in files.items()}
    assert paths["D"] == paths["D+x"] == paths["D-x"], paths
    for name, wd in workdirs.items():
        # Walked here, not through the library's list: everything outside private/ is a
        # released file, and nothing (the directory itself included) carries a real time.
        walked = {
            (Path(dirpath) / f).relative_to(wd).as_posix()
            for dirpath, dirnames, filenames in os.walk(wd)
            if not Path(dirpath).relative_to(wd).parts[:1] == ("private",)
            for f in [*filenames, *(d for d in dirnames if (dirpath, d) != (str(wd), "private"))]
        }
        assert walked == paths[name], walked ^ paths[name]
        for path in [wd, wd / "private", *files[name].values()]:
            assert path.stat().st_mtime == release.RELEASE_MTIME, (name, path)
        archive = release.archive(Workdir(wd), wd.parent / f"{name}.tar.gz")
        again = release.archive(Workdir(wd), wd.parent / f"{name}-again.tar.gz")
        assert archive.read_bytes() == again.read_bytes()
    plans = {name: _plan(cfg, counts[name]) for name in NAMES}
    label = randomness.FIXED_SEED_LABEL

    # privacy.json: the whole record is the plan's for that N (settings and PUBLIC_N alike).
    privacy = {n: json.loads((wd / "privacy.json").read_text()) for n, wd in workdirs.items()}
    expected = {}
    for name, plan in plans.items():
        expected[name] = release.mechanism_record(plan, plan.num_steps, randomness=label)
        expected[name]["planned_steps"] = plan.num_steps
        want = json.loads(json.dumps(expected[name]))
        differs = {k: (privacy[name].get(k), want.get(k)) for k in set(want) | set(privacy[name])
                   if privacy[name].get(k) != want.get(k)}  # fmt: skip
        assert not differs, f"privacy.json of {name} is not the plan's for N: {differs}"
    compare_fields(privacy, PRIVACY_FIELDS, expected, "privacy.json")

    # config.json: the settings, to the byte.
    assert len({(wd / "config.json").read_bytes() for wd in workdirs.values()}) == 1

    # metrics.jsonl, step by step.
    metrics = {n: _jsonl(wd / "metrics.jsonl") for n, wd in workdirs.items()}
    assert len({len(m) for m in metrics.values()}) == 1
    for i, record in enumerate(metrics["D"]):
        step = record["step"]
        per_run = {n: _unprefixed(m[i]) for n, m in metrics.items()}
        want = {}
        for name, plan in plans.items():
            want[name] = {**plan.metrics(step), "noise_seed_fixed_by_user": True}
            if plan.private:
                # (a float32 constant of the compiled step)
                ratio = np.float32(plan.noise_multiplier / plan.expected_batch_size)
                want[name]["noise_to_batch"] = float(ratio)
        compare_fields(per_run, release.METRIC_FIELDS, want, f"metrics.jsonl step {step}")

    # samples.jsonl: prompts and steps are settings; completions come from the model.
    samples = {n: _jsonl(wd / "samples.jsonl") for n, wd in workdirs.items()}
    assert len({len(s) for s in samples.values()}) == 1
    for i in range(len(samples["D"])):
        compare_fields({n: s[i] for n, s in samples.items()}, release.SAMPLE_FIELDS, {}, "samples")

    for name, wd in workdirs.items():
        _check_model_outputs(cfg, wd, metrics[name], samples[name], privacy[name])
        _check_renderings(cfg, wd, plans[name])
    # hf/: everything but the weights (the noised release) and the model card is identical.
    for rel in files["D"]:
        if rel.startswith("hf/") and rel not in ("hf/model.safetensors", "hf/README.md"):
            contents = {
                files[n][rel].read_bytes() if files[n][rel].is_file() else b"" for n in NAMES
            }
            assert len(contents) == 1, rel


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _unprefixed(record: dict) -> dict:
    return {k.removeprefix("public/"): v for k, v in record.items()}


def _check_model_outputs(cfg, wd: Path, metrics, samples, privacy) -> None:
    """The final eval metrics and samples are functions of the released model (hf/) and public
    data: recomputed here from hf/ alone."""
    import jax

    from jaxdp import hf, sharding, steps
    from jaxdp.generate import generate

    model = hf.from_pretrained(wd / "hf")
    graphdef, state = steps.init_state(model, optax.identity())
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    last = privacy["steps"]
    final = _unprefixed(next(r for r in metrics if r["step"] == last and "public/eval_loss" in r))
    _, source = builders.text_sources(cfg.data)
    unit = "block" if cfg.data.privacy_unit == "block" else "record"
    rows = data.load_rows(
        source,
        tokenizer,
        cfg.data.block_size,
        unit=unit,
        max_blocks_per_unit=cfg.data.max_blocks_per_unit,
    ).first_rows(cfg.data.max_eval_examples)
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    got = evaluators.evaluate(
        jax.jit(steps.make_eval_step(graphdef)), state.params, state.frozen, rows,
        cfg.train.eval_batch_size, mesh,
    )  # fmt: skip
    for key, value in got.items():
        # The same model on the same data, but another compiled program (no train state split
        # into trainable and frozen): float32 summation order may differ in the last bits.
        assert math.isclose(final[key], value, rel_tol=1e-5), (key, final[key], value)
    for i, prompt in enumerate(cfg.train.sample_prompts):
        out = generate(
            graphdef, state.params, data.tokenize(tokenizer, prompt),
            max_new_tokens=cfg.train.sample_max_new_tokens, top_k=cfg.train.sample_top_k,
            key=randomness.generation_key(cfg.train.seed, i),
        )  # fmt: skip
        record = next(s for s in samples if s["step"] == last and s["prompt"] == prompt)
        assert record["completion"] == tokenizer.decode(out.tolist())


def _check_renderings(cfg, wd: Path, plan) -> None:
    """report.png, the model card and tensorboard/ are renderings of released fields only."""
    import tempfile

    from jaxdp import report

    record = json.loads((wd / "privacy.json").read_text())
    assert (wd / "hf" / "README.md").read_text() == report.model_card(record, base_model=None)
    title = (
        f"{plan.describe()} ({randomness.FIXED_SEED_LABEL})" if plan.enabled else plan.describe()
    )
    with tempfile.TemporaryDirectory() as tmp:
        target = plan.target_epsilon if plan.enabled else None
        again = release.render_report(wd / "metrics.jsonl", Path(tmp) / "r.png", title, target)
        assert again.read_bytes() == (wd / "report.png").read_bytes()
        if (wd / "tensorboard").exists():
            board = release.render_board(wd / "metrics.jsonl", Path(tmp) / "tb")
            assert board.read_bytes() == (wd / "tensorboard" / release.BOARD_FILE).read_bytes()
    if (wd / "tensorboard").exists():
        scalars = list(release.board_scalars(wd / "tensorboard"))
        assert scalars and all(wall == step for step, wall, _, _ in scalars)
