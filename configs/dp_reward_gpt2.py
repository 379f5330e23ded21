"""A DP reward model on Anthropic HH-RLHF: frozen GPT-2 small features + a linear head, epsilon 8.

    python scripts/train_reward.py --config configs/dp_reward_gpt2.py --workdir runs/reward

Needs the Hugging Face Hub (model, tokenizer, dataset). A LoRA reward model:
--config.model.lora_rank=8 (slower: the base runs inside every per-example gradient).
"""

from jaxdp.reward_run import default_config


def get_config(arg=None):
    c = default_config()
    c.model.name_or_path = "openai-community/gpt2"
    c.data.source = "Anthropic/hh-rlhf"
    c.data.max_eval = 2000
    c.data.max_length = 256
    c.dp.target_epsilon = 8.0
    c.dp.expected_batch_size = 1024.0
    c.train.num_steps = 500
    c.train.eval_every = 100
    return c
