"""DP-SGD fine-tuning of LoRA adapters on GPT-2 small (WikiText-2 from the Hugging Face Hub).

    python scripts/train.py --config configs/dplora_gpt2.py --workdir runs/dplora_gpt2

Only the rank-8 adapters on each block's attention projections are trained (clipped, noised,
updated); the base weights stay frozen. The export in W/hf has the adapters merged in, so it is
a plain GPT2LMHeadModel.
"""

from jaxdp.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.model.name_or_path = "gpt2"
    c.model.init = "pretrained"
    c.model.dropout = 0.0
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = ("attn.c_attn", "attn.c_proj")
    c.data.source = "hf"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 256
    c.dp.enabled = True
    c.dp.target_epsilon = 3.0
    c.dp.l2_clip_norm = 1.0
    c.dp.expected_batch_size = 256
    c.dp.microbatch_size = 32  # adapters only: per-example gradients are small
    c.optim.name = "adamw"
    c.optim.learning_rate = 2e-3
    c.train.num_steps = 400
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    return c
