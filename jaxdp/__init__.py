"""jaxdp: differentially private fine-tuning of GPT-2-class language models in JAX/Flax NNX.

For your own training loop: `jaxdp.make_private` (and `jaxdp.PrivacyPlan`). The whole run from a
config file: `jaxdp train` (`jaxdp.run.run`).
"""

from jaxdp.plan import PrivacyPlan
from jaxdp.private import PrivateTraining, make_private
from jaxdp.randomness import Secrets

__version__ = "0.2.0"
__all__ = ["PrivacyPlan", "PrivateTraining", "Secrets", "make_private", "__version__"]
