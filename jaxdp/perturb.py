"""Word-level metric differential privacy (d_X privacy) for text, before it leaves its owner.

The mechanism of Feyisetan, Balle, Drake & Diethe, "Privacy- and Utility-Preserving Textual
Analysis via Calibrated Multivariate Perturbations" (WSDM 2020): for each word w with embedding
phi(w) in R^n,

    z = l * u,   u uniform on the unit sphere S^{n-1},   l ~ Gamma(shape n, scale 1 / epsilon),

and the output is the vocabulary word nearest (Euclidean) to phi(w) + z. The noise z has density
proportional to exp(-epsilon ||z||), so for any two words w, w' and any output,

    P[output | w] <= exp(epsilon * d(w, w')) P[output | w'],   d = Euclidean distance of embeddings,

and a document of k words is protected at epsilon * sum_i d(w_i, w'_i) against any document of k
words (composition over its words). This LOCAL guarantee is separate from the central (DP-SGD)
epsilon of a model trained on the perturbed text; the two are reported separately, never added.

Words (`WORD`) are maximal runs of characters that are not LAYOUT: ASCII white space (tab,
newline, vertical tab, form feed, carriage return, space) and ASCII punctuation other than the
apostrophe. So every letter of every script, every digit, accented letters, CJK characters,
symbols and emoji are inside some word, and every word goes through the mechanism; only the
layout characters are kept as they are, and the guarantee names them as not covered (how many
words a record has, and the punctuation and spacing between them). Words are lowercased. A word
outside the vocabulary (a name, a number, a word in another script) is perturbed from one
fixed point, the vocabulary's centroid: all unknown words are indistinguishable from each
other, and none is ever copied. The browser implementation (jaxdp/serve/static/perturb.js) is
the same algorithm, with the same WORD, and `crypto.getRandomValues`; the Python one draws from
the operating system's randomness.

Embeddings (`Embeddings`): a vocabulary and float16 vectors, built from a public corpus with
word2vec (`build_embeddings`, needs gensim: the `serve` extra) and served as static files.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import secrets
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# Layout, kept as it is (not covered): ASCII white space and ASCII punctuation but "'". The same
# character class is perturb.js's WORD.
LAYOUT = "\t\n\x0b\x0c\r " + "".join(c for c in string.punctuation if c != "'")
WORD = re.compile(r"[^\t\n\x0b\x0c\r !-&(-/:-@\[-`{-~]+")
VOCAB_FILE, VECTORS_FILE, META_FILE = "vocab.json", "vectors.f16", "meta.json"


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """A vocabulary and its word vectors [V, n] (kept as float32 in memory)."""

    words: tuple[str, ...]
    vectors: np.ndarray  # [V, n] float32

    def __post_init__(self):
        if self.vectors.ndim != 2 or len(self.words) != len(self.vectors) or not self.words:
            raise ValueError("Embeddings need one vector per word, and at least one word.")

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def save(self, directory: str | Path, **meta) -> Path:
        """vocab.json, vectors.f16 (float16, row-major [V, n]) and meta.json in `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / VOCAB_FILE).write_text(json.dumps(list(self.words)))
        self.vectors.astype("<f2").tofile(out / VECTORS_FILE)
        info = {"dim": self.dim, "vocab_size": len(self.words), "dtype": "float16", **meta}
        (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Embeddings:
        d = Path(directory)
        words = tuple(json.loads((d / VOCAB_FILE).read_text()))
        meta = json.loads((d / META_FILE).read_text())
        flat = np.fromfile(d / VECTORS_FILE, dtype="<f2").astype(np.float32)
        return cls(words, flat.reshape(len(words), meta["dim"]))


def system_rng() -> np.random.Generator:
    """A generator seeded from the operating system's cryptographic randomness."""
    return np.random.default_rng(secrets.randbits(128))


def noise(dim: int, epsilon: float, rng: np.random.Generator, size: int = 1) -> np.ndarray:
    """[size, dim] draws of z = l u: density proportional to exp(-epsilon ||z||)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}.")
    u = rng.standard_normal((size, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)  # uniform on the sphere
    length = rng.gamma(shape=dim, scale=1.0 / epsilon, size=(size, 1))
    return length * u


def perturb_words(
    words: Sequence[str],
    epsilon: float,
    embeddings: Embeddings,
    rng: np.random.Generator | None = None,
) -> list[str]:
    """Each word replaced by the vocabulary word nearest to its noisy embedding."""
    if not words:
        return []
    rng = system_rng() if rng is None else rng
    index, vectors = embeddings.index, embeddings.vectors
    centroid = vectors.mean(axis=0)
    points = np.stack([vectors[index[w]] if w in index else centroid for w in words])
    noisy = points + noise(embeddings.dim, epsilon, rng, len(words))  # [k, n]
    # Nearest neighbours: ||x - v||^2 = ||x||^2 - 2 x.v + ||v||^2 (the first term is constant).
    scores = noisy @ vectors.T - 0.5 * np.sum(vectors**2, axis=1)[None, :]
    return [embeddings.words[i] for i in np.argmax(scores, axis=1)]


def guarantee(epsilon: float, num_words: int) -> str:
    """The local guarantee of one perturbed document, in words."""
    return (
        f"metric DP: each word at epsilon = {epsilon:g} per unit of embedding distance; a "
        f"document of {num_words} words at {epsilon:g} x (the sum of the {num_words} word "
        f"distances) against any other document of {num_words} words. Not covered: the number "
        f"of records, their order, the number of words and the punctuation and spacing between "
        f"them (ASCII), which are kept. Perturb a file once: choosing among several draws spends "
        f"epsilon again"
    )


def changed_fraction(originals: Sequence[str], perturbed: Sequence[str]) -> float:
    """The fraction of words that the perturbation replaced by another word (over records)."""
    total = changed = 0
    for a, b in zip(originals, perturbed, strict=True):
        wa, wb = [w.lower() for w in WORD.findall(a)], WORD.findall(b)
        total += len(wa)
        changed += sum(x != y for x, y in zip(wa, wb, strict=True))
    return changed / total if total else 0.0


def build_embeddings(
    corpus_files: Iterable[str | Path],
    *,
    dim: int = 50,
    vocab_size: int = 20_000,
    epochs: int = 5,
    seed: int = 0,
) -> Embeddings:
    """Word2vec (gensim) embeddings of a PUBLIC corpus's most frequent `vocab_size` words."""
    # gensim (the `serve` extra) is needed by this builder only.
    from gensim import utils  # noqa: PLC0415 (optional: building embeddings)
    from gensim.models import Word2Vec  # noqa: PLC0415 (optional)

    sentences = [
        [w.lower() for w in WORD.findall(line)]
        for f in corpus_files
        for line in Path(f).read_text(encoding="utf-8").splitlines()
    ]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("The corpus has no words.")
    # Exactly the `vocab_size` most frequent words (gensim's own cut drops whole tie groups).
    counts = collections.Counter(w for s in sentences for w in s)
    keep = {w for w, _ in counts.most_common(vocab_size)}
    model = Word2Vec(
        sentences,
        vector_size=dim,
        window=5,
        min_count=1,
        trim_rule=lambda w, c, m: utils.RULE_KEEP if w in keep else utils.RULE_DISCARD,
        epochs=epochs,
        seed=seed,
        workers=1,
    )
    words = tuple(model.wv.index_to_key)
    return Embeddings(words, np.asarray(model.wv[list(words)], np.float32))
