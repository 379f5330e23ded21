"""Per-layer clipping fused into the backward pass (He et al., ICLR 2023, "Exploring the Limits of
Differentially Private Deep Learning with Group-wise Clipping").

With per-layer clipping, a layer's clipping factor depends on that layer's per-example gradient
alone, so its clipped sum can be formed the moment backpropagation reaches the layer: no second
pass and no per-example gradients of the whole model. Every parametrised layer of a `jaxdp.gpt2`
model runs under a `jax.custom_vjp` (through the model's `Tape` hook) whose backward pass

1. computes the input gradient exactly as usual (the chain rule is unchanged: examples never
   interact, so the other examples' gradients are untouched by any clipping), and
2. instead of the weight gradient sum_i g_ik, returns sum_i c_ik g_ik with
   c_ik = min(1, C_k / ||g_ik||): each parameter tensor k's per-example gradients g_ik are
   instantiated a few examples at a time (at most `chunk_bytes` of them at once), normed,
   scaled and summed. Instantiating them takes the same FLOPs as the weight-gradient matmul
   it replaces, so the step costs about what a non-private step costs.

Parameter groups: every trainable parameter tensor is a group, except the token embedding `wte`,
which GPT-2 ties to the output layer: its input-side gradient E_i (the embedding lookup, known
last) and output-side gradient L_i (the logits' matmul, known first) are clipped as two groups,
`wte.embedding:input` and `wte.embedding:output`, with thresholds C_in and C_out. Both land in
the same tensor, so example i contributes c_in E_i + c_out L_i there, of norm <= C_in + C_out.

Sensitivity: example i's contribution to the clipped sum is a vector whose restriction to the
tensor of group k has norm <= C_k, and to wte norm <= C_in + C_out, so adding or removing one
example changes the sum by at most

    S(C) = sqrt( sum_{k untied} C_k^2 + (C_in + C_out)^2 ),

and thresholds are always chosen with S(C) = C (`sensitivity`, `default_thresholds`). Padding rows
and examples whose gradient in a layer is not finite get c_ik = 0 in that layer (contributing
nothing there, which keeps the bound). Units of several rows (`segment_ids`) are not supported:
use the vmap or ghost engine for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.clipping import (
    ClipStats,
    UnitStats,
    chunk_stats,
    clip_factor,
    scan_microbatches,
    weighted_sum,
)
from jaxdp.gpt2 import Tape
from jaxdp.loss import example_loss
from jaxdp.params import PyTree, merge, path_name

WTE = "wte.embedding"
WTE_IN, WTE_OUT = f"{WTE}:input", f"{WTE}:output"
MAX_LEAVES = 4  # parameter tensors of one layer (a LoRA dense layer: kernel, bias, lora_a, lora_b)
DEFAULT_CHUNK_BYTES = 64 * 2**20


def groups(params: PyTree) -> list[str]:
    """The clipping groups of the trainable `params`, in a fixed order: every tensor by its path,
    the tied token embedding as its input and output sides."""
    out = []
    for path, _ in nnx.to_flat_state(params):
        name = path_name(path)
        out.extend([WTE_IN, WTE_OUT] if name == WTE else [name])
    return out


def sensitivity(thresholds: jax.Array, names: list[str]) -> jax.Array:
    """S(C) of the module docstring: the largest change of the clipped sum from one example."""
    c = {n: thresholds[k] for k, n in enumerate(names)}
    untied = sum(jnp.square(c[n]) for n in names if n not in (WTE_IN, WTE_OUT))
    tied = jnp.square(c.get(WTE_IN, 0.0) + c.get(WTE_OUT, 0.0))
    return jnp.sqrt(untied + tied)


def default_thresholds(l2_clip_norm: float, names: list[str]) -> jax.Array:
    """Equal thresholds c for every group with S = C: c = C / sqrt(K_untied + 4 [wte tied])."""
    tied = WTE_IN in names
    count = len(names) - (2 if tied else 0) + (4 if tied else 0)
    # (1 - 1e-6): float32 rounding never takes the sensitivity above C.
    return jnp.full((len(names),), l2_clip_norm / math.sqrt(count) * (1 - 1e-6), jnp.float32)


def _divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, max(1, min(n, k)) + 1) if n % d == 0)


def _clipped_sums(per_example_grads, xs, leaves, thresholds, trainable, mask, chunk_bytes):
    """sum_i c_ik g_ik for each leaf k, and each example's squared norms [K, B].

    `per_example_grads(leaves, x_chunk...) -> [k, *leaf.shape] per leaf` for a chunk of
    examples (`xs`: arrays with a leading batch axis). Examples are taken a few at a time (a
    fully unrolled loop: no per-example gradients of other chunks are alive)."""
    B = xs[0].shape[0]
    per_example = sum(x.size for x, t in zip(leaves, trainable, strict=True) if t) * 4
    k = _divisor_at_most(B, max(1, chunk_bytes // max(per_example, 1)))
    sums = [jnp.zeros(x.shape, jnp.float32) for x in leaves]
    sq_chunks = []
    for start in range(0, B, k):
        part = [x[start : start + k] for x in xs]
        grads = per_example_grads(leaves, *part)  # K x [k, ...]
        m = mask[start : start + k]
        sq_all = []
        for j, (g, t) in enumerate(zip(grads, trainable, strict=True)):
            if not t:
                sq_all.append(jnp.zeros((k,), jnp.float32))
                continue
            g = g.astype(jnp.float32)
            sq = jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
            finite = jnp.isfinite(sq)
            c = clip_factor(jnp.sqrt(jnp.where(finite, sq, 0.0)), thresholds[j])
            w = jnp.where(finite & (m > 0), c, 0.0)
            g = jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
            sums[j] = sums[j] + weighted_sum(g, w)
            sq_all.append(sq)
        sq_chunks.append(jnp.stack(sq_all))
    return sums, jnp.concatenate(sq_chunks, axis=1)


def _pad_probe(sq: jax.Array) -> jax.Array:
    return jnp.zeros((MAX_LEAVES, sq.shape[1]), jnp.float32).at[: sq.shape[0]].set(sq)


def _module_layer(layer, trainable, chunk_bytes):
    """A custom-vjp version of an nnx layer (Linear, LoRALinear, LayerNorm) applied to [B, T, d]."""
    graphdef, state = nnx.split(layer)
    flat = list(nnx.to_flat_state(state))
    leaves = [var.get_value() for _, var in flat]
    names = [path_name(p) for p, _ in flat]

    def apply(leaves, x):
        new = nnx.from_flat_state(
            [(p, var.replace(v)) for (p, var), v in zip(flat, leaves, strict=True)]
        )
        return nnx.merge(graphdef, new)(x)

    def per_example_grads(leaves, x, gy):  # [k, T, d], [k, T, p] -> K x [k, ...]
        one = lambda xi, gi: jax.vjp(lambda ls: apply(ls, xi[None]), leaves)[1](gi[None])[0]
        return jax.vmap(one)(x, gy)

    flags = tuple(trainable(n) for n in names)

    @jax.custom_vjp
    def f(leaves, x, thresholds, mask, probe):
        del thresholds, mask, probe
        return apply(leaves, x)

    def fwd(leaves, x, thresholds, mask, probe):
        return apply(leaves, x), (leaves, x, thresholds, mask, probe)

    def bwd(res, gy):
        leaves, x, thresholds, mask, probe = res
        _, vjp_x = jax.vjp(lambda x: apply(leaves, x), x)
        (gx,) = vjp_x(gy)
        sums, sq = _clipped_sums(
            per_example_grads, (x, gy), leaves, thresholds, flags, mask, chunk_bytes
        )
        sums = [s.astype(v.dtype) for s, v in zip(sums, leaves, strict=True)]
        return sums, gx, jnp.zeros_like(thresholds), jnp.zeros_like(mask), _pad_probe(sq)

    f.defvjp(fwd, bwd)
    return leaves, names, f


class FusedTape(Tape):
    """The model's layer hook for the fused engine: every parametrised layer's weight gradients
    come out of backpropagation already clipped per layer (module docstring).

    `thresholds`: {group: scalar}; `mask` [B] float (1 for real rows); `probes`: {layer name:
    zeros [MAX_LEAVES, B]} whose gradients are the layer's per-example squared norms."""

    def __init__(self, trainable_groups, thresholds, mask, probes, chunk_bytes):
        super().__init__()
        self.trainable_groups = set(trainable_groups)
        self.thresholds, self.mask, self.probes = thresholds, mask, probes
        self.chunk_bytes = chunk_bytes
        self.seen: dict[str, list[str]] = {}  # layer -> the groups it clipped
        self.leaf_names: dict[str, list[str]] = {}  # layer -> its tensors' names, in order

    def _threshold(self, group: str) -> jax.Array:
        return self.thresholds.get(group, jnp.ones((), jnp.float32))

    def __call__(self, name, layer, x):
        if name == "embed":
            return self._embed(layer, x)
        if name == "lm_head":
            return self._lm_head(x)
        trainable = lambda leaf: f"{name}.{leaf}" in self.trainable_groups
        leaves, leaf_names, f = _module_layer(layer, trainable, self.chunk_bytes)
        groups_ = [f"{name}.{n}" for n in leaf_names]
        self.leaf_names[name] = leaf_names
        self.seen[name] = [g for g in groups_ if g in self.trainable_groups]
        if not self.seen[name]:  # a frozen layer: plain backpropagation
            return layer(x)
        th = jnp.stack([self._threshold(g) for g in groups_])
        return f(leaves, x, th, self.mask, self.probes[name])

    # The tied token embedding: input side (with the position embedding) and output side.

    def bind(self, model) -> None:
        self.model = model

    def _embed(self, embed, ids):
        wte = self.model.wte.embedding.get_value()
        wpe = self.model.wpe.embedding.get_value()
        groups_ = [WTE_IN, "wpe.embedding"]
        flags = tuple(g in self.trainable_groups for g in groups_)
        self.seen["embed"] = [g for g, t in zip(groups_, flags, strict=True) if t]
        if not any(flags):
            return embed(ids)
        th = jnp.stack([self._threshold(g) for g in groups_])
        T = ids.shape[1]

        dtype = self.model.config.dtype  # the compute dtype (bf16 in mixed precision)

        @jax.custom_vjp
        def f(wte, wpe, th, mask, probe):
            del th, mask, probe
            return (wte[ids] + wpe[:T][None]).astype(dtype)

        def fwd(wte, wpe, th, mask, probe):
            return f(wte, wpe, th, mask, probe), (wte, wpe, th, mask)

        def bwd(res, g):  # g [B, T, D]: the embedding output's gradient
            wte, wpe, th, mask = res
            g = g.astype(jnp.float32)
            # E_i's nonzero rows (E_i itself, [V, D], is never formed): rows[b, t] is the sum of
            # g over the positions holding token ids[b, t], kept at its first position only. The
            # norm is taken of exactly these rows and the same rows are summed into wte, so
            # rounding cannot make the contribution larger than the norm says.
            same = (ids[:, :, None] == ids[:, None, :]).astype(jnp.float32)  # [B, T, T]
            first = jnp.argmax(same, axis=2) == jnp.arange(T)[None, :]  # [B, T]
            rows = jnp.where(first[..., None], jnp.einsum("bts,bsd->btd", same, g), 0.0)
            sq_in = jnp.sum(jnp.square(rows), (1, 2))
            sq_pos = jnp.sum(jnp.square(g), (1, 2))  # positions are distinct
            out, sq = [], []
            for j, (s, t, v) in enumerate(zip((sq_in, sq_pos), flags, (rows, g), strict=True)):
                finite = jnp.isfinite(s)
                c = clip_factor(jnp.sqrt(jnp.where(finite, s, 0.0)), th[j])
                w = jnp.where(finite & (mask > 0) & t, c, 0.0)
                out.append(jnp.where(finite[:, None, None], v, 0.0) * w[:, None, None])
                sq.append(jnp.where(t, s, 0.0))
            d_wte = jnp.zeros(wte.shape, jnp.float32).at[ids].add(out[0]).astype(wte.dtype)
            d_wpe = jnp.zeros(wpe.shape, jnp.float32).at[:T].add(jnp.sum(out[1], 0))
            probe = _pad_probe(jnp.stack(sq))
            return d_wte, d_wpe.astype(wpe.dtype), jnp.zeros_like(th), jnp.zeros_like(mask), probe

        f.defvjp(fwd, bwd)
        return f(wte, wpe, th, self.mask, self.probes["embed"])

    def _lm_head(self, h):
        wte = self.model.wte.embedding.get_value()
        trainable = WTE_OUT in self.trainable_groups
        self.seen["lm_head"] = [WTE_OUT] if trainable else []
        if not trainable:
            return self.model.wte.attend(h)
        th = jnp.stack([self._threshold(WTE_OUT)])

        def apply(leaves, x):
            return jnp.einsum("btd,vd->btv", x, leaves[0].astype(x.dtype))

        def per_example_grads(leaves, x, gy):  # L_i = GL_i^T H_i, accumulated in float32
            return [jnp.einsum("btv,btd->bvd", gy, x, preferred_element_type=jnp.float32)]

        @jax.custom_vjp
        def f(wte, h, th, mask, probe):
            del th, mask, probe
            return apply([wte], h)

        def fwd(wte, h, th, mask, probe):
            return f(wte, h, th, mask, probe), (wte, h, th, mask)

        def bwd(res, gy):
            wte, h, th, mask = res
            gx = jnp.einsum("btv,vd->btd", gy, wte.astype(gy.dtype)).astype(h.dtype)
            sums, sq = _clipped_sums(
                per_example_grads, (h, gy), [wte], th, (trainable,), mask, self.chunk_bytes
            )
            return (
                sums[0].astype(wte.dtype),
                gx.astype(h.dtype),
                jnp.zeros_like(th),
                jnp.zeros_like(mask),
                _pad_probe(sq),
            )

        f.defvjp(fwd, bwd)
        return f(wte, h, th, self.mask, self.probes["lm_head"])


