"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices.

Two DP-SGD steps (two physical batches, padding, dropout, noise; vmap and ghost engines) and two
non-private ones on several meshes; prints the max relative difference of the parameters and
metrics from the single-device result as JSON.
"""

import json
import sys

import jax
import numpy as np
import optax

from jaxdp import sharding, train
from jaxdp.gpt2 import GPT2Config, init_model


def run(mesh, dp):
    config = GPT2Config(
        vocab_size=61,
        n_positions=11,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    # SGD: Adam's normalisation would amplify float summation-order differences of ~0 grads.
    tx = train.make_optimizer(optax.sgd(0.5), dp, jax.random.key(7))
    graphdef, state = train.init_state(init_model(config, seed=0), tx)
    state, steps = train.shard_and_jit(graphdef, tx, dp, state, mesh, min_sharded_size=0)
    sharded = any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(state.params))
    tokens = np.random.default_rng(0).integers(0, 61, size=(40, 7)).astype(np.int32)
    rows = [np.arange(16), np.concatenate([np.arange(16, 27), np.zeros(5, int)])]
    pads = [np.zeros(16, bool), np.arange(16) >= 11]
    metrics = None
    for step in range(2):
        acc = steps.zero_accum(state.params)
        for j, (r, p) in enumerate(zip(rows, pads, strict=True)):
            batch = sharding.global_batch({"tokens": tokens}, r, mesh)
            batch.update(sharding.global_batch({"is_padding": p}, np.arange(16), mesh))
            key = jax.random.fold_in(jax.random.key(step), j)
            acc = steps.grad_step(state.params, batch, key, acc)
        state, metrics = steps.update_step(state, acc)
    metrics = {k: float(v) for k, v in metrics.items()}
    return sharding.to_host(state.params), metrics, sharded


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, dp in [
        (
            "dp",
            train.DPSGDConfig(
                l2_clip_norm=0.1,
                noise_multiplier=1.0,
                expected_batch_size=20.0,
                microbatch_size=None,
            ),
        ),
        (
            "ghost",
            train.DPSGDConfig(
                l2_clip_norm=0.1,
                noise_multiplier=1.0,
                expected_batch_size=20.0,
                microbatch_size=8,
                engine="ghost",
            ),
        ),
        ("nodp", None),
    ]:
        one = sharding.make_mesh((1,), ("data",), jax.devices()[:1])
        ref_params, ref_metrics, _ = run(one, dp)
        for shape, axes in [
            ((8,), ("data",)),
            ((4, 2), ("data", "fsdp")),
            ((1, 8), ("data", "fsdp")),
        ]:
            mesh = sharding.make_mesh(shape, axes)
            params, metrics, sharded = run(mesh, dp)
            rel = max(
                float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
            )
            out[f"{name}:{shape}"] = {
                "param_rel_diff": rel,
                "metrics": metrics,
                "ref_metrics": ref_metrics,
                "params_sharded": sharded,
            }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
