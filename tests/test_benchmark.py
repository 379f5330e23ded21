"""benchmarks/benchmark.py end to end on the tiny preset (CPU, a few seconds per mode)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark harness runs each mode in its own process: minutes in all.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "benchmark.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark is not part of the package


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_benchmark_tiny_nonprivate_and_vmap(tmp_path):
    """Timed, with a compile pass (--jobs 2): every mode is compiled first, two at a time (the
    plan waits for the non-private estimate), then timed alone, loading from the cache. Then a
    run cut short after its first row goes on with --resume, compiling nothing again."""
    out, cache = tmp_path / "results.jsonl", tmp_path / "cache"
    # (At B8 T64 the plan fits its budget at once; at B4 T16 it is replanned, compiled three
    # times in its process, and then not serialized.)
    args = (
        "--model=tiny",
        "--batch=8",
        "--seq=64",
        "--modes=nonprivate,vmap,ghost_plan",
        "--steps=2",
        "--warmup=1",
        "--jobs=2",
        f"--out={out}",
        f"--cache-dir={cache}",
    )
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["nonprivate", "vmap", "ghost_plan"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    for r in rows:
        assert r["error"] is None, r["error"]
        assert (r["model"], r["batch"], r["seq"], r["dtype"]) == ("tiny", 8, 64, "float32")
        for key in ("step_s", "tokens_per_s", "compile_s", "peak_bytes", "grad_step_flops"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_s"])
        assert r["peak_bytes_source"] in ("gpu_peak_bytes_in_use", "host_peak_rss")
        assert r["device"] and r["backend"]
        # The timed process loaded all three steps as the compile pass serialized them (the
        # plan's with the plan it was compiled for): no tracing, lowering or compiling.
        assert r["compile_jobs"] == 2 and r["compile_cache_hits"] == 3
        assert r["steps_loaded_from"] == "serialized executables"
        assert r["cached_compile_s"] > 0
        # Where a timed process's time goes: set-up, loading its steps, then its steps.
        parts = (r["setup_s"], r["cached_compile_s"], r["run_s"])
        assert all(x > 0 for x in parts) and sum(parts) < r["process_s"]
        assert min(r["import_s"], r["backend_s"], r["state_s"]) > 0
        assert r["failed_load_s"] is None
    # The first mode's process starts at its turn; each next one as the one before it does,
    # and waits for it to end (its imports are done by then, or partly); each mode's steps
    # wait for the next one's imports.
    assert rows[0]["waited_s"] is None and rows[0]["ahead_s"] is None
    assert [r["next_imports_s"] is not None for r in rows] == [True, True, False]
    for before, r in zip(rows[:-1], rows[1:], strict=True):
        assert r["waited_s"] >= 0 and r["ahead_s"] > 0 and before["next_imports_s"] >= 0
        assert r["ahead_s"] <= r["import_s"] + 0.1  # nothing but its imports ran ahead
        # It got the device only once the mode before it had ended: its time before its turn
        # covers that mode's whole turn (up to the start of its own process).
        turn_before = before["process_s"] - (before["ahead_s"] or 0.0)
        assert r["waited_s"] + r["ahead_s"] >= turn_before - 0.05
        # Waiting is neither set-up nor the process's time; the steps still come after it.
        assert r["setup_s"] == pytest.approx(r["import_s"] + r["backend_s"] + r["state_s"])
    assert "compile pass: 3 of 3 done" in proc.stderr
    assert re.search(r"compile pass \d+ s, timed pass \d+ s, of which", proc.stderr)
    assert re.search(r"3 modes in \d+ s; their processes, summed: \d+ s", proc.stderr)
    assert re.search(r"running them \d+ s and the rest \(estimates, exit\) \d+ s", proc.stderr)
    assert re.search(r"imports \d+, \d+ of them while the mode before ran", proc.stderr)
    assert re.search(r"waiting for the next mode's imports \d+ s", proc.stderr)
    assert "(3 of 3 steps loaded from the serialized executables)" in proc.stderr
    executables = cache / "executables"
    assert sorted(p.name for p in executables.iterdir()) == [
        f"tiny-B8-T64-{mode}-float32.pkl" for mode in ("ghost_plan", "nonprivate", "vmap")
    ]
    assert rows[2]["plan"].startswith(f"microbatch {rows[2]['microbatch']},")
    # The timed process took the compile pass's plan instead of planning again.
    assert rows[2]["plan_choice"]["microbatch"] == rows[2]["microbatch"]
    assert "replanning" not in proc.stderr.split("timed pass")[1]
    nonprivate, vmap = rows[:2]
    assert nonprivate["ratio_vs_nonprivate"] == 1.0
    assert nonprivate["microbatch"] is None and vmap["microbatch"] == 8
    assert vmap["ratio_vs_nonprivate"] == pytest.approx(nonprivate["step_s"] / vmap["step_s"])
    flops = nonprivate["grad_step_flops"] / vmap["grad_step_flops"]
    assert vmap["flops_ratio_vs_nonprivate"] == pytest.approx(flops)
    # Per-example gradients cost at least the forward and backward passes of the batch.
    assert vmap["grad_step_flops"] >= 0.9 * nonprivate["grad_step_flops"]

    # Cut short: only the first row was written, the second one half, and the compile pass's
    # caches were never merged. A row with an error, or of another --steps or --microbatch, or
    # of an older version (no "steps"), does not count as measured either.
    first = out.read_text().splitlines()[0]
    other = [json.dumps({**rows[1], "steps": 3}), json.dumps({**rows[1], "microbatch": 2})]
    old = {k: v for k, v in rows[1].items() if k != "steps"}
    failed = json.dumps({**rows[2], "error": "OutOfMemory", "step_s": None})
    out.write_text("\n".join([first, *other, json.dumps(old), failed, first[:40]]))
    shutil.rmtree(cache / "merged")
    # vmap's serialized steps are the non-private ones under vmap's name (they load, but do
    # not run), ghost_plan's unreadable: both are compiled from the compilation cache instead
    # (merged again from each mode's own).
    vmap_file = executables / "tiny-B8-T64-vmap-float32.pkl"
    swapped = pickle.loads((executables / "tiny-B8-T64-nonprivate-float32.pkl").read_bytes())
    swapped["identity"] = pickle.loads(vmap_file.read_bytes())["identity"]
    vmap_file.write_bytes(pickle.dumps(swapped))
    (executables / "tiny-B8-T64-ghost_plan-float32.pkl").write_bytes(b"not a pickle")
    resumed = _run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume: 1 rows kept" in resumed.stderr and "2 to run" in resumed.stderr
    again = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in again] == ["nonprivate", "vmap", "ghost_plan"]
    assert again[0] == {**rows[0], "resumed": True}  # kept as it was
    assert "kept from an earlier run" in resumed.stderr  # the table's note
    for earlier, r in zip(rows[1:], again[1:], strict=True):
        assert r["error"] is None and r["step_s"] > 0 and r["steps"] == 2
        assert f"B8 T64 {r['mode']}] compiled earlier in {cache}" in resumed.stderr
        assert r["compile_cache_hits"] == 3 and r["compile_s"] == earlier["compile_s"]
        assert r["steps_loaded_from"] == "compilation cache"
        assert r["ratio_vs_nonprivate"] == pytest.approx(rows[0]["step_s"] / r["step_s"])
    assert again[2]["plan_choice"] == rows[2]["plan_choice"]
    assert again[2]["reference_peak_bytes"] == rows[0]["estimated_peak_bytes"]
    assert "compile pass: 1 of" not in resumed.stderr  # nothing compiled
    assert "vmap] serialized steps failed to run (" in resumed.stderr
    # The failed attempt (loading, the failed step, a new state) is not counted as compiling.
    vmap_again = again[1]
    assert vmap_again["failed_load_s"] > 0 and again[2]["failed_load_s"] is None
    assert vmap_again["failed_load_s"] + vmap_again["cached_compile_s"] < vmap_again["process_s"]
    assert "ghost_plan] serialized steps not loaded (UnpicklingError" in resumed.stderr
    # The new rows start on a line of their own after the cut-short one.
    written = [json.loads(line) for line in out.read_text().splitlines()[6:]]
    assert [r["mode"] for r in written] == ["vmap", "ghost_plan"]
    # --resume needs --out; --cache-dir a compile pass.
    proc = _run("--model=tiny", "--batch=4", "--seq=16", "--resume")
    assert proc.returncode == 2 and "--resume needs --out" in proc.stderr
    proc = _run("--model=tiny", "--batch=4", "--seq=16", "--jobs=1", f"--cache-dir={cache}")
    assert proc.returncode == 2 and "--cache-dir keeps a timed run's compile pass" in proc.stderr


def test_benchmark_compile_only_reports_costs_without_running(tmp_path):
    """(Two modes compiled at a time, each row written to --out as it is done.)"""
    out = tmp_path / "rows.jsonl"
    args = ("--model=tiny", "--batch=4", "--seq=16", "--modes=nonprivate,ghost,ghost_inst")
    proc = _run(*args, "--compile-only", "--jobs=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line[:1] == "{"]
    assert [r["mode"] for r in rows] == ["nonprivate", "ghost", "ghost_inst"]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["mode"] for r in written) == sorted(r["mode"] for r in rows)
    assert all(r["compile_jobs"] == 2 and r["compile_cache_hits"] is None for r in rows), rows
    nonprivate, ghost, inst = rows
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["step_s"] is None and r["ratio_vs_nonprivate"] is None
        assert r["grad_step_flops"] > 0 and r["grad_step_temp_bytes"] > 0
        # fp32 params + AdamW's two moments, at least
        assert r["state_bytes"] >= 3 * 4 * r["n_trainable_params"]
        scratch = max(r["grad_step_temp_bytes"], r["update_step_temp_bytes"])
        assert r["estimated_peak_bytes"] > r["state_bytes"] + scratch
    assert [r["ghost_strategy"] for r in rows] == [None, "auto", "instantiate"]
    # At T = 16 < d, Gram matrices cost more FLOPs than instantiated gradients (reused in the sum).
    assert inst["grad_step_flops"] < ghost["grad_step_flops"]
    ratio = nonprivate["grad_step_flops"] / ghost["grad_step_flops"]
    assert ghost["flops_ratio_vs_nonprivate"] == pytest.approx(ratio)


def test_benchmark_rejects_unknown_mode():
    proc = _run("--model=tiny", "--batch=4", "--seq=16", "--modes=nonprivate,nosuchmode")
    assert proc.returncode == 2
    assert "nosuchmode" in proc.stderr


def test_benchmark_plan_and_bf16_modes_compile(tmp_path):
    """The suite's new modes: the clipping plan (fp32 and bf16) and the bf16 baseline."""
    modes = "nonprivate,ghost_plan,nonprivate_bf16,ghost_plan_bf16"
    proc = _run("--model=tiny", "--batch=4", "--seq=16", f"--modes={modes}", "--compile-only")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = {r["mode"]: r for r in map(json.loads, lines)}
    assert all(r["error"] is None for r in rows.values()), rows
    assert [rows[m]["dtype"] for m in modes.split(",")] == ["float32", "float32"] + ["bfloat16"] * 2
    for mode in ("ghost_plan", "ghost_plan_bf16"):
        assert rows[mode]["plan"].startswith(f"microbatch {rows[mode]['microbatch']},")
        assert 4 % rows[mode]["microbatch"] == 0
    # Ratios are taken against the non-private step of the same dtype.
    bf = rows["ghost_plan_bf16"]
    expected = rows["nonprivate_bf16"]["grad_step_flops"] / bf["grad_step_flops"]
    assert bf["flops_ratio_vs_nonprivate"] == pytest.approx(expected)
    assert "| ghost_plan_bf16 | bfloat16 |" in proc.stderr  # the markdown table