def _layer_names(graphdef, params, frozen, tokens) -> list[str]:
    probe = Tape()
    jax.eval_shape(lambda: merge(graphdef, params, frozen)(tokens, tape=probe))
    return list(probe.inputs)


def fused_clipped_grad(
    graphdef: nnx.GraphDef,
    l2_clip_norm: float,
    *,
    microbatch_size: int | None = None,
    frozen: PyTree = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """Per-layer clipping fused into backpropagation, for `jaxdp.gpt2` models.

    fn(params, batch {"tokens" [B, T], optional "token_mask"}, is_padding [B], key=None,
    segment_ids=None, thresholds=None) -> (clipped_sum, ClipStats): the same contract as
    `clipping.clipped_grad(..., clipping="per_layer")` with this module's groups (`groups`;
    thresholds [K] in that order, default `default_thresholds`), sensitivity S(thresholds) = C.
    """
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")

    def make_chunk_fn(thresholds):
        def chunk_fn(params, chunk, pad, keys, segment_ids):
            if segment_ids is not None:
                raise NotImplementedError(
                    "The fused engine clips one row per unit; units of several rows (records "
                    "or users of several blocks, micro-batch clipping cells) need "
                    "dp.engine='vmap' or 'ghost'."
                )
            key = None if keys is None else keys[0]
            names = groups(params)
            th = default_thresholds(l2_clip_norm, names) if thresholds is None else thresholds
            tokens, mask_t = chunk["tokens"], chunk.get("token_mask")
            layers = _layer_names(graphdef, params, frozen, tokens)
            B = tokens.shape[0]
            probes = {n: jnp.zeros((MAX_LEAVES, B), jnp.float32) for n in layers}
            mask = (~pad).astype(jnp.float32)
            tapes = []

            def total_loss(params, probes):
                tape = FusedTape(
                    names, {n: th[k] for k, n in enumerate(names)}, mask, probes, chunk_bytes
                )
                model = merge(graphdef, params, frozen)
                tape.bind(model)
                losses = example_loss(model(tokens, dropout_key=key, tape=tape), tokens, mask_t)
                tapes.append(tape)
                return jnp.sum(losses * mask), losses

            (summed, probe_grads), losses = jax.grad(total_loss, (0, 1), has_aux=True)(
                params, probes
            )
            seen = {g for gs in tapes[0].seen.values() for g in gs}
            missing = [n for n in names if n not in seen]
            if missing:  # an unclipped gradient would break the guarantee: refuse
                raise NotImplementedError(
                    f"The fused engine has no clipped gradient for parameter(s) {missing}; "
                    f"use dp.engine='vmap'."
                )
            # Per-example squared norms of every group, from the probes' gradients.
            sq = _group_sq(tapes[0], probe_grads, names)
            real = ~pad
            norms_sq = jnp.stack([sq[n] for n in names])  # [K, B]
            finite = jnp.all(jnp.isfinite(norms_sq), axis=0) & jnp.isfinite(losses)
            norms = jnp.sqrt(jnp.sum(jnp.where(jnp.isfinite(norms_sq), norms_sq, 0.0), 0))
            below = (jnp.sqrt(norms_sq) <= th[:, None]).T  # [B, K]; NaN -> False
            keep = real & finite
            units = UnitStats.of(
                [jnp.where(keep, s, 0.0) for s in norms_sq], below & keep[:, None], real
            )
            clipped = keep & ~jnp.all(below, axis=1)
            return summed, chunk_stats(losses, norms, real, finite, clipped, units)

        return chunk_fn

    def fn(params, batch, is_padding, key=None, segment_ids=None, thresholds=None):
        return scan_microbatches(
            make_chunk_fn(thresholds), params, batch, is_padding, key, microbatch_size, segment_ids
        )

    return fn


def _group_sq(tape: FusedTape, probe_grads: dict, names: list[str]) -> dict[str, jax.Array]:
    """{group: per-example squared norm [B]} from the probes' gradients (rows in leaf order)."""
    out = {}
    for layer, grad in probe_grads.items():
        if layer == "embed":
            out[WTE_IN], out["wpe.embedding"] = grad[0], grad[1]
        elif layer == "lm_head":
            out[WTE_OUT] = grad[0]
        elif layer in tape.leaf_names:
            for j, leaf in enumerate(tape.leaf_names[layer]):
                out[f"{layer}.{leaf}"] = grad[j]
    return {n: out[n] for n in names}
