"""A tiny randomly initialised GPT-2 trained with DP-SGD on local text: runs offline, CPU, minutes.

    python scripts/train.py --config configs/tiny_offline.py --workdir runs/tiny

Data defaults to the WikiText-2 copy in ../shared/data beside the checkout (validation split as
the training set, test split for evaluation); point --config.data.train_files /
--config.data.tokenizer elsewhere for your own text. Pass `nodp` as the config's argument
(`--config configs/tiny_offline.py:nodp`) for the non-private twin.
"""

from pathlib import Path

from jaxdp.config import default_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def get_config(arg=None):
    c = default_config()
    c.model.name_or_path = "tiny"  # a preset: 2 layers, d=64, 4 heads
    c.model.init = "random"
    c.model.dropout = 0.0
    c.data.source = "text_files"
    c.data.train_files = (str(SHARED / "wikitext-2" / "valid.txt"),)
    c.data.eval_files = (str(SHARED / "wikitext-2" / "test.txt"),)
    c.data.max_eval_examples = 64
    c.data.tokenizer = str(SHARED / "gpt2-tokenizer")
    c.data.block_size = 64
    c.dp.enabled = arg != "nodp"
    c.dp.target_epsilon = 8.0
    c.dp.l2_clip_norm = 1.0
    c.dp.expected_batch_size = 32
    c.dp.microbatch_size = 8
    c.optim.name = "adam"
    c.optim.learning_rate = 3e-3
    c.train.num_steps = 60
    c.train.log_every = 5
    c.train.eval_every = 30
    c.train.checkpoint_every = 30
    c.train.eval_batch_size = 32
    c.train.sample_max_new_tokens = 16
    return c