def _child(mode: str, *options: str, python=(), env=None) -> tuple[dict, str]:
    """One mode's process as the suite starts it (tiny model, B2 T8): (its row, its stderr)."""
    proc = subprocess.run(
        [
            sys.executable,
            *python,
            str(SCRIPT),
            "--model=tiny",
            "--batch=2",
            "--seq=8",
            f"--modes={mode}",
            f"--single-mode={mode}",
            *options,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), proc.stderr


def test_a_mode_started_ahead_waits_without_touching_the_device():
    """A timed process started while the mode before it runs imports, then waits for "go"
    before JAX starts a backend; if its parent ends first, it ends without running."""
    from benchmark import WAIT

    command = [sys.executable, str(SCRIPT), "--model=tiny", "--batch=2"]
    command += ["--seq=8", "--modes=nonprivate", "--single-mode=nonprivate", "--steps=1"]
    proc = subprocess.run(
        command,
        cwd=REPO,
        input="",  # the parent went away: no "go"
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, WAIT: "1"},
    )
    # Had a backend started during the imports, the row would say so (and nothing would wait).
    assert proc.returncode != 0 and not proc.stdout.strip()
    assert "the parent ended before this mode's turn; not run" in proc.stderr
    assert "compiling" not in proc.stderr


def test_a_mode_started_ahead_that_fails_on_its_turn_reports_its_wait(tmp_path):
    """A mode that fails on its turn (here: a plan that is not JSON) still reports how long it
    waited, so that neither its process_s nor its ahead_s counts the mode before it."""
    import time

    from benchmark import _ModeProcess

    command = [sys.executable, str(SCRIPT), "--model=tiny", "--batch=2"]
    command += ["--seq=8", "--modes=ghost_plan", "--single-mode=ghost_plan", "--steps=1"]
    imported = tmp_path / "imported"
    process = _ModeProcess([*command, "--fixed-plan={not json"], None, True, str(imported))
    try:
        while not imported.exists():  # its imports are done; the mode "before it" runs on
            assert process.proc.poll() is None
            time.sleep(0.01)
        time.sleep(1.0)
        ahead = time.perf_counter() - process.started
        row = process.result()
        total = time.perf_counter() - process.started
    finally:
        process.stop()
    assert row["error"] and "Expecting property name" in row["error"]
    assert row["waited_s"] >= 0.9 and row["ahead_s"] <= ahead - 0.9
    assert row["process_s"] == pytest.approx(total - row["waited_s"], abs=0.1)
    assert row["next_imports_s"] is None and "device" in row  # (on its turn it may look)


