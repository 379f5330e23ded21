"""A per-layer plan for flat clipping with the ghost engine, chosen by cost (issue 18).

For each dense layer ([T, d] -> [T, p], per example; GPT-2's four per block and the tied output
layer `lm_head`, d = n_embd, p = vocab) the ghost engine gets the per-example gradient norm one of
two ways:

    Gram ("ghost")   <A_i A_i^T, G_i G_i^T>: 2 T^2 (d + p) extra FLOPs per example, two T x T
                     matrices of scratch, nothing kept
    instantiate      A_i^T G_i formed (the weight-gradient matmul a non-private step does anyway,
                     per example), normed and, once the clip factors are known, summed with them
                     (book-kept): about 4 d p extra FLOPs, but d p floats per example KEPT until
                     every layer's norm is known

so instantiating is nearly free in FLOPs and costs memory, M d p floats for a microbatch of M.
`plan` picks the microbatch size M (a divisor of the physical batch B) and the instantiated
layers that minimise the step's FLOPs subject to a memory budget: the step's estimated peak at
most `budget` (default 1.1) times the non-private step's at the same physical batch B. It is a
knapsack solved greedily by FLOPs saved per byte kept, for each M; ties go to the larger M (fewer,
larger matmuls run faster).

Memory model (bytes): the train state S (parameters, optimizer state, the gradient or clipped-sum
accumulator), activations of `activation_bytes(config, T)` per example (Korthikanti et al. 2022's
count for a transformer layer, 34 T D + 5 H T^2 half-precision bytes, scaled to the compute dtype,
plus the logits), what the ghost engine keeps on top (`ghost_activation_bytes`), and the
instantiated gradients (float32). Non-private: S + B act; DP: S + M (act + ghost + kept) + the
largest Gram scratch. Checked on GPT-2 small against XLA's CPU estimate (B32 T256: 0.48 GiB of
activations per example non-private, 1.17 GiB per example for the DP step at M = 16 with every
layer instantiated). The model is a planning estimate: `scripts/
benchmark.py --compile-only` reports the compiler's own peak estimate of the planned step next to
the non-private one, which is what the targets are checked on.
"""

from __future__ import annotations

import dataclasses

from jaxdp.gpt2 import GPT2Config

DEFAULT_BUDGET = 1.1  # the planned step's peak memory / the non-private step's
F32 = 4  # bytes: per-example gradients, norms and sums are float32 whatever the compute dtype


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    name: str  # "h.0.attn.c_attn", ..., "lm_head" (the tied embedding's output side)
    d: int
    p: int

    def gram_flops(self, T: int) -> float:
        """Extra FLOPs per example of a Gram-matrix norm."""
        return 2.0 * T * T * (self.d + self.p) + 2.0 * T * T

    def instantiate_flops(self) -> float:
        """Extra FLOPs per example of an instantiated norm and book-kept sum."""
        return 4.0 * self.d * self.p

    def kept_bytes(self, vocab: int) -> int:
        """Bytes per example kept by instantiation (the tied embedding: its whole [V, D])."""
        return F32 * (vocab * self.d if self.name == "lm_head" else self.d * self.p)


@dataclasses.dataclass(frozen=True)
class ClippingPlan:
    microbatch_size: int
    strategies: tuple[tuple[str, str], ...]  # ((layer, "ghost" | "instantiate"), ...)
    extra_flops: float  # over the non-private step, per step (the model's count)
    flops_ratio: float  # non-private FLOPs / planned FLOPs (the model's)
    memory_ratio: float  # planned peak / non-private peak (the model's)

    @property
    def instantiated(self) -> list[str]:
        return [name for name, s in self.strategies if s == "instantiate"]

    def describe(self) -> str:
        n, k = len(self.strategies), len(self.instantiated)
        return (
            f"microbatch {self.microbatch_size}, {k} of {n} dense layers instantiated "
            f"(model: FLOPs {self.flops_ratio:.3f}x of non-private, memory "
            f"{self.memory_ratio:.2f}x)"
        )


def dense_layers(config: GPT2Config) -> list[DenseLayer]:
    D, H = config.n_embd, config.mlp_dim
    out = []
    for i in range(config.n_layer):
        out += [
            DenseLayer(f"h.{i}.attn.c_attn", D, 3 * D),
            DenseLayer(f"h.{i}.attn.c_proj", D, D),
            DenseLayer(f"h.{i}.mlp.c_fc", D, H),
            DenseLayer(f"h.{i}.mlp.c_proj", H, D),
        ]
    return out + [DenseLayer("lm_head", D, config.vocab_size)]


def num_params(config: GPT2Config) -> int:
    D, H, L = config.n_embd, config.mlp_dim, config.n_layer
    block = 4 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)
    return config.vocab_size * D + config.n_positions * D + L * block + 2 * D


