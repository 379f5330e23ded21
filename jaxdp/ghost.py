"""Ghost clipping with book-keeping: DP-SGD's clipped gradient sum in ONE backward pass, without
materialising per-example gradients of the large layers.

Same result as `jaxdp.clipping.clipped_grad` with flat clipping (the sum over real examples of
g_i * min(1, C / ||g_i||)) or per-layer clipping. Per microbatch:

1. One forward pass and one backward pass to the layers' outputs only (`gpt2.Tape` adds zero
   perturbations whose gradients are the output gradients G, and records the inputs A; no weight
   gradient is formed). Examples do not interact in the batched forward pass, so row i of G is
   example i's own output gradient.

2. Per-example squared gradient norms of every trainable parameter, from A and G:

   - dense kernel W (y = A W): ||A_i^T G_i||_F^2, either as the ghost norm <A_i A_i^T, G_i G_i^T>
     (T x T Gram matrices) or by instantiating A_i^T G_i (d x p), whichever needs less memory
     per example (2 T^2 vs d p, `dense_strategy`); bias: ||sum_t G_it||^2
   - LoRA adapters (y = x W + (x A) B s): dense layers with input (x A) s and output gradient G
     (for B), and input x and output gradient (G B^T) s (for A)
   - layer norm (y = xhat * scale + bias): scale: ||sum_t G_it * xhat_it||^2, bias as above
   - position embedding wpe: ||sum_t e_t G0_it^T||^2 = sum_t ||G0_it||^2 (positions are distinct)
   - token embedding wte, which is also the output layer (tied; ghost unless 2 T^2 >= V D or
     instantiation is forced): its gradient is
     E_i + L_i with E_i = sum_t onehot(id_it) G0_it^T (input side) and L_i = GL_i^T H_i (output
     side; GL = dloss/dlogits, H = final hidden states), so
     ||E_i + L_i||^2 = ||E_i||^2 + ||L_i||^2 + 2 <E_i, L_i>, with
     ||E_i||^2 = sum_{t,s} [id_it = id_is] G0_it . G0_is,  ||L_i||^2 = <H_i H_i^T, GL_i GL_i^T>,
     <E_i, L_i> = sum_{t,s} GL_i[s, id_it] (H_is . G0_it)   (the cross term; nothing is untied).

3. Book-keeping: with c_i = min(1, C / ||g_i||), the clipped sum of every parameter is formed
   directly from the same A and G, e.g. sum_i c_i A_i^T G_i = (c A)^T G for a dense kernel
   (one matmul, as in a non-private backward pass) or sum_i c_i (A_i^T G_i) from the
   instantiated per-example gradients. No second backward pass is needed.

Clipping units of several rows (`segment_ids`: a record cut into blocks, a user's records) are
refused: their norm would have to come from pair products <g_i, g_j> (a different computation
from the summed values), which rounding can make smaller than the unit's summed gradient when
the unit's rows nearly cancel; the vmap engine norms the summed unit gradient itself.

Book-kept sums weigh per-example values in full float32 precision (`clipping.weighted_sum`; a
GPU's default TF32 would round them by 2^-11): each instantiated gradient, bias, layer-norm
scale and position embedding gradient is summed from exactly the values its norm was taken of,
so clipping's 1e-5 rounding margin bounds every contribution by C. The Gram-matrix path (T x T
norms, (cA)^T G sums) is two computations of one gradient, both in full float32 precision (a
GPU's TF32 default rounds matmul inputs to 2^-11, far more than the margin; so Gram layers run
slower than TF32 matmuls on GPUs). The margin covers their difference for ordinary gradients,
but not in the worst case: when a gradient's token terms nearly cancel (sum_t ||a_t|| ||g_t||
much larger than ||A^T G||), float32 rounding of the T^2 cross terms can exceed it. Refused in
bfloat16; use "instantiate" (or a plan without Gram layers) where that matters.

Examples with non-finite norms get c_i = 0 and their A and G are zeroed before the
sums (a branch taken only when such an example occurs), so they contribute exactly zero, as in
the vmap engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.clipping import (
    CLIPPING_MODES,
    ClipStats,
    UnitStats,
    chunk_stats,
    clip_factors,
    scan_microbatches,
    weighted_sum,
)
from jaxdp.gpt2 import Tape
from jaxdp.lora import LoRALinear
from jaxdp.loss import example_loss
from jaxdp.params import PyTree, merge, path_name

STRATEGIES = ("auto", "ghost", "instantiate")

_LN_SUFFIXES = ("ln_1", "ln_2", "ln_f")
_GROUP_OF_PATH = {"wte.embedding": "wte", "wpe.embedding": "wpe"}


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _sq(x: jax.Array) -> jax.Array:
    """Per-example squared L2 norm over all but the leading axis."""
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def _exact(spec: str, *operands: jax.Array) -> jax.Array:
    """An einsum of the Gram-matrix path in full float32 precision: its norms and its book-kept
    sums are two computations of one gradient, which a GPU's default TF32 matmuls (inputs
    rounded to 2^-11) would make disagree by far more than clipping's rounding margin."""
    return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST)