def test_only_steps_compiled_in_the_process_are_serialized(tmp_path):
    """A compile pass's process serializes the steps it compiled; a timed process loads them
    (with --warmup 0, one untimed check step first); steps that came from the compilation
    cache are not serialized (loaded elsewhere they failed to run), and an older file goes."""
    from benchmark import _cache_env

    path = tmp_path / "executables" / "vmap.pkl"
    env = _cache_env(str(tmp_path / "cache"), compile_pass=True)
    compiled, _ = _child("vmap", "--compile-only", f"--executables={path}", env=env)
    assert compiled["error"] is None and compiled["compile_cache_hits"] == 0
    assert path.exists()

    timed, err = _child("vmap", "--steps=2", "--warmup=0", f"--executables={path}")
    assert timed["error"] is None, timed["error"]
    assert timed["steps_loaded_from"] == "serialized executables"
    assert timed["compile_cache_hits"] == 3 and timed.get("failed_load_s") is None
    assert timed["step_s"] > 0 and timed["run_s"] >= 2 * timed["step_s"]

    again, err = _child("vmap", "--compile-only", f"--executables={path}", env=env)
    assert again["error"] is None and again["compile_cache_hits"] == 3
    assert "steps not serialized (3 of 3 from the cache" in err
    assert not path.exists()