def nonprivate_flops(config: GPT2Config, T: int) -> float:
    """FLOPs per example of a forward and backward pass (matmuls and attention)."""
    D, L = config.n_embd, config.n_layer
    return 6.0 * num_params(config) * T + 12.0 * L * T * T * D


def activation_bytes(config: GPT2Config, T: int) -> float:
    """Activation memory per example of a non-private step (the backward pass's saved values)."""
    scale = 2.0 if config.compute_dtype == "float32" else 1.0  # the count is for 2-byte floats
    D, heads, L = config.n_embd, config.n_head, config.n_layer
    per_layer = T * (34.0 * D + 5.0 * heads * T)
    logits = 5.0 * T * config.vocab_size * F32  # logits, log-softmax, their gradients (float32)
    return scale * L * per_layer + logits


def ghost_activation_bytes(config: GPT2Config, T: int) -> float:
    """What the ghost engine keeps per example on top (`jaxdp.ghost._Pass`): every dense layer's
    output gradient and input (9 D + 7 D per token and block), in the compute dtype and as the
    float32 copies the norms are taken from, and the output layer's [T, V] gradient."""
    itemsize = 4 if config.compute_dtype == "float32" else 2
    per_token_block = 16.0 * config.n_embd * (F32 + (itemsize if itemsize != F32 else 0))
    return config.n_layer * T * per_token_block + 2.0 * T * config.vocab_size * F32


def state_bytes(config: GPT2Config, optimizer_slots: int = 2) -> float:
    """Parameters, optimizer state (Adam: two slots) and one gradient-sized accumulator."""
    return F32 * num_params(config) * (2 + optimizer_slots)


def plan(
    config: GPT2Config,
    seq_len: int,
    batch_size: int,
    *,
    microbatch_sizes: list[int] | None = None,
    budget: float = DEFAULT_BUDGET,
    allow_gram: bool = True,
) -> ClippingPlan:
    """The cheapest (FLOPs) per-layer plan whose memory fits `budget` x the non-private step's.

    `microbatch_sizes`: the candidates for M (default: every divisor of `batch_size`).
    `allow_gram=False` instantiates every layer (a bfloat16 model: `jaxdp.ghost` norms only the
    values it sums there) and just picks M."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}.")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}.")
    T, V = seq_len, config.vocab_size
    candidates = microbatch_sizes or [m for m in range(1, batch_size + 1) if batch_size % m == 0]
    layers = dense_layers(config)
    state, act = state_bytes(config), activation_bytes(config, T)
    nonprivate_peak = state + batch_size * act
    act_dp = act + ghost_activation_bytes(config, T)
    base_flops = batch_size * nonprivate_flops(config, T)
    gram_scratch = 2 * T * T * F32
    # Instantiating layer l saves (gram - instantiate) FLOPs per example for kept_bytes of memory.
    by_value = sorted(
        layers,
        key=lambda x: (x.gram_flops(T) - x.instantiate_flops()) / x.kept_bytes(V),
        reverse=True,
    )
    best = None
    for M in sorted(set(candidates), reverse=True):
        room = budget * nonprivate_peak - state - M * act_dp - gram_scratch
        chosen, kept = set(), 0.0
        for layer in by_value:
            saves = layer.gram_flops(T) > layer.instantiate_flops()
            cost = M * layer.kept_bytes(V)
            if (saves or not allow_gram) and kept + cost <= room:
                chosen.add(layer.name)
                kept += cost
        if not allow_gram and len(chosen) < len(layers):
            continue  # every layer must be instantiated: a smaller M
        if room < 0:
            continue
        extra = batch_size * sum(
            x.instantiate_flops() if x.name in chosen else x.gram_flops(T) for x in layers
        )
        peak = state + M * act_dp + kept + gram_scratch
        candidate = ClippingPlan(
            microbatch_size=M,
            strategies=tuple(
                (x.name, "instantiate" if x.name in chosen else "ghost") for x in layers
            ),
            extra_flops=extra,
            flops_ratio=base_flops / (base_flops + extra),
            memory_ratio=peak / nonprivate_peak,
        )
        # Fewest FLOPs; among plans within 0.1% of them, the largest microbatch.
        if best is None or extra < best.extra_flops * 0.999:
            best = candidate
    if best is None:
        raise ValueError(
            f"No clipping plan fits {budget}x the non-private step's memory at batch "
            f"{batch_size}, sequence {seq_len} (microbatches {sorted(set(candidates))}"
            + ("" if allow_gram else ", every layer instantiated, as bfloat16 needs")
            + "): raise the budget or lower the batch."
        )
    return best
