"""The non-private baseline of configs/dpsgd_gpt2.py: same model, data and pipeline, no DP.

python scripts/train.py --config configs/sgd_gpt2.py --workdir runs/sgd_gpt2
"""

from jaxdp.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.name_or_path = "gpt2"
    c.model.dropout = 0.0
    c.data.source = "hf"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 256
    c.dp.enabled = False  # shuffled fixed-size batches of expected_batch_size; no epsilon
    c.dp.expected_batch_size = 32
    c.optim.name = "adamw"
    c.optim.learning_rate = 5e-5
    c.train.num_steps = 400
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    return c
