"""Adaptive clipping (flat and per layer) and the gradient diagnostics."""

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import jaxdp
from jaxdp import adaptive, clipping, fused, noise, steps
from jaxdp.adaptive import AdaptiveClipping
from jaxdp.config import to_settings
from jaxdp.plan import PrivacyPlan
from jaxdp.randomness import Secrets


def _linear_data(norms, dim, seed=0):
    """Per-example gradients v_i of the linear loss <w, v_i>: random directions, given norms."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(len(norms), dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return {"v": (dirs * np.asarray(norms)[:, None]).astype(np.float32)}


def _linear_loss(params, example, key):
    return jnp.dot(params["w"], example["v"])


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_clip_norm_converges_to_the_target_quantile(quantile):
    """C_t follows the gamma-quantile of a synthetic (log-normal) norm distribution, starting
    far below it, through the real engine (counts), noise transform (noisy counts) and update."""
    N = 2000
    norms = np.exp(np.random.default_rng(1).normal(0.0, 1.0, N))
    data = _linear_data(norms, 4)
    private = jaxdp.make_private(
        _linear_loss,
        {"w": jnp.zeros(4)},
        optax.sgd(0.0),
        num_examples=N,
        expected_batch_size=200,
        steps=300,
        noise_multiplier=1.0,
        l2_clip_norm=0.05,
        adaptive=AdaptiveClipping(quantile, learning_rate=0.2, count_noise_multiplier=5.0),
        secrets=Secrets.from_seed(7),  # reproducible draws and noise (a test, not a release)
    )
    state = private.initial_state
    for t in range(300):
        state, metrics = private.step(state, t, data)
    C = float(steps.clip_thresholds(state)[0])
    assert abs(np.mean(norms <= C) - quantile) < 0.03, (C, np.quantile(norms, quantile))
    assert 0.0 < float(metrics["public"]["fraction_below"]) < 1.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_the_pair_costs_one_gaussian_of_multiplier_sigma(accountant):
    """Gradient (noise sigma_D, sensitivity 1) and count (noise sigma_b, sensitivity 1/2, i.e.
    a Gaussian of multiplier 2 sigma_b) composed by dp-accounting = one Gaussian of sigma."""
    sigma, sigma_b = 1.1, 4.0
    sigma_d = adaptive.gradient_noise_multiplier(sigma, sigma_b)
    assert sigma_d > sigma
    assert sigma_d**-2 + (2 * sigma_b) ** -2 == pytest.approx(sigma**-2)

    def eps(event):
        if accountant == "rdp":
            acc = dp_accounting.rdp.RdpAccountant()
        else:
            acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        return acc.compose(event).get_epsilon(1e-6)

    pair = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(sigma_d), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    )
    one = dp_accounting.GaussianDpEvent(sigma)
    assert eps(pair) == pytest.approx(eps(one), rel=1e-3 if accountant == "pld" else 1e-9)


def test_the_plan_accounts_sigma_and_noises_the_gradient_with_sigma_d():
    a = AdaptiveClipping(count_noise_multiplier=3.0)
    kwargs = dict(num_examples=1000, expected_batch_size=50, steps=40, noise_multiplier=0.9)
    plan, fixed = PrivacyPlan.create(adaptive=a, **kwargs), PrivacyPlan.create(**kwargs)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(0.9)), 40
    )
    direct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    assert plan.epsilon() == fixed.epsilon()
    assert plan.epsilon() == pytest.approx(
        direct.compose(event).get_epsilon(plan.target_delta), rel=1e-3
    )
    assert plan.gradient_noise_multiplier == pytest.approx(
        adaptive.gradient_noise_multiplier(0.9, 3.0)
    )
    assert plan.record()["adaptive_clipping"]["gradient_noise_multiplier"] > 0.9


def test_sigma_at_least_twice_sigma_b_is_refused():
    with pytest.raises(ValueError, match="count_noise_multiplier above 1"):
        PrivacyPlan.create(
            num_examples=1000,
            expected_batch_size=50,
            steps=10,
            noise_multiplier=2.0,
            adaptive=AdaptiveClipping(count_noise_multiplier=1.0),
        )


@pytest.mark.parametrize("clipping_mode", ["flat", "per_layer"])
def test_noise_scales_of_gradient_and_count(clipping_mode):
    """The transform's gradient noise has std sigma_D C_t (C for per-layer) and the count's
    std sigma_b sqrt(K): chi-square tests on many draws, with zero inputs."""
    sigma_d, sigma_b, C, B, K = 1.3, 2.5, 0.7, 40.0, 3
    a = AdaptiveClipping(learning_rate=1e-12, count_noise_multiplier=sigma_b)  # C stays put
    names = (lambda p: ["x", "y", "z"]) if clipping_mode == "per_layer" else None
    tx = noise.add_gaussian_noise(
        C, sigma_d, B, jax.random.key(3), adaptive=a, clipping=clipping_mode, group_names=names
    )
    params = {"x": jnp.zeros(50), "y": jnp.zeros(30), "z": jnp.zeros(20)}
    state = tx.init(params)
    k = 1 if clipping_mode == "flat" else K
    below = jnp.zeros((k,))
    update = jax.jit(lambda s: tx.update(params, s, params, below=below, thresholds=s.clip_norms))
    grads, counts = [], []
    for _ in range(200):
        out, state = update(state)
        grads.append(np.concatenate([np.asarray(v) for v in jax.tree.leaves(out)]) * B)
        counts.append((np.asarray(state.noisy_fraction) - 0.5) * B)
    grads, counts = np.concatenate(grads), np.concatenate(counts)
    for x, std in ((grads, sigma_d * C), (counts, sigma_b * math.sqrt(k))):
        n = len(x)
        p = stats.chi2.sf(np.sum(x**2) / std**2, n)
        assert 1e-3 < p < 1 - 1e-3, (std, np.std(x))


def test_per_layer_thresholds_keep_the_sensitivity_and_move_apart():
    names = ["a", "b", "c", fused.WTE_IN, fused.WTE_OUT]
    C = 2.0
    th = adaptive.initial_thresholds(C, "per_layer", names)
    a = AdaptiveClipping(learning_rate=0.5)
    fraction = jnp.asarray([1.0, 0.0, 0.5, 0.2, 0.9])  # a: all below (shrink); b: all above
    new = adaptive.update_thresholds(th, fraction, a, "per_layer", C, names)
    assert C * (1 - 2e-6) <= float(fused.sensitivity(new, names)) <= C
    assert float(new[0] / th[0]) < float(new[2] / th[2]) < float(new[1] / th[1])


def test_per_layer_thresholds_bound_every_contribution():
    """vmap per-layer clipping with unequal thresholds (sum of squares C^2) and huge
    gradients: every example's clipped contribution has norm <= C."""
    rng = np.random.default_rng(0)
    grads = {
        "a": jnp.asarray(rng.normal(size=(8, 5)) * 1e4),
        "b": jnp.asarray(rng.normal(size=(8, 3, 2)) * 1e3),
    }
    C = 1.5
    th = jnp.asarray([0.3, 1.0])
    th = th * C / jnp.sqrt(jnp.sum(th**2))
    for i in range(8):
        pad = jnp.arange(8) != i
        summed, _ = clipping.clip_and_sum(grads, C, pad, clipping="per_layer", thresholds=th)
        norm = math.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(summed)))
        assert C * 0.99 < norm <= C * (1 + 1e-6)


