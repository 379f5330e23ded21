"""Ghost clipping: exact per-example gradient norms without materialising per-example gradients.

Same result as `jaxdp.clipping.clipped_grad` with flat clipping (the sum over real examples of
g_i * min(1, C / ||g_i||)), computed in two passes over each microbatch:

1. A backward pass to the layers' outputs only (`gpt2.Tape` adds zero perturbations whose
   gradients are the output gradients G and records the inputs A). Because examples do not
   interact in the batched forward pass, row i of G is example i's own output gradient, and the
   per-example squared norm of every parameter's gradient follows from A and G:

   - dense kernel W (y = A W): ||A_i^T G_i||_F^2 = <A_i A_i^T, G_i G_i^T> ("ghost norm",
     O(T^2 (d+p))) or, when cheaper, the instantiated A_i^T G_i (O(T d p)); bias: ||sum_t G_it||^2
   - layer norm (y = xhat * scale + bias): scale: ||sum_t G_it * xhat_it||^2, bias as above
   - position embedding wpe: ||sum_t e_t G0_it^T||^2 = sum_t ||G0_it||^2 (positions are distinct)
   - token embedding wte, which is also the output layer (tied): its gradient is
     E_i + L_i with E_i = sum_t onehot(id_it) G0_it^T (input side) and L_i = GL_i^T H_i (output
     side; GL = dloss/dlogits, H = final hidden states), so
     ||E_i + L_i||^2 = ||E_i||^2 + ||L_i||^2 + 2 <E_i, L_i>, with
     ||E_i||^2 = sum_{t,s} [id_it = id_is] G0_it . G0_is,  ||L_i||^2 = <H_i H_i^T, GL_i GL_i^T>,
     <E_i, L_i> = sum_{t,s} GL_i[s, id_it] (H_is . G0_it)   (the cross term; nothing is untied).

2. A second, ordinary backward pass of sum_i c_i * loss_i with c_i = min(1, C / ||g_i||) held
   constant, which is exactly sum_i c_i g_i.

Examples with non-finite norms get c_i = 0 and their tokens are replaced in the second pass, so
they contribute exactly zero, as in the vmap engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.clipping import ClipStats, chunk_stats, scan_microbatches
from jaxdp.gpt2 import Tape
from jaxdp.lora import path_name
from jaxdp.loss import example_loss
from jaxdp.train import merge

PyTree = Any


def _sq(x: jax.Array) -> jax.Array:
    """Per-example squared L2 norm over all but the leading axis."""
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def _gram_inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """<a_i a_i^T, b_i b_i^T> for a [B, T, d], b [B, T, p] -> [B]."""
    return jnp.sum(jnp.einsum("btd,bsd->bts", a, a) * jnp.einsum("btp,bsp->bts", b, b), (1, 2))


def dense_sq_norms(a: jax.Array, g: jax.Array) -> jax.Array:
    """||a_i^T g_i||_F^2 per example, by ghost norm or instantiation, whichever costs less."""
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    if T * (d + p) < d * p:  # 2 T^2 (d + p) vs 2 T d p flops
        return _gram_inner(a, g)
    return _sq(jnp.einsum("btd,btp->bdp", a, g))


def per_example_sq_norms(
    config, inputs: dict[str, jax.Array], grads: dict[str, jax.Array], tokens: jax.Array
) -> dict[str, jax.Array]:
    """Squared gradient norm [B] of every parameter group, from recorded inputs/output grads."""
    f32 = lambda x: x.astype(jnp.float32)
    out: dict[str, jax.Array] = {}
    for name, g in grads.items():
        g = f32(g)
        if name in ("embed", "lm_head"):
            continue
        x = f32(inputs[name])
        if name.endswith(("ln_1", "ln_2", "ln_f")):
            mean = jnp.mean(x, -1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
            xhat = (x - mean) * jax.lax.rsqrt(var + config.layer_norm_epsilon)
            out[f"{name}.scale"] = _sq(jnp.sum(g * xhat, 1))
        else:
            out[f"{name}.kernel"] = dense_sq_norms(x, g)
        out[f"{name}.bias"] = _sq(jnp.sum(g, 1))
    g0 = f32(grads["embed"])  # [B, T, D] gradient at wte(ids) + wpe(positions)
    gl = f32(grads["lm_head"])  # [B, T, V] gradient of the logits
    h = f32(inputs["lm_head"])  # [B, T, D] final hidden states
    T = tokens.shape[1]
    out["wpe"] = _sq(g0)
    same = (tokens[:, :, None] == tokens[:, None, :]).astype(jnp.float32)  # [B, T, T]
    emb_in = jnp.sum(same * jnp.einsum("btd,bsd->bts", g0, g0), (1, 2))
    emb_out = _gram_inner(h, gl)
    gl_at_ids = jnp.take_along_axis(
        gl, jnp.broadcast_to(tokens[:, None, :], (*tokens.shape[:1], T, T)), 2
    )
    cross = jnp.sum(gl_at_ids * jnp.einsum("bsd,btd->bst", h, g0), (1, 2))  # [B]
    out["wte"] = emb_in + emb_out + 2.0 * cross
    out["_wte_cross"] = 2.0 * cross  # part of "wte", reported for inspection only
    return out


def ghost_sq_norms(graphdef: nnx.GraphDef, params: PyTree, batch: dict, key=None, frozen=None):
    """({parameter group: per-example squared gradient norm [B]}, per-example losses [B]).

    Groups are named by parameter path (`h.0.attn.c_attn.kernel`, `ln_f.scale`, `wte`, `wpe`);
    all are computed, whether trainable or not."""
    tokens = batch["tokens"]
    mask = batch.get("token_mask")

    def forward(tape):
        logits = merge(graphdef, params, frozen)(tokens, dropout_key=key, tape=tape)
        return example_loss(logits, tokens, mask)

    # The taps' shapes, recorded during an abstract trace (no computation).
    probe = Tape()
    jax.eval_shape(lambda: forward(probe))
    zeros = {name: jnp.zeros(shape, jnp.float32) for name, shape in probe.output_shapes.items()}

    def total_loss(perturbations):
        tape = Tape(perturbations)
        losses = forward(tape)
        return jnp.sum(losses), (losses, tape.inputs)

    grads, (losses, inputs) = jax.grad(total_loss, has_aux=True)(zeros)
    config = merge(graphdef, params, frozen).config
    return per_example_sq_norms(config, inputs, grads, tokens), losses


_GROUP_OF_PATH = {"wte.embedding": "wte", "wpe.embedding": "wpe"}


def ghost_norms(graphdef: nnx.GraphDef, params: PyTree, batch: dict, key=None, frozen=None):
    """(per-example norms [B] of the gradient w.r.t. `params`, per-example losses [B]).

    Only the groups of the trainable `params` count; frozen parameters are left out."""
    sq, losses = ghost_sq_norms(graphdef, params, batch, key, frozen)
    groups = []
    for path, _ in nnx.to_flat_state(params):
        name = path_name(path)
        group = _GROUP_OF_PATH.get(name, name)
        if group not in sq:
            raise NotImplementedError(
                f"The ghost engine has no per-example norm for parameter {name!r} (LoRA adapters "
                f"are not supported by it yet); use dp.engine='vmap'."
            )
        groups.append(sq[group])
    return jnp.sqrt(jnp.maximum(sum(groups), 0.0)), losses


def ghost_clipped_grad(
    graphdef: nnx.GraphDef,
    l2_clip_norm: float,
    *,
    microbatch_size: int | None = None,
    frozen: PyTree = None,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """The ghost-clipping counterpart of `clipping.clipped_grad` for `jaxdp.gpt2` models.

    fn(params, batch {"tokens": [B, T]}, is_padding [B], key=None) -> (clipped_sum, ClipStats).
    Dropout, if any, uses one key per microbatch in both passes (identical masks).
    """
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")

    def chunk_fn(params, chunk, pad, keys):
        key = None if keys is None else keys[0]
        norms, losses = ghost_norms(graphdef, params, chunk, key, frozen)
        real, finite = ~pad, jnp.isfinite(norms)
        keep = real & finite
        weights = jnp.where(keep, l2_clip_norm / jnp.maximum(norms, l2_clip_norm), 0.0)
        weights = jax.lax.stop_gradient(weights)
        tokens = jnp.where(keep[:, None], chunk["tokens"], 0)  # keep NaNs out of the sum

        def weighted_loss(p):
            logits = merge(graphdef, p, frozen)(tokens, dropout_key=key)
            return jnp.sum(weights * example_loss(logits, tokens, chunk.get("token_mask")))

        summed = jax.grad(weighted_loss)(params)
        clipped = keep & (norms > l2_clip_norm)
        return summed, chunk_stats(losses, norms, real, finite, clipped)

    def fn(params: PyTree, batch: PyTree, is_padding: jax.Array, key: jax.Array | None = None):
        return scan_microbatches(chunk_fn, params, batch, is_padding, key, microbatch_size)

    return fn