def _gram_inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """<a_i a_i^T, b_i b_i^T> for a [B, T, d], b [B, T, p] -> [B]."""
    return jnp.sum(_exact("btd,bsd->bts", a, a) * _exact("btp,bsp->bts", b, b), (1, 2))


def check_strategy(strategy) -> None:
    """A strategy is one name of STRATEGIES for every layer, or a per-layer plan: pairs or a
    mapping {layer name ("h.0.attn.c_attn", "lm_head" for the tied embedding): name}."""
    if isinstance(strategy, str):
        dense_strategy(1, 1, 1, strategy)
        return
    try:
        items = dict(strategy).items()
    except (TypeError, ValueError):
        raise ValueError(
            f"A ghost strategy is one of {STRATEGIES} or a per-layer mapping, got {strategy!r}."
        ) from None
    for name, value in items:
        if not isinstance(name, str) or value not in STRATEGIES:
            raise ValueError(f"Bad per-layer ghost strategy {name!r}: {value!r}.")


def dense_strategy(T: int, d: int, p: int, strategy: str = "auto") -> str:
    """'ghost' or 'instantiate' for a [T, d] -> [T, p] dense layer.

    "auto" picks the one with the smaller per-example memory: two T x T Gram matrices (ghost)
    or one d x p gradient (instantiated, kept until the clipping weights are known)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown dense strategy {strategy!r}; choose one of {STRATEGIES}.")
    if strategy != "auto":
        return strategy
    return "ghost" if 2 * T * T < d * p else "instantiate"


def dense_sq_norms(a: jax.Array, g: jax.Array, strategy: str = "auto") -> jax.Array:
    """||a_i^T g_i||_F^2 per example for a [B, T, d], g [B, T, p]."""
    return _dense(a, g, strategy)[0]


def _dense(a: jax.Array, g: jax.Array, strategy: str) -> tuple[jax.Array, jax.Array | None]:
    """(squared norms [B], instantiated per-example gradients [B, d, p] or None)."""
    if dense_strategy(a.shape[1], a.shape[2], g.shape[2], strategy) == "ghost":
        return _gram_inner(a, g), None
    per_example = jnp.einsum("btd,btp->bdp", a, g)  # [B, d, p]
    return _sq(per_example), per_example


def _weighted_dense(a, g, w, per_example):
    """sum_i w_i a_i^T g_i, weighting the narrower of a and g (or the instantiated gradients)."""
    if per_example is not None:
        return weighted_sum(per_example, w)
    if a.shape[-1] <= g.shape[-1]:
        return _exact("btd,btp->dp", a * w[:, None, None], g)
    return _exact("btd,btp->dp", a, g * w[:, None, None])


def _layer(model, name: str):
    """The submodule at a dotted path such as 'h.0.attn.c_attn'."""
    for part in name.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _xhat(x: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class _Pass:
    """One forward/backward pass to the layer outputs: losses, layer inputs and output grads."""

    def __init__(self, graphdef, params, batch, key, frozen, strategy="auto"):
        self.tokens = batch["tokens"]
        mask = batch.get("token_mask")
        self.model = merge(graphdef, params, frozen)
        self.config = self.model.config
        self.strategy = strategy if isinstance(strategy, str) else dict(strategy)

        def forward(tape):
            logits = merge(graphdef, params, frozen)(self.tokens, dropout_key=key, tape=tape)
            return example_loss(logits, self.tokens, mask)

        # The taps' shapes, recorded during an abstract trace (no computation).
        probe = Tape()
        jax.eval_shape(lambda: forward(probe))
        zeros = {name: jnp.zeros(o.shape, o.dtype) for name, o in probe.outputs.items()}

        def total_loss(perturbations):
            tape = Tape(perturbations)
            losses = forward(tape)
            return jnp.sum(losses), (losses, tape.inputs)

        grads, (self.losses, inputs) = jax.grad(total_loss, has_aux=True)(zeros)
        self.low_precision = any(o.dtype != jnp.float32 for o in probe.outputs.values())
        if not isinstance(self.strategy, str):  # a per-layer plan names dense layers only
            dense = {n for n in probe.outputs if n != "embed" and not n.endswith(_LN_SUFFIXES)}
            unknown = sorted(set(self.strategy) - dense)
            if unknown:
                raise ValueError(
                    f"The per-layer ghost strategy names layers this model does not have: "
                    f"{unknown[:5]}; its dense layers are e.g. {sorted(dense)[:3]}."
                )
        self.inputs = {k: _f32(v) for k, v in inputs.items()}
        self.grads = {k: _f32(v) for k, v in grads.items()}
        # LoRA adapters' factors, formed once: their norms and their sums must use the same
        # values (two separately compiled matmuls need not round alike).
        self.lora_factors: dict[str, tuple[jax.Array, jax.Array]] = {}
        for name in self.grads:
            layer = None if name in ("embed", "lm_head") else _layer(self.model, name)
            if isinstance(layer, LoRALinear):
                x, g = self.inputs[name], self.grads[name]
                a, b = _f32(layer.lora_a.get_value()), _f32(layer.lora_b.get_value())
                xa, gb = _exact("btd,dr->btr", x, a), _exact("btp,rp->btr", g, b)
                self.lora_factors[f"{name}.lora_b"] = (xa * layer.scale, g)  # [B,T,r], [B,T,p]
                self.lora_factors[f"{name}.lora_a"] = (x, gb * layer.scale)  # [B,T,d], [B,T,r]

    def strategy_of(self, name: str, T: int, d: int, p: int) -> str:
        """ "ghost" or "instantiate" for a [T, d] -> [T, p] dense group of layer `name`."""
        given = self.strategy if isinstance(self.strategy, str) else self.strategy.get(name, "auto")
        chosen = dense_strategy(T, d, p, given)
        if chosen == "ghost" and self.low_precision:
            # A Gram-matrix norm and the book-kept sum are two computations of the same
            # gradient; in low precision their rounding differs by more than a margin covers
            # when a gradient's token terms nearly cancel, so a contribution could exceed C.
            raise NotImplementedError(
                f"Layer {name}: Gram-matrix (ghost) norms are not used with a bfloat16 model, "
                f"whose per-example contributions must be normed from the values summed; use "
                f'dp.ghost_strategy "instantiate" or "plan" (or the vmap or fused engine).'
            )
        return chosen

    def sanitized(self, keep: jax.Array) -> _Pass:
        """A copy whose dropped examples (keep=False) have all-zero inputs and output grads."""
        zero = lambda x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        new = copy.copy(self)
        new.inputs = jax.tree.map(zero, self.inputs)
        new.grads = jax.tree.map(zero, self.grads)
        new.lora_factors = jax.tree.map(zero, self.lora_factors)
        return new

    # Per-example squared norms ------------------------------------------------------------------

    def sq_norms(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """({parameter group: squared norm [B]}, {group: instantiated per-example gradient}).

        Every group is computed; under jit, those not used are pruned."""
        sq, kept = self._layer_terms()
        g0, gl, h = self.grads["embed"], self.grads["lm_head"], self.inputs["lm_head"]
        tokens, (B, T) = self.tokens, self.tokens.shape
        sq["wpe"] = _sq(g0)
        if self.strategy_of("lm_head", T, h.shape[-1], gl.shape[-1]) == "instantiate":
            # E_i + L_i as one [V, D] matrix per example (memory B V D; no cross term needed).
            per_example = jnp.einsum("btv,btd->bvd", gl, h)  # [B, V, D]: L_i
            per_example = per_example.at[jnp.arange(B)[:, None], tokens].add(g0)  # + E_i
            sq["wte"], kept["wte"] = _sq(per_example), per_example
            return sq, kept
        same = (tokens[:, :, None] == tokens[:, None, :]).astype(jnp.float32)  # [B, T, T]
        emb_in = jnp.sum(same * _exact("btd,bsd->bts", g0, g0), (1, 2))
        emb_out = _gram_inner(h, gl)
        gl_at_ids = jnp.take_along_axis(
            gl, jnp.broadcast_to(tokens[:, None, :], (B, T, T)), 2
        )  # [B, T, T]: gl_at_ids[b, s, t] = GL[b, s, id_bt]
        cross = jnp.sum(gl_at_ids * _exact("bsd,btd->bst", h, g0), (1, 2))  # [B]
        sq["wte"] = emb_in + emb_out + 2.0 * cross
        sq["_wte_cross"] = 2.0 * cross  # part of "wte", reported for inspection only
        return sq, kept

    def _layer_terms(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """The layers other than the embeddings: ({group: squared norm [B]}, {group: per-example
        gradient}) with every layer norm's and bias's per-example gradient kept (small) and each
        dense group's when instantiated, so that its sum weighs the values that were normed."""
        out: dict[str, jax.Array] = {}
        kept: dict[str, jax.Array] = {}
        for name, g in self.grads.items():
            if name in ("embed", "lm_head"):
                continue
            if name.endswith(_LN_SUFFIXES):
                xhat = _xhat(self.inputs[name], self.config.layer_norm_epsilon)
                kept[f"{name}.scale"] = jnp.sum(g * xhat, 1)  # [B, d]
                out[f"{name}.scale"] = _sq(kept[f"{name}.scale"])
            else:
                for group, (a, grad_out) in self._dense_factors(name).items():
                    T, d, p = a.shape[1], a.shape[2], grad_out.shape[2]
                    chosen = self.strategy_of(name, T, d, p)
                    out[group], per_example = _dense(a, grad_out, chosen)
                    if per_example is not None:
                        kept[group] = per_example
            kept[f"{name}.bias"] = jnp.sum(g, 1)  # [B, p]
            out[f"{name}.bias"] = _sq(kept[f"{name}.bias"])
        return out, kept

    def _dense_factors(self, name: str) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{kernel-like group: (input [B, T, d], output gradient [B, T, p])} of a dense layer."""
        factors = {f"{name}.kernel": (self.inputs[name], self.grads[name])}
        for group in (f"{name}.lora_b", f"{name}.lora_a"):
            if group in self.lora_factors:
                factors[group] = self.lora_factors[group]
        return factors

    # Book-keeping: weighted sums -----------------------------------------------------------------

    def weighted_sum(self, group: str, w: jax.Array, kept: dict[str, jax.Array]) -> jax.Array:
        """sum_i w_i g_i for one parameter group, g_i its per-example gradient."""
        if group in kept:  # instantiated: the very values that were normed
            return weighted_sum(kept[group], w)
        if group == "wte":
            g0, gl, h = self.grads["embed"], self.grads["lm_head"], self.inputs["lm_head"]
            out_side = _exact("btv,btd->vd", gl, h * w[:, None, None])  # [V, D]
            return out_side.at[self.tokens].add(g0 * w[:, None, None])  # + input side
        if group == "wpe":
            g0 = self.grads["embed"]
            summed = weighted_sum(g0, w)  # [T, D]
            return jnp.zeros((self.config.n_positions, g0.shape[-1])).at[: g0.shape[1]].set(summed)
        name, _ = group.rsplit(".", 1)
        a, out = self._dense_factors(name)[group]  # a Gram-normed dense group
        return _weighted_dense(a, out, w, None)


def _groups(params: PyTree) -> list[tuple[tuple, str]]:
    """(path, ghost group name) of every parameter in `params`."""
    out = []
    for path, _ in nnx.to_flat_state(params):
        name = path_name(path)
        out.append((path, _GROUP_OF_PATH.get(name, name)))
    return out


def _total_norms(sq: dict[str, jax.Array], groups) -> jax.Array:
    """Per-example norm [B] of the gradient w.r.t. the parameter `groups` together."""
    for _, group in groups:
        if group not in sq:
            raise NotImplementedError(
                f"The ghost engine has no per-example norm for parameter {group!r}; "
                f"use dp.engine='vmap'."
            )
    return jnp.sqrt(jnp.maximum(sum(sq[g] for _, g in groups), 0.0))


def ghost_sq_norms(
    graphdef: nnx.GraphDef, params: PyTree, batch: dict, key=None, frozen=None, strategy="auto"
):
    """({parameter group: per-example squared gradient norm [B]}, per-example losses [B]).

    Groups are named by parameter path (`h.0.attn.c_attn.kernel`, `ln_f.scale`, `wte`, `wpe`);
    all are computed, whether trainable or not."""
    recorded = _Pass(graphdef, params, batch, key, frozen, strategy)
    return recorded.sq_norms()[0], recorded.losses


def ghost_norms(
    graphdef: nnx.GraphDef, params: PyTree, batch: dict, key=None, frozen=None, strategy="auto"
):
    """(per-example norms [B] of the gradient w.r.t. `params`, per-example losses [B]).

    Only the groups of the trainable `params` count; frozen parameters are left out."""
    sq, losses = ghost_sq_norms(graphdef, params, batch, key, frozen, strategy)
    return _total_norms(sq, _groups(params)), losses


def ghost_clipped_grad(
    graphdef: nnx.GraphDef,
    l2_clip_norm: float,
    *,
    microbatch_size: int | None = None,
    frozen: PyTree = None,
    strategy: str = "auto",
    clipping: str = "flat",
    with_raw_sum: bool = False,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """The ghost-clipping counterpart of `clipping.clipped_grad` for `jaxdp.gpt2` models.

    fn(params, batch {"tokens": [B, T], optional "token_mask": [B, T]}, is_padding [B], key=None,
    segment_ids=None) -> (clipped_sum, ClipStats), the gradient taken w.r.t. `params` (the
    trainable parameters; `frozen` holds the rest). `segment_ids` (units of several rows) are
    refused (see the module docstring).
    `strategy` chooses how dense layers' norms are computed ("auto", "ghost", "instantiate").
    `clipping` is "flat" (one norm per example) or "per_layer" (each parameter tensor clipped
    to its threshold, C / sqrt(K) of K by default, as in `clipping.clip_and_sum`); sensitivity C
    either way. `fn(..., thresholds=[K_c])` and `with_raw_sum` as in `clipping.clipped_grad`.
    Dropout, if any, uses one key per microbatch.
    """
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")
    check_strategy(strategy)
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"Unknown clipping {clipping!r}; choose one of {CLIPPING_MODES}.")

    def make_chunk_fn(thresholds):
        def chunk_fn(params, chunk, pad, keys, segment_ids):
            return _chunk(params, chunk, pad, keys, segment_ids, thresholds)

        return chunk_fn

    def _chunk(params, chunk, pad, keys, segment_ids, thresholds):
        key = None if keys is None else keys[0]
        recorded = _Pass(graphdef, params, chunk, key, frozen, strategy)
        groups = _groups(params)
        if segment_ids is not None:
            raise NotImplementedError(
                "The ghost engine clips one row per unit; units of several rows (records or "
                "users of several blocks) need dp.engine='vmap', which norms each unit's summed "
                "gradient itself (see jaxdp/ghost.py)."
            )
        sq, kept = recorded.sq_norms()
        norms = _total_norms(sq, groups)
        real, finite = ~pad, jnp.isfinite(norms)
        keep = real & finite
        group_sq = [sq[g] for _, g in groups]
        factors, scaled, below = clip_factors(group_sq, l2_clip_norm, clipping, thresholds)
        weights = [jnp.where(keep, f, 0.0) for f in factors]
        clipped = keep & scaled
        units = UnitStats.of(  # every row is its own unit
            [jnp.where(keep, x, 0.0) for x in group_sq], below & keep[:, None], real
        )
        ones = [keep.astype(jnp.float32)] * len(groups)

        def sums(t: _Pass, kept, ws):
            return [t.weighted_sum(g, w, kept) for (_, g), w in zip(groups, ws, strict=True)]

        def sanitized_sums(t: _Pass, kept, ws):
            kept = jax.tree.map(
                lambda x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), kept
            )
            return sums(t.sanitized(keep), kept, ws)

        def as_tree(leaves):
            return nnx.from_flat_state(
                [
                    (path, var.replace(leaf.astype(var.get_value().dtype)))
                    for (path, var), leaf in zip(nnx.to_flat_state(params), leaves, strict=True)
                ]
            )

        # Zeroing dropped examples costs a pass over every saved activation: do it only when a
        # non-finite example occurs (0 * NaN would otherwise poison the sums).
        def all_sums(fn):
            return (fn(recorded, kept, weights), fn(recorded, kept, ones) if with_raw_sum else [])

        leaves, raw = jax.lax.cond(
            jnp.all(finite), lambda: all_sums(sums), lambda: all_sums(sanitized_sums)
        )
        stats = chunk_stats(recorded.losses, norms, real, finite, clipped, units)
        if with_raw_sum:
            return (as_tree(leaves), as_tree(raw)), stats
        return as_tree(leaves), stats

    def fn(
        params: PyTree,
        batch: PyTree,
        is_padding: jax.Array,
        key: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        thresholds: jax.Array | None = None,
    ):
        return scan_microbatches(
            make_chunk_fn(thresholds), params, batch, is_padding, key, microbatch_size, segment_ids
        )

    return fn
