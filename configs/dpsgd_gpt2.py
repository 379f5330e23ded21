"""DP-SGD fine-tuning of GPT-2 small on WikiText-2 (raw) from the Hugging Face Hub.

    python scripts/train.py --config configs/dpsgd_gpt2.py --workdir runs/dpsgd_gpt2

Needs the Hub (model `gpt2`, dataset `wikitext`/`wikitext-2-raw-v1`). Offline, point
--config.model.name_or_path at a local HF directory and use data.source=text_files.
"""

from jaxdp.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.name_or_path = "gpt2"
    c.model.init = "pretrained"
    c.model.dropout = 0.0  # dropout adds noise to per-example gradients that DP does not need
    c.data.source = "hf"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 256
    c.dp.enabled = True
    c.dp.target_epsilon = 3.0
    c.dp.l2_clip_norm = 1.0
    c.dp.expected_batch_size = 256
    c.dp.microbatch_size = 16
    c.optim.name = "adamw"
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 400
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    return c