def _coherence(data, microbatch, physical):
    n = len(data["v"])
    private = jaxdp.make_private(
        _linear_loss,
        {"w": jnp.zeros(data["v"].shape[1])},
        optax.sgd(0.0),
        num_examples=n,
        expected_batch_size=n - 1e-9,  # q ~ 1: (nearly) everyone is drawn
        steps=1,
        noise_multiplier=1.0,
        microbatch_size=microbatch,
        physical_batch_size=physical,
        diagnostics=True,
        secrets=Secrets.from_seed(8),
    )
    state, metrics = private.step(private.initial_state, 0, data)
    return float(metrics["m_coherence"]), float(metrics["batch_size"])


def test_m_coherence_is_m_for_identical_and_1_for_orthogonal_gradients():
    m = 12
    identical = {"v": np.tile(np.asarray([[0.3, -1.0, 2.0]], np.float32), (m, 1))}
    orthogonal = {"v": (np.eye(m, dtype=np.float32) * np.arange(1, m + 1)[:, None])}
    for microbatch, physical in ((None, None), (2, 4)):  # also across microbatches and batches
        value, drawn = _coherence(identical, microbatch, physical)
        assert value == pytest.approx(drawn, rel=1e-5) and drawn > m / 2
        value, _ = _coherence(orthogonal, microbatch, physical)
        assert value == pytest.approx(1.0, rel=1e-5)