def test_executables_identity_is_what_changes_the_program(monkeypatch):
    """The identity changes with what the program depends on (XLA flags, the plan), not with
    where the compilation cache is or how memory is allocated."""
    import argparse

    from benchmark import _cache_env, _executables_identity

    args = argparse.Namespace(model="tiny", batch=8, seq=64, dtype="float32")
    base = _executables_identity(args, "ghost_plan", 4, [["h.0.attn.c_attn", "instantiate"]])
    assert base["cpu"] and base["code_version"] and base["host"]
    assert _executables_identity(args, "ghost_plan", 2, base["strategy"]) != base
    assert _executables_identity(args, "ghost_plan", 4, [["h.0.attn.c_attn", "ghost"]]) != base
    for compile_pass in (True, False):
        with monkeypatch.context() as m:
            for key, value in _cache_env("/somewhere", compile_pass).items():
                m.setenv(key, value)
            m.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
            assert _executables_identity(args, "ghost_plan", 4, base["strategy"]) == base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    changed = _executables_identity(args, "ghost_plan", 4, base["strategy"])
    assert changed["environment"]["XLA_FLAGS"] and changed != base


def test_benchmark_suite_arguments():
    proc = _run("--suite=gpu", "--model=gpt2")
    assert proc.returncode == 2 and "--suite sets the settings itself" in proc.stderr
    proc = _run("--model=tiny", "--batch=4")
    assert proc.returncode == 2 and "--seq" in proc.stderr


