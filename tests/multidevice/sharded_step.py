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

from jaxdp import sharding, steps
from jaxdp.gpt2 import GPT2Config, init_model
from jaxdp.plan import PrivacyPlan


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
    plan, engine_name = dp if dp is not None else (None, "vmap")
    # 8 examples per vmap chunk on every mesh (ghost): 8 per device on one, 1 on eight.
    micro = 8 // mesh.size if engine_name == "ghost" else None
    engine = steps.Engine(engine_name, microbatch_size=micro)
    base = optax.sgd(0.5)
    tx = base if plan is None else plan.optimizer(base, jax.random.key(7))
    graphdef, state = steps.init_state(init_model(config, seed=0), tx)
    state, compiled = steps.shard_and_jit(
        tx, plan, engine, state, mesh, graphdef=graphdef, min_sharded_size=0
    )
    sharded = any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(state.params))
    tokens = np.random.default_rng(0).integers(0, 61, size=(40, 7)).astype(np.int32)
    rows = [np.arange(16), np.concatenate([np.arange(16, 27), np.zeros(5, int)])]
    pads = [np.zeros(16, bool), np.arange(16) >= 11]
    metrics = None
    for step in range(2):
        acc = compiled.zero_accum(state.params)
        for j, (r, p) in enumerate(zip(rows, pads, strict=True)):
            batch = sharding.global_batch({"tokens": tokens}, r, mesh)
            batch.update(sharding.global_batch({"is_padding": p}, np.arange(16), mesh))
            key = jax.random.fold_in(jax.random.key(step), j)
            acc = compiled.grad_step(state.params, batch, key, acc)
        state, metrics = compiled.update_step(state, acc)
    metrics = {k: float(v) for k, v in metrics.items() if k != "public"}  # (DP releases)
    return sharding.to_host(state.params), metrics, sharded


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {}
    plan = PrivacyPlan(
        num_examples=40,
        expected_batch_size=20.0,
        num_steps=2,
        l2_clip_norm=0.1,
        noise_multiplier=1.0,
        target_delta=1e-3,
    )
    for name, dp in [("dp", (plan, "vmap")), ("ghost", (plan, "ghost")), ("nodp", None)]:
        one = sharding.make_mesh((1,), ("data",), jax.devices()[:1])
        ref_params, ref_metrics, _ = run(one, dp)
        # Data parallel, and data x FSDP (params and optimizer state sharded 4 ways).
        for shape, axes in [((8,), ("data",)), ((2, 4), ("data", "fsdp"))]:
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
