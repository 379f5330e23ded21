"""jaxdp: differentially private fine-tuning of GPT-2-class language models in JAX/Flax NNX."""

__version__ = "0.1.0"