def test_suite_rows_are_compared_within_their_setting():
    import benchmark

    def row(model, mode, step_s, flops=10.0, est=100.0):
        r = benchmark._row({"error": None})
        dtype = "bfloat16" if mode.endswith("_bf16") else "float32"
        r.update(model=model, batch=4, seq=16, mode=mode, dtype=dtype, step_s=step_s)
        r.update(grad_step_flops=flops, estimated_peak_bytes=est, tokens_per_s=64 / step_s)
        return r

    rows = [
        row("a", "nonprivate", 1.0),
        row("a", "ghost_plan", 2.0, flops=20.0, est=110.0),
        row("a", "nonprivate_bf16", 0.5),
        row("a", "ghost_plan_bf16", 1.0, flops=15.0),
        row("b", "nonprivate", 4.0),
        row("b", "ghost_plan", 5.0),
        {**row("b", "nonprivate", 2.0), "device": "other"},  # e.g. kept by --resume
        {**row("b", "ghost_plan", 4.0), "device": "other"},
    ]
    benchmark.add_ratios(rows)
    assert rows[-1]["ratio_vs_nonprivate"] == 0.5  # against its own device's step
    by = {(r["model"], r["mode"]): r for r in rows}
    assert by["a", "ghost_plan"]["ratio_vs_nonprivate"] == 0.5
    assert by["a", "ghost_plan"]["flops_ratio_vs_nonprivate"] == 0.5
    assert by["a", "ghost_plan"]["memory_ratio_vs_nonprivate"] == pytest.approx(1.1)
    assert by["a", "ghost_plan_bf16"]["ratio_vs_nonprivate"] == 1.0  # vs fp32
    assert by["a", "ghost_plan_bf16"]["ratio_vs_nonprivate_same_dtype"] == 0.5
    assert by["a", "ghost_plan_bf16"]["flops_ratio_vs_nonprivate"] == pytest.approx(10 / 15)
    assert rows[5]["ratio_vs_nonprivate"] == pytest.approx(0.8)  # its own setting and device
    table = benchmark.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 15 for line in table)


def test_plan_is_replanned_under_a_memory_limit():
    """--memory-limit-gib (a GPU's memory) caps the plan's XLA estimate like the 1.1x budget."""

    def plan_row(*extra):
        proc = _run("--model=tiny", "--batch=8", "--seq=16", "--modes=ghost_plan", *extra)
        assert proc.returncode == 0, proc.stderr
        (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line[:1] == "{"]
        assert row["error"] is None, row["error"]
        return row, proc.stderr

    free, _ = plan_row("--compile-only")
    limit = 0.9 * free["estimated_peak_bytes"] / 2**30
    capped, log = plan_row("--compile-only", f"--memory-limit-gib={limit}")
    assert "replanning" in log
    assert capped["microbatch"] < free["microbatch"]
    assert capped["estimated_peak_bytes"] <= limit * 2**30 or "over the device's" in capped["plan"]
    proc = _run("--model=tiny", "--batch=8", "--seq=16", "--memory-limit-gib=0")
    assert proc.returncode == 2 and "--memory-limit-gib must be positive" in proc.stderr


def test_serialized_steps_load_only_for_what_they_were_compiled_for(tmp_path, capsys):
    """A timed process loads a compile pass's serialized steps only for its own identity, and
    they run as compiled."""
    import jax
    import jax.numpy as jnp
    from benchmark import load_executables, save_executables

    path = tmp_path / "steps.pkl"
    assert load_executables(str(path), {"mode": "vmap"}, "label") is None  # nothing there
    x = jnp.arange(3.0)
    compiled = tuple(jax.jit(f).lower(x).compile() for f in (jnp.sin, jnp.cos, jnp.exp))
    saved = {"code_version": "a", "mode": "vmap", "microbatch": 4, "strategy": [["h.0", "x"]]}
    save_executables(str(path), saved, compiled, "label")
    assert [p.name for p in tmp_path.iterdir()] == ["steps.pkl"]  # no temporary file left
    wanted = {**saved, "code_version": "b", "microbatch": 2}
    del wanted["strategy"]
    assert load_executables(str(path), wanted, "label") is None
    err = capsys.readouterr().err
    assert "compiled for another code_version, microbatch, strategy" in err
    loaded = load_executables(str(path), saved, "label")
    for f, step in zip((jnp.sin, jnp.cos, jnp.exp), loaded, strict=True):
        assert jnp.array_equal(step(x), f(x))
    path.write_bytes(b"not a pickle")
    assert load_executables(str(path), saved, "label") is None
    assert "serialized steps not loaded (UnpicklingError" in capsys.readouterr().err
