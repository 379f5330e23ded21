"""Key streams: one per purpose, never overlapping; secrets from the OS, never shown."""

import jax
import numpy as np
import pytest

from jaxdp import noise, randomness, sampling
from jaxdp.randomness import Secrets, Stream

STEPS, INDICES = 24, 24


def _data(key) -> tuple[int, ...]:
    return tuple(int(x) for x in np.asarray(jax.random.key_data(key)).ravel())


def _keys_by_purpose(seed: int) -> dict[str, set[tuple[int, ...]]]:
    """Every key each purpose uses for steps/indices below 24, as the code derives them."""
    secrets = Secrets.from_seed(seed)  # the worst case: one seed for everything
    out: dict[str, set] = {}
    # The noise's keys one by one (each chunk and count draw uses all K of a wide key).
    single = lambda keys: [_data(k) for k in keys.reshape(-1)]
    K = randomness.NOISE_KEY_STREAMS
    chunks = {
        k for t in range(STEPS) for k in single(noise.noise_keys(secrets.noise_key(), t, INDICES))
    }
    counts = {
        k for t in range(STEPS) for k in single(noise.count_noise_key(secrets.noise_key(), t))
    }
    # Every gradient-noise chunk and every count-noise draw has keys of its own.
    assert len(chunks) == STEPS * INDICES * K and len(counts) == STEPS * K
    assert not chunks & counts
    out["noise"] = chunks | counts
    dropout = set()
    for t in range(STEPS):
        step_key = randomness.dropout_step_key(secrets.dropout_key(), t)
        dropout.add(_data(step_key))
        for j in range(3):  # physical batches of the step, then one key per example
            batch_key = jax.random.fold_in(step_key, j)
            dropout.add(_data(batch_key))
            dropout |= {_data(k) for k in jax.random.split(batch_key, INDICES)}
    out["dropout"] = dropout
    out["generation"] = {
        _data(jax.random.fold_in(randomness.generation_key(seed, i), p))
        for i in range(STEPS)
        for p in range(INDICES)
    }
    for name, stream in (("init", Stream.INIT), ("lora_init", Stream.LORA_INIT)):
        root = randomness.stream_key(seed, stream)
        out[name] = {_data(jax.random.fold_in(root, c)) for c in range(STEPS * INDICES)}
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_no_two_purposes_share_a_key(seed):
    keys = _keys_by_purpose(seed)
    names = sorted(keys)
    for i, a in enumerate(names):
        assert len(keys[a]) > STEPS  # the enumeration is not vacuous
        for b in names[i + 1 :]:
            shared = keys[a] & keys[b]
            assert not shared, f"{a} and {b} share {len(shared)} keys"


def test_sampling_stream_is_separate_from_the_key_streams():
    # NumPy's generator for step t is seeded by (seed, SAMPLING tag, t): another tag, another
    # stream, even for the same seed and step.
    a = np.random.default_rng(randomness.seed_sequence(5, Stream.SAMPLING, 3)).random(8)
    b = np.random.default_rng(randomness.seed_sequence(5, Stream.NOISE, 3)).random(8)
    assert not np.allclose(a, b)
    drawn = sampling.PoissonSampler(1000, 0.5, 5).sample(3)
    np.testing.assert_array_equal(
        drawn,
        np.flatnonzero(
            np.random.default_rng(randomness.seed_sequence(5, Stream.SAMPLING, 3)).random(1000)
            < 0.5
        ),
    )


def test_secrets_come_from_os_entropy_and_are_not_shown():
    a, b = Secrets.generate(), Secrets.generate()
    assert not a.fixed_by_user
    values = [a.noise, a.sampling, a.dropout, b.noise, b.sampling, b.dropout]
    assert len(set(values)) == 6  # independent draws
    assert all(v.bit_length() > 100 for v in values)  # 128-bit draws, not 32-bit seeds
    for v in values[:3]:
        assert str(v) not in repr(a) and str(v) not in str(a)
    assert Secrets.from_json(a.to_json()).to_json() == a.to_json()
    # Large secrets are used whole: two 128-bit seeds equal in their low 64 bits differ.
    low = 12345
    k1 = randomness.stream_key(low, Stream.NOISE)
    k2 = randomness.stream_key(low + 2**100, Stream.NOISE)
    assert _data(k1) != _data(k2)


def test_fixed_seed_is_labelled():
    s = Secrets.from_seed(3)
    assert s.fixed_by_user and s.label == randomness.FIXED_SEED_LABEL
    assert "not private" in s.label
    assert Secrets.generate().label != randomness.FIXED_SEED_LABEL
    with pytest.raises(ValueError, match="non-negative"):
        Secrets.from_seed(-1)


def test_every_noise_value_rests_on_128_secret_bits():
    """The noise key is two independent threefry2x32 keys (2 x 64 bits) hashed from a 128-bit
    secret; every noise value's 32 random bits are the XOR of one word of each key's stream,
    made normal as jax.random.normal makes its bits normal (a brute-force reference, with
    jax.random directly). Knowing one key tells nothing: the adversary's test of a guessed key
    (the residual of the release after removing what that key alone predicts) scores the right
    key no better than a wrong one."""
    import jax.numpy as jnp

    key = Secrets.generate().noise_key()
    words = np.asarray(jax.random.key_data(key))
    assert words.dtype == np.uint32 and words.size * 32 >= 128
    assert key.shape == (randomness.NOISE_KEY_STREAMS,) and not np.array_equal(words[0], words[1])
    d = 200_000
    got = np.asarray(noise.tree_noise(key, 3, [(d,)])[0], np.float64)
    chunk = lambda k, c: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, 3), 0), c)
    size = min(noise.NOISE_CHUNK, d)
    xor = np.concatenate(
        [
            np.asarray(jax.random.bits(chunk(key[0], c), (1, size), jnp.uint32))
            ^ np.asarray(jax.random.bits(chunk(key[1], c), (1, size), jnp.uint32))
            for c in range(-(-d // size))
        ],
        axis=1,
    )  # the stream's bits, XOR-ed word by word
    # _normal_from_bits is jax.random.normal's map from a key's bits to normals:
    one = jax.random.key(9)
    np.testing.assert_array_equal(
        noise._normal_from_bits(jax.random.bits(one, (1, 64), jnp.uint32)),
        jax.random.normal(one, (1, 64), jnp.float32),
    )
    expected = np.asarray(noise._normal_from_bits(jnp.asarray(xor[:, :d]))[0], np.float64)
    np.testing.assert_array_equal(got, expected)
    alone = lambda k: np.asarray(
        jax.random.normal(chunk(k, 0), (1, size), jnp.float32)[0, :d], np.float64
    )
    # Each key changes every value; and the guessed key's own normals do not explain the noise.
    right = [np.var(got[:size] - alone(key[i]) / np.sqrt(2)) for i in range(2)]
    wrong = [np.var(got[:size] - alone(jax.random.key(s)) / np.sqrt(2)) for s in (5, 6)]
    assert all(abs(r - w) < 0.02 for r in right for w in wrong), (right, wrong)
    assert abs(abs(np.corrcoef(got[:size], alone(key[0]))[0, 1])) < 0.01
    # Still N(0, 1): mean and variance (6 standard errors).
    assert abs(got.mean()) < 6 / np.sqrt(d)
    assert abs(got.var() - 1) < 6 * np.sqrt(2 / d)
