import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import REPO

from jaxdp import sharding


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
    assert len(results) == 6
    for name, r in results.items():
        # Same examples, same noise: only the float summation order differs.
        assert r["param_rel_diff"] < 1e-5, (name, r)
        for key in ("train_loss", "update_norm", "grad_norm_mean"):
            assert r["metrics"][key] == pytest.approx(r["ref_metrics"][key], rel=1e-5, abs=1e-7)
        assert r["metrics"]["batch_size"] == r["ref_metrics"]["batch_size"] == 27
        is_fsdp_mesh = ", " in name  # the (data, fsdp) meshes "(4, 2)" and "(1, 8)"
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