def test_norm_quantiles_from_the_histogram():
    norms = np.exp(np.random.default_rng(2).normal(0, 2, 3000))
    hist = np.zeros(len(clipping.NORM_BINS) + 1, np.float32)
    np.add.at(hist, np.searchsorted(clipping.NORM_BINS, norms, side="right"), 1)
    for q in (0.5, 0.9, 0.99):
        got = float(steps._hist_quantile(jnp.asarray(hist), q))
        assert abs(math.log(got / np.quantile(norms, q))) <= math.log(1.13)


def test_the_count_moves_by_at_most_half_per_unit_in_every_engine(tiny_config):
    """Removing one unit (making it padding) changes every entry of ClipStats.below by exactly
    1/2; a unit with a non-finite gradient counts as above (-1/2): vmap (with and without units
    of several rows), ghost and fused (one row per unit)."""
    import dataclasses

    from jaxdp import fused as fused_lib
    from jaxdp import ghost
    from jaxdp.gpt2 import init_model
    from jaxdp.loss import model_example_loss

    config = dataclasses.replace(tiny_config, vocab_size=61)
    graphdef, state = steps.init_state(init_model(config, seed=0), optax.sgd(0.1))
    params, frozen = state.params, state.frozen
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (6, 7)), jnp.int32)
    loss = model_example_loss(graphdef, frozen)
    C = 0.3
    engines = {
        "vmap": jax.jit(clipping.clipped_grad(loss, C, clipping="per_layer")),
        "ghost": jax.jit(
            ghost.ghost_clipped_grad(graphdef, C, frozen=frozen, clipping="per_layer")
        ),
        "fused": jax.jit(fused_lib.fused_clipped_grad(graphdef, C, frozen=frozen)),
    }
    segments = jnp.asarray([0, 0, 2, 3, 3, 5], jnp.int32)  # units {0,1}, {2}, {3,4}, {5}
    for name, fn in engines.items():
        for seg in (None, segments) if name == "vmap" else (None,):

            def below(pad, fn=fn, seg=seg):
                return np.asarray(fn(params, {"tokens": tokens}, pad, None, seg)[1].below)

            everyone = below(jnp.zeros(6, bool))
            units = [0, 2, 3, 5] if seg is not None else range(6)
            for u in units:
                rows = np.asarray(seg == u) if seg is not None else np.arange(6) == u
                diff = everyone - below(jnp.asarray(rows))
                np.testing.assert_allclose(np.abs(diff), 0.5, err_msg=f"{name} unit {u}")
    bad = {"tokens": tokens}
    nan_params = jax.tree.map(lambda x: x, params)
    nan_params["ln_f"]["scale"] = nan_params["ln_f"]["scale"].replace(
        jnp.full_like(nan_params["ln_f"]["scale"].get_value(), jnp.nan)
    )
    _, stats = engines["vmap"](nan_params, bad, jnp.arange(6) != 0)  # one NaN example
    assert float(stats.num_nonfinite) == 1
    np.testing.assert_allclose(np.asarray(stats.below), -0.5)


