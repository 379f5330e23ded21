"""The randomness of a run: one key stream per purpose, secret where the guarantee rests on it.

Every random choice of a run belongs to exactly one purpose (`Stream`), and each purpose draws from
its own stream, derived from a root seed and the purpose's tag with NumPy's `SeedSequence` (a hash
of both), so two purposes never share bits whatever indices (step, leaf, batch, position) they fold
in afterwards.

Secret roots (`Secrets`), which the DP guarantee rests on:

- ``NOISE``: the Gaussian noise of every step (`jaxdp.noise`). Whoever knows it can subtract the
  noise from released parameters and read the clipped gradient sums in the clear.
- ``SAMPLING``: the Poisson draws (`jaxdp.sampling`). Privacy amplification by subsampling
  assumes that nobody knows which examples a step used.
- ``DROPOUT``: dropout masks. They are drawn per position in the physical batch, and positions
  depend on which other examples were drawn; for the sensitivity argument to hold whatever that
  does to positions, the masks must be unknown (then they are i.i.d. whatever the positions).

Each root is a 128-bit integer drawn from the operating system's cryptographic randomness
(`secrets`, i.e. `os.urandom`) at the first start of a workdir. The noise is drawn from two
independent threefry2x32 keys hashed from its root (`wide_stream_key`): 128 bits stand behind
every noise value. Dropout masks use one threefry2x32 key (64 bits) hashed from the 128-bit
root: recovering it would take a 2^64 search, and a guess cannot even be checked without the
private data the masks were applied to; the Poisson draws use NumPy's PCG64, seeded with the
whole 128-bit root. The roots are stored in the workdir's private part (`W/private/run.json`,
mode 0600) and in every checkpoint (the noise key is part of the optimizer state), and restored on
resume so that a resumed run replays exactly. They are never printed, logged or exported. A
fixed seed (`dp.noise_seed`) is possible for tests and reproductions; every epsilon of such a run
carries `FIXED_SEED_LABEL`.

Public roots (`train.seed`, written to config.json) serve what touches no private data:

- ``INIT`` and ``LORA_INIT``: the initial weights (data-independent).
- ``GENERATION``: sampling text from the model at eval time (post-processing of the parameters).
"""

from __future__ import annotations

import dataclasses
import enum
import secrets as _os_secrets
from typing import Any

import jax
import numpy as np

FIXED_SEED_LABEL = "noise seed fixed by the user: not private against anyone who knows it"
SECRET_SEED_BITS = 128


class Stream(enum.IntEnum):
    """Purposes of randomness; the values are the tags that separate their streams."""

    NOISE = 0x4E4F4953  # "NOIS"
    SAMPLING = 0x53414D50  # "SAMP"
    DROPOUT = 0x44524F50  # "DROP"
    INIT = 0x494E4954  # "INIT"
    LORA_INIT = 0x4C4F5241  # "LORA"
    GENERATION = 0x47454E45  # "GENE"


def _check_seed(seed: int) -> int:
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"A seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def seed_sequence(seed: int, stream: Stream, *indices: int) -> np.random.SeedSequence:
    """NumPy's seed sequence of `stream` under root `seed`, optionally at `indices` (e.g. a step).

    Seeds of any size are used whole (a 128-bit secret keeps its 128 bits)."""
    return np.random.SeedSequence(
        _check_seed(seed), spawn_key=(int(stream), *(int(i) for i in indices))
    )


KEY_IMPL = "threefry2x32"  # pinned: JAX_DEFAULT_PRNG_IMPL cannot swap in a weaker generator


def stream_key(seed: int, stream: Stream) -> jax.Array:
    """The JAX PRNG key (threefry2x32: 64 bits, hashed from the whole seed) at the root of
    `stream` under `seed`."""
    words = seed_sequence(seed, stream).generate_state(2, np.uint32)
    return jax.random.wrap_key_data(words, impl=KEY_IMPL)


# Independent threefry2x32 keys behind every noise value: 2 x 64 = 128 bits of secret.
NOISE_KEY_STREAMS = 2


def wide_stream_key(seed: int, stream: Stream, num_keys: int = NOISE_KEY_STREAMS) -> jax.Array:
    """`num_keys` independent threefry2x32 keys [num_keys] at the root of `stream`, hashed from
    the whole seed (`num_keys` x 64 bits). `jaxdp.noise` draws every noise value from all of
    them (the normalised sum of one normal per key), so predicting the noise needs every key:
    with 2 keys, 128 bits of secret, where one threefry key has 64."""
    words = seed_sequence(seed, stream).generate_state(2 * num_keys, np.uint32)
    return jax.random.wrap_key_data(words.reshape(num_keys, 2), impl=KEY_IMPL)


@dataclasses.dataclass(frozen=True, repr=False)
class Secrets:
    """The secret roots of one run (see the module docstring). `repr` hides the values."""

    noise: int
    sampling: int
    dropout: int
    fixed_by_user: bool = False

    @classmethod
    def generate(cls) -> Secrets:
        """Fresh roots from the operating system's cryptographic randomness."""
        draw = lambda: _os_secrets.randbits(SECRET_SEED_BITS)
        return cls(noise=draw(), sampling=draw(), dropout=draw())

    @classmethod
    def from_seed(cls, seed: int) -> Secrets:
        """Roots fixed by the user (tests, reproductions): NOT private against whoever knows
        `seed`. The purposes still draw independent streams."""
        seed = _check_seed(seed)
        return cls(noise=seed, sampling=seed, dropout=seed, fixed_by_user=True)

    @property
    def label(self) -> str:
        """How the randomness was chosen, for privacy.json and every printed epsilon."""
        if self.fixed_by_user:
            return FIXED_SEED_LABEL
        return "secret: drawn from the operating system's cryptographic randomness"

    def noise_key(self) -> jax.Array:
        """The noise's keys [NOISE_KEY_STREAMS] (128 bits: `wide_stream_key`)."""
        return wide_stream_key(self.noise, Stream.NOISE)

    def dropout_key(self) -> jax.Array:
        return stream_key(self.dropout, Stream.DROPOUT)

    def to_json(self) -> dict[str, Any]:
        return {
            "noise": str(self.noise),
            "sampling": str(self.sampling),
            "dropout": str(self.dropout),
            "fixed_by_user": self.fixed_by_user,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Secrets:
        return cls(
            noise=int(d["noise"]),
            sampling=int(d["sampling"]),
            dropout=int(d["dropout"]),
            fixed_by_user=bool(d["fixed_by_user"]),
        )

    def __repr__(self) -> str:
        return f"Secrets(<hidden>, fixed_by_user={self.fixed_by_user})"


def dropout_step_key(dropout_key: jax.Array, step: int) -> jax.Array:
    """The dropout key of logical step `step`; physical batch j uses `fold_in(., j)`."""
    return jax.random.fold_in(dropout_key, step)


def generation_key(seed: int, prompt_index: int) -> jax.Array:
    """The key for sampling prompt `prompt_index`'s continuation; position t folds in t."""
    return jax.random.fold_in(stream_key(seed, Stream.GENERATION), prompt_index)
