"""jaxdp.perturb: the metric-DP word mechanism against its definition (noise law, the privacy
inequality between two words), text handling, and the embeddings' file format."""

import numpy as np
import pytest
from scipy import stats

from jaxdp import perturb


def test_noise_has_density_proportional_to_exp_minus_epsilon_norm():
    # Density exp(-eps ||z||) in R^n: ||z|| ~ Gamma(n, 1/eps), direction uniform on the sphere,
    # so a coordinate of the direction, (u_1 + 1) / 2, is Beta((n-1)/2, (n-1)/2).
    n, eps = 5, 3.0
    z = perturb.noise(n, eps, np.random.default_rng(0), size=20_000)
    norms = np.linalg.norm(z, axis=1)
    assert stats.kstest(norms, stats.gamma(a=n, scale=1 / eps).cdf).pvalue > 1e-3
    # The test can fail: the wrong scale is rejected.
    assert stats.kstest(norms, stats.gamma(a=n, scale=1.1 / eps).cdf).pvalue < 1e-6
    u = z / norms[:, None]
    for axis in range(n):
        beta = stats.beta((n - 1) / 2, (n - 1) / 2).cdf
        assert stats.kstest((u[:, axis] + 1) / 2, beta).pvalue > 1e-3
    with pytest.raises(ValueError, match="positive"):
        perturb.noise(n, 0.0, np.random.default_rng(0))


def test_output_probabilities_obey_the_metric_dp_inequality():
    # P[out | w] <= exp(eps d(w, w')) P[out | w'] for every output, estimated by sampling.
    vectors = np.array([[0, 0], [1, 0], [0, 1.5], [2, 2], [-1, 0.5]], np.float32)
    emb = perturb.Embeddings(tuple("abcde"), vectors)
    eps, draws = 1.5, 200_000
    rng = np.random.default_rng(1)

    def frequencies(word):
        out = perturb.perturb_words([word] * draws, eps, emb, rng)
        return np.array([out.count(w) for w in emb.words]) / draws

    freq = {w: frequencies(w) for w in emb.words}
    for i, w in enumerate(emb.words):
        for j, w2 in enumerate(emb.words):
            bound = np.exp(eps * np.linalg.norm(vectors[i] - vectors[j]))
            # Five standard errors of the estimated probabilities, in the direction of the test.
            se = 5 * np.sqrt(freq[w] / draws + bound**2 * freq[w2] / draws)
            assert np.all(freq[w] <= bound * freq[w2] + se), (w, w2)
    # Each word is its own likeliest output, and every word is reachable from every word.
    assert all(freq[w].argmax() == i for i, w in enumerate(emb.words))
    assert all(np.all(freq[w] > 0) for w in emb.words)


MULTILINGUAL = (
    "Иван Петров: ВИЧ-положительный",
    "患者 王伟 有 癌症",
    "Γιώργος Παπαδόπουλος, 1980.",
    "José Müller — café ☕ 🏳️‍🌈 naïve",
    "refund my account, please",
)


def perturb_text(text, epsilon, embeddings, rng=None):
    """What the page does to a record (static/app.js): every `perturb.WORD` match replaced by a
    perturbed word, the characters between them kept; (text, number of words)."""
    spans = [m.span() for m in perturb.WORD.finditer(text)]
    words = [text[a:b].lower() for a, b in spans]
    replaced = perturb.perturb_words(words, epsilon, embeddings, rng)
    out, last = [], 0
    for (a, b), word in zip(spans, replaced, strict=True):
        out += [text[last:a], word]
        last = b
    out.append(text[last:])
    return "".join(out), len(words)


def test_every_word_of_every_script_is_perturbed():
    """Nothing of the original but ASCII punctuation and spacing leaves: names in Cyrillic,
    Greek, CJK, accented letters, symbols and emoji are words, unknown ones perturbed from the
    centroid into vocabulary words."""
    words = ("the", "order", "refund", "my", "account", "please")
    emb = perturb.Embeddings(words, np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32))
    for text in MULTILINGUAL:
        out, count = perturb_text(text, 0.1, emb)
        found = perturb.WORD.findall(out)
        assert count == len(perturb.WORD.findall(text)) == len(found)
        assert set(found) <= set(words)
        assert out.isascii()  # every non-ASCII character was inside a word, and went
        layout = lambda t: perturb.WORD.sub("W", t)
        assert layout(out) == layout(text)  # only the layout is kept (and named as not covered)
    assert perturb.WORD.findall("ВИЧ-положительный") == ["ВИЧ", "положительный"]
    for c in map(chr, range(128)):  # LAYOUT is exactly what WORD leaves out
        assert (perturb.WORD.fullmatch(c) is None) == (c in perturb.LAYOUT), repr(c)
    assert "Not covered: the number of records, their order" in perturb.guarantee(1.0, 3)
    assert perturb.changed_fraction(["a b c"], ["a x c"]) == pytest.approx(1 / 3)


def test_perturb_text_keeps_punctuation_and_counts_words():
    words = ("hello", "world", "it's", "42")
    emb = perturb.Embeddings(words, np.eye(4, dtype=np.float32) * 100)
    # At a large epsilon the noise is far smaller than the distances: words map to themselves.
    text, count = perturb_text("Hello,  world! It's 42.", 50.0, emb)
    assert (text, count) == ("hello,  world! it's 42.", 4)
    assert perturb_text("...", 1.0, emb) == ("...", 0)
    # Unknown words start from the centroid: all equidistant here, so any word may come out.
    out, count = perturb_text("Zebra", 50.0, emb)
    assert count == 1 and out in words


def test_default_randomness_is_fresh_each_call():
    emb = perturb.Embeddings(tuple("abcdefgh"), np.random.default_rng(0).normal(size=(8, 3)))
    first = perturb.perturb_words(["a"] * 50, 0.5, emb)
    second = perturb.perturb_words(["a"] * 50, 0.5, emb)
    assert first != second  # the operating system's randomness, not a fixed seed


def test_embeddings_round_trip_as_float16(tmp_path):
    vectors = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    emb = perturb.Embeddings(tuple(f"w{i}" for i in range(7)), vectors)
    emb.save(tmp_path, corpus=["public.txt"])
    back = perturb.Embeddings.load(tmp_path)
    assert back.words == emb.words and back.dim == 3
    np.testing.assert_array_equal(back.vectors, vectors.astype(np.float16).astype(np.float32))
    assert (tmp_path / "vectors.f16").stat().st_size == 7 * 3 * 2
    with pytest.raises(ValueError, match="one vector per word"):
        perturb.Embeddings(("a", "b"), vectors)
