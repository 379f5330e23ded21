"""The DP reward model (Bradley-Terry on frozen GPT-2 features) and best-of-N / Gibbs policies."""

import json
import math
import time

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SAFE

import jaxdp
from jaxdp import accounting, data, hf, policy, reward, reward_run
from jaxdp.gpt2 import GPT2Config, init_model
from jaxdp.loss import example_loss
from jaxdp.params import split
from jaxdp.randomness import Secrets


def test_hh_rlhf_rows_split_at_the_last_assistant_turn(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant: Sure."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant: No."
    p = reward.from_hh(chosen, rejected)
    assert (
        p.prompt.endswith("Help?\n\nAssistant:") and p.chosen == " Sure." and p.rejected == " No."
    )
    path = tmp_path / "prefs.jsonl"
    rows = [
        {"chosen": chosen, "rejected": rejected},
        {"prompt": "Q:", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = reward.load_preferences(str(path))
    assert loaded == [p, reward.Preference("Q:", "a", "b")]
    with pytest.raises(ValueError, match="Assistant"):
        reward.from_hh("no turns", "here")
    path.write_text('{"chosen": "x"}\n')
    with pytest.raises(ValueError, match="'chosen' and 'rejected'"):
        reward.load_preferences(str(path))


def test_per_example_gradients_are_bounded_by_2_and_clipped_to_C():
    """Brute force: each tuple's gradient (a loop over tuples) has norm <= 2 for any w, so at
    C = 2 the clipped sum is the plain sum; at C = 0.3 each contribution is <= C."""
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(2, 40, 16))
    phi /= np.linalg.norm(phi, axis=-1, keepdims=True)
    phi_w, phi_l = phi.astype(np.float32)
    phi_l[0] = -phi_w[0]  # antipodal features: ||phi_w - phi_l|| = 2, the worst case
    w = jnp.asarray(rng.normal(size=16) * 50.0, jnp.float32)  # large: sigmoid saturates
    w = w.at[:].set(-w * jnp.sign(jnp.dot(phi_w[0] - phi_l[0], w)))  # tuple 0 is misranked
    grads = [
        jax.grad(reward.bt_loss)(w, jnp.asarray(a), jnp.asarray(b))
        for a, b in zip(phi_w, phi_l, strict=True)
    ]
    norms = np.asarray([float(jnp.linalg.norm(g)) for g in grads])
    assert norms.max() <= 2.0 + 1e-5 and norms[0] > 1.99
    example = {"phi_w": jnp.asarray(phi_w), "phi_l": jnp.asarray(phi_l)}
    pad = jnp.zeros(40, bool)
    for C in (2.0, 0.3):
        fn = jaxdp.clipping.clipped_grad(reward.linear_example_loss, C)
        summed, _ = fn({"w": w}, example, pad)
        expected = sum(
            g * min(1.0, C * SAFE / max(n, 1e-30)) for g, n in zip(grads, norms, strict=True)
        )
        np.testing.assert_allclose(summed["w"], expected, rtol=1e-5, atol=1e-6)


def test_gibbs_policy_and_sequence_logprob_against_brute_force(tiny_config):
    logp0, r, eta = [-1.0, -2.5, -0.3], [0.2, 1.5, -0.4], 2.0
    unnorm = [math.exp(a) * math.exp(eta * b) for a, b in zip(logp0, r, strict=True)]
    np.testing.assert_allclose(reward.gibbs_policy(logp0, r, eta), np.asarray(unnorm) / sum(unnorm))
    model = init_model(tiny_config, seed=0)
    prompt, response = np.asarray([5, 9, 2]), np.asarray([7, 7, 1])
    ids = np.concatenate([prompt, response])
    logits = model(jnp.asarray(ids[None]))[0]
    expected = sum(
        float(jax.nn.log_softmax(logits[t - 1])[ids[t]]) for t in range(len(prompt), len(ids))
    )
    assert reward.sequence_logprob(model, prompt, response) == pytest.approx(expected, rel=1e-5)


def _train_reference_lm(tmp_path, tokenizer_dir) -> str:
    """A tiny GPT-2 taught the synthetic task's (public) text, non-privately: a reference model
    whose samples are lexicon words, so that rewards differ between them."""
    tok = data.load_tokenizer(tokenizer_dir)
    rng = np.random.default_rng(5)  # public text in the synthetic task's style
    texts = [
        "Human: How was "
        + str(rng.choice(reward.TOPICS))
        + "?"
        + reward.ASSISTANT
        + reward.synthetic_response(rng)
        for _ in range(512)
    ]
    T = 24
    rows = np.zeros((len(texts), T), np.int32)
    for i, t in enumerate(texts):
        ids = data.tokenize(tok, t)[:T]
        rows[i, : len(ids)] = ids
    config = GPT2Config.preset("tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    graphdef, params, rest = split(init_model(config, seed=0), ())
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        def loss(p):
            logits = jaxdp.params.merge(graphdef, p, rest)(batch)
            return jnp.mean(example_loss(logits, batch, None))

        value, g = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, value

    rng = np.random.default_rng(0)
    for _ in range(60):
        params, opt, value = step(params, opt, rows[rng.choice(len(rows), 16)])
    assert float(value) < 2.0  # it has learned the text's format and lexicon (from 10.8)
    out = tmp_path / "reference"
    hf.save_pretrained(jaxdp.params.merge(graphdef, params, rest), out, tokenizer=tok)
    return str(out)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tokenizer_dir, worker_id):
    """The reference LM and the DP reward model, built once per test session: under xdist the
    workers share one directory of this session (the first builds it, under a file lock)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    tmp = (base if worker_id == "master" else base.parent) / "reward_fixture"
    with FileLock(f"{tmp}.lock"):
        if not (tmp / "report.json").is_file():
            tmp.mkdir(exist_ok=True)
            _build(tmp, tokenizer_dir)
    report = json.loads((tmp / "report.json").read_text())
    return tmp / "run", report, str(tmp / "reference")


def _build(tmp, tokenizer_dir) -> None:
    _train_reference_lm(tmp, tokenizer_dir)
    cfg = reward_run.default_config()
    # The reward's features: a tiny RANDOM GPT-2 (its last-token features separate the
    # synthetic rewards better than the reference LM's, which are specialised to predicting
    # the next word); the policy samples from the trained reference LM.
    cfg.model.name_or_path, cfg.model.init = "tiny", "random"
    cfg.data.source, cfg.data.num_synthetic = "synthetic", 4000
    cfg.data.tokenizer, cfg.data.max_length = str(tokenizer_dir), 24
    cfg.dp.target_epsilon, cfg.dp.expected_batch_size = 8.0, 400.0
    cfg.dp.noise_seed = 0  # a fixed-seed test, labelled as such in privacy.json
    cfg.train.num_steps, cfg.train.eval_every, cfg.train.progress = 100, 50, False
    report = reward_run.run(cfg, tmp / "run")
    (tmp / "report.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_dp_reward_model_beats_chance_on_held_out_pairs(trained):
    workdir, report, _ = trained
    assert report["num_heldout"] == 1000
    # chance is 0.5 (its standard error on 1000 pairs is 0.016)
    assert report["heldout_accuracy"] >= 0.65, report
    privacy = json.loads((workdir / "privacy.json").read_text())
    assert privacy["epsilon"] <= 8.0 and privacy["epsilon_per"] == "preference tuple"
    assert "fixed" in privacy["randomness"]
    assert (workdir / "reward_model" / "model.safetensors").is_file()
    assert (workdir / "report.png").stat().st_size > 0


@pytest.mark.slow  # (the trained reward model: minutes, shared with the slow tests)
def test_the_accountant_epsilon_equals_the_trainers(trained):
    workdir, report, _ = trained
    privacy = json.loads((workdir / "privacy.json").read_text())
    q, sigma, steps, delta = (
        privacy["sampling_prob"],
        privacy["noise_multiplier"],
        privacy["steps"],
        privacy["delta"],
    )
    assert q == pytest.approx(400.0 / 4000)
    assert report["epsilon"] == pytest.approx(
        accounting.compute_epsilon(sigma, q, steps, delta), rel=1e-9
    )
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    direct = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=accounting.pld_interval(sigma)
    )
    assert report["epsilon"] == pytest.approx(direct.compose(event).get_epsilon(delta), rel=1e-3)


@pytest.mark.slow
def test_best_of_n_beats_a_single_sample_in_true_reward(trained):
    workdir, _, reference = trained
    prompts = [p.prompt for p in reward.synthetic_preferences(16, seed=9)]
    results = policy.best_of_n_responses(
        workdir / "reward_model",
        prompts,
        n=8,
        top_p=1.0,
        max_new_tokens=8,
        seed=0,
        reference=reference,
    )
    first = np.mean([reward.synthetic_reward(r["candidates"][0]) for r in results])
    best = np.mean([reward.synthetic_reward(r["response"]) for r in results])
    assert best > first + 0.1, (first, best)
    assert all(r["reward"] == max(r["rewards"]) for r in results)
    gibbs = policy.best_of_n_responses(
        workdir / "reward_model",
        prompts[:2],
        n=4,
        top_p=1.0,
        max_new_tokens=8,
        gibbs_eta=3.0,
        reference=reference,
    )
    for r in gibbs:
        assert sum(r["gibbs_probs"]) == pytest.approx(1.0) and 0 <= r["chosen"] < 4


@pytest.mark.slow
def test_cli_offline_config_and_best_of_n(tmp_path, tokenizer_dir, capsys):
    from jaxdp.commands import best_of_n, train_reward

    flags = [
        "--config",
        "configs/dp_reward_tiny_offline.py",
        "--workdir",
        str(tmp_path / "rw"),
        f"--config.data.tokenizer={tokenizer_dir}",
        "--config.data.num_synthetic=400",
        "--config.dp.expected_batch_size=64",
        "--config.train.num_steps=5",
        "--config.train.progress=False",
    ]
    assert train_reward.main(flags) == 0
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert train_reward.main(flags) == 2  # the workdir is taken: refused, nothing overwritten
    assert "already holds" in capsys.readouterr().err
    out = tmp_path / "samples.jsonl"
    args = ["--reward", str(tmp_path / "rw" / "reward_model"), "--synthetic", "2", "--n", "2"]
    assert best_of_n.main([*args, "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert "mean true reward" in capsys.readouterr().out


def test_unreachable_epsilon_fails_fast(tmp_path, tokenizer_dir):
    cfg = reward_run.default_config()
    cfg.model.name_or_path, cfg.model.init = "tiny", "random"
    cfg.data.source, cfg.data.num_synthetic = "synthetic", 100
    cfg.data.tokenizer, cfg.data.max_length = str(tokenizer_dir), 16
    cfg.dp.target_epsilon, cfg.dp.target_delta, cfg.dp.expected_batch_size = 1e-3, 1e-10, 50.0
    cfg.train.num_steps = 1000
    started = time.perf_counter()
    with pytest.raises(reward_run.ConfigError, match="not attainable"):
        reward_run.run(cfg, tmp_path / "r")
    assert time.perf_counter() - started < 30


def test_secrets_are_secret_by_default():
    assert not Secrets.generate().fixed_by_user


def test_lora_reward_model_trains_saves_and_scores(tmp_path, tokenizer_dir):
    """The LoRA variant: adapters and head trained together by the vmap engine, saved (trained,
    non-zero B matrices), and loaded back into a RewardModel that scores responses."""
    cfg = reward_run.default_config()
    cfg.model.name_or_path, cfg.model.init, cfg.model.lora_rank = "tiny", "random", 2
    cfg.data.source, cfg.data.num_synthetic = "synthetic", 80
    cfg.data.tokenizer, cfg.data.max_length = str(tokenizer_dir), 16
    cfg.dp.target_epsilon, cfg.dp.expected_batch_size, cfg.dp.l2_clip_norm = 8.0, 16.0, 1.0
    cfg.train.num_steps, cfg.train.eval_every, cfg.train.progress = 3, 3, False
    report = reward_run.run(cfg, tmp_path / "lora")
    assert report["lora_rank"] == 2 and 0.0 <= report["heldout_accuracy"] <= 1.0
    model = reward_run.RewardModel(tmp_path / "lora" / "reward_model")
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "lora" / "reward_model" / "model.safetensors"))
    lora_b = [k for k in saved if k.endswith("lora_b")]
    assert lora_b and any(np.abs(saved[k]).max() > 0 for k in lora_b)  # adapters were trained
    scores = model("Human: Hi?\n\nAssistant:", [" good good", " bad bad"])
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
