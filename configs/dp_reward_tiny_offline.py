"""An offline DP reward model: a tiny random GPT-2's features, the synthetic preference task.

    python scripts/train_reward.py --config configs/dp_reward_tiny_offline.py --workdir runs/rw

The synthetic task's true reward is known (`jaxdp.reward.synthetic_reward`), so the held-out
accuracy can be read against it; runs on a CPU in about a minute.
"""

from pathlib import Path

from jaxdp.reward_run import default_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def get_config(arg=None):
    c = default_config()
    c.model.name_or_path = "tiny"
    c.model.init = "random"
    c.data.source = "synthetic"
    c.data.num_synthetic = 4000
    c.data.tokenizer = str(SHARED / "gpt2-tokenizer")
    c.data.max_length = 32
    c.dp.target_epsilon = 8.0
    c.dp.expected_batch_size = 256.0
    c.train.num_steps = 200
    c.train.eval_every = 50
    return c
