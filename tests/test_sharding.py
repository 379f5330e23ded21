import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import REPO

from jaxdp import sharding


@pytest.mark.slow
def test_sharded_dp_step_equals_single_device_on_8_fake_devices():
    """Data-parallel and FSDP meshes give the single-device update for the same batch and key."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multidevice" / "sharded_step.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6  # {dp, ghost, nodp} x 2 meshes
    for name, r in results.items():
        # Same examples, same noise: only the float summation order differs.
        assert r["param_rel_diff"] < 1e-5, (name, r)
        for key in ("train_loss", "grad_norm_mean"):
            assert r["metrics"][key] == pytest.approx(r["ref_metrics"][key], rel=1e-5, abs=1e-7)
        assert r["metrics"]["batch_size"] == r["ref_metrics"]["batch_size"] == 27
        is_fsdp_mesh = ", " in name  # the (data, fsdp) mesh "(2, 4)"
        assert r["params_sharded"] == is_fsdp_mesh, name


def test_make_mesh_validates_shape():
    mesh = sharding.make_mesh((-1,), ("data",))
    assert mesh.size == jax.device_count()
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh((jax.device_count() + 1,), ("data",))
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        sharding.make_mesh((-1,), ("model",))
    with pytest.raises(ValueError, match="differ in length"):
        sharding.make_mesh((1, -1), ("data",))


def test_fsdp_spec_shards_largest_divisible_dim():
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec

    devices = np.asarray(jax.devices()[:1]).reshape(1, 1)
    mesh = Mesh(devices, ("data", "fsdp"))
    assert sharding.fsdp_spec((50257, 768), mesh) == PartitionSpec()  # fsdp axis of size 1

    class FakeMesh:
        shape = {"data": 1, "fsdp": 4}

    assert sharding.fsdp_spec((50257, 768), FakeMesh()) == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((768, 3072), FakeMesh()) == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((3072, 768), FakeMesh()) == PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((768,), FakeMesh()) == PartitionSpec()  # small: replicated
    assert sharding.fsdp_spec((50257, 3), FakeMesh(), min_size=0) == PartitionSpec()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_equals_one_process_run(tmp_path):
    """Two processes x 2 CPU devices (gloo collectives on localhost) vs one process x 4 devices."""
    from safetensors.numpy import load_file

    script = str(REPO / "tests" / "multidevice" / "multiprocess_run.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), "1", "0", "0", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path / "two"), "2", str(pid), port, "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:  # one process failing can leave the other waiting on a collective
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]

    def summary(stdout):
        line = [s for s in stdout.splitlines() if s.startswith("SUMMARY ")][-1]
        return json.loads(line.removeprefix("SUMMARY "))

    assert summary(outs[0][0]) == summary(one.stdout)
    assert "SUMMARY" not in outs[1][0]  # only process 0 reports and writes files
    a = load_file(tmp_path / "one" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "two" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]).max() <= 1e-6 * max(1.0, abs(a[k]).max()), k
    assert (tmp_path / "two" / "private" / "checkpoints" / "2").is_dir()