def test_fused_engine_with_zero_thresholds_gives_a_zero_sum(tiny_config):
    """Every trainable parameter's gradient passes through a clipped path (none escapes)."""
    from jaxdp import fused as fused_lib
    from jaxdp.gpt2 import init_model

    graphdef, state = steps.init_state(init_model(tiny_config, seed=1), optax.sgd(0.1))
    names = fused_lib.groups(state.params)
    fn = fused_lib.fused_clipped_grad(graphdef, 1.0, frozen=state.frozen)
    tokens = jnp.ones((4, 6), jnp.int32)
    summed, _ = fn(state.params, {"tokens": tokens}, jnp.zeros(4, bool), None, None,
                   jnp.zeros(len(names)))  # fmt: skip
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(summed))


def test_count_noise_comes_from_its_own_key():
    """The count's noise is N(0, (sigma_b)^2) drawn from fold_in(fold_in(key, count), 1):
    reproduced exactly, and independent of the gradient noise's keys."""
    sigma_b, B = 2.0, 10.0
    key = jax.random.key(11)
    a = AdaptiveClipping(count_noise_multiplier=sigma_b)
    tx = noise.add_gaussian_noise(1.0, 1.5, B, key, adaptive=a)
    params = {"x": jnp.zeros(3), "y": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update(params, state, params, below=jnp.zeros(1), thresholds=jnp.ones(1))
    expected = sigma_b * jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, 0), 1), (1,), jnp.float32
    )
    np.testing.assert_allclose((np.asarray(state.noisy_fraction) - 0.5) * B, expected, rtol=1e-5)
    chunk_draws = [jax.random.normal(k, (1,)) for k in noise.noise_keys(key, 0, 5)]
    assert all(float(d[0]) != float(expected[0] / sigma_b) for d in chunk_draws)


def test_noise_follows_the_thresholds_the_sum_was_clipped_with():
    """If the caller clipped with a larger norm than the state's, the noise grows with it."""
    a = AdaptiveClipping(learning_rate=1e-12)
    tx = noise.add_gaussian_noise(0.5, 1.0, 1.0, jax.random.key(0), adaptive=a)
    params = {"x": jnp.zeros(20000)}
    state = tx.init(params)
    out, _ = tx.update(params, state, params, below=jnp.zeros(1), thresholds=jnp.full(1, 4.0))
    assert float(jnp.std(out["x"])) == pytest.approx(4.0, rel=0.03)


@pytest.mark.slow
def test_run_with_adaptive_clipping_publishes_only_dp_releases_and_resumes_exactly(
    tmp_path, monkeypatch
):
    from conftest import kill_at_step, load_config, same_secrets, small

    from jaxdp import checkpoint
    from jaxdp import run as run_lib
    from jaxdp.tracking import read_metrics

    cfg = small(load_config("tiny_offline"), num_steps=3, checkpoint_every=2, eval_every=3)
    cfg.dp.adaptive.enabled = True
    cfg.dp.adaptive.count_noise_multiplier = 2.0
    cfg.dp.diagnostics = True
    undo = kill_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(to_settings(cfg), tmp_path / "resumed")
    undo()
    assert checkpoint.manager(tmp_path / "resumed").latest_step() == 2
    resumed = run_lib.run(to_settings(cfg), tmp_path / "resumed")
    same_secrets(tmp_path / "resumed", tmp_path / "full")
    assert run_lib.run(to_settings(cfg), tmp_path / "full") == resumed
    public = read_metrics(tmp_path / "full" / "metrics.jsonl")
    private = read_metrics(tmp_path / "full" / "private" / "metrics.jsonl")
    assert public == read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in public] == [1, 2, 3]
    for r in public:
        assert {"public/clip_norm", "public/fraction_below", "public/snr_estimate"} <= set(r)
        assert not any(k.split("/")[-1].startswith(("m_coherence", "norm_p", "snr")) and
                       k != "public/snr_estimate" for k in r)  # fmt: skip
    assert public[0]["public/clip_norm"] == cfg.dp.l2_clip_norm  # the first step's C_0
    assert public[1]["public/clip_norm"] != cfg.dp.l2_clip_norm  # then it moves
    for r in private:
        assert {"private/m_coherence", "private/norm_p50", "private/snr"} <= set(r)
    privacy = json.loads((tmp_path / "full" / "privacy.json").read_text())
    assert privacy["adaptive_clipping"]["count_noise_multiplier"] == 2.0
