"""Best-of-N (or Gibbs) responses from a reference model, scored by a DP reward model.

    jaxdp best-of-n --reward runs/reward/reward_model --prompt "Human: Hi?\n\nAssistant:" --n 8
    jaxdp best-of-n --reward runs/rw/reward_model --synthetic 16 --n 8 --out samples.jsonl

(`python scripts/best_of_n.py ...` is the same command.) For each prompt, N responses are
sampled from the reference model (default: the reward model's base; --reference DIR for another
HF GPT-2 directory) at --temperature with nucleus --top-p, scored by the reward model, and the
best one is returned (--gibbs-eta E: one drawn from pi0(y) exp(E r(y)) / Z over the N instead).
Everything here is post-processing of the private reward model and public inputs: no further
privacy cost (the prompts must be public, or the user's own). With --synthetic K the prompts
come from the synthetic task and the true rewards of the first and the chosen sample are
reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxdp best-of-n", description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", required=True, type=Path, help="a reward_model directory")
    p.add_argument("--reference", default=None, help="HF GPT-2 directory (default: the base)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a file of prompts, one JSON string per line")
    p.add_argument("--synthetic", type=int, default=0, help="K prompts of the synthetic task")
    p.add_argument("--n", type=int, default=8, choices=(1, 2, 4, 8, 16))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--gibbs-eta", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="public generation seed")
    p.add_argument("--out", type=Path, help="JSONL of prompts, candidates and rewards")
    args = p.parse_args(argv)
    if not (args.reward / "config.json").is_file():
        p.error(f"{args.reward} is not a reward model directory (no config.json).")
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [json.loads(line) for line in args.prompts.read_text().splitlines() if line]
    from jaxdp import reward

    if args.synthetic:
        prompts += [t.prompt for t in reward.synthetic_preferences(args.synthetic, seed=3)]
    if not prompts:
        p.error("give --prompt, --prompts or --synthetic.")
    from jaxdp import policy

    results = policy.best_of_n_responses(
        args.reward,
        prompts,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        gibbs_eta=args.gibbs_eta,
        seed=args.seed,
        reference=args.reference,
    )
    lines = [json.dumps(r) for r in results]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    for r in results[:3]:
        print(f"{r['prompt']!r} -> {r['response']!r} (reward {r['reward']:.3f})")
    if args.synthetic:
        first = np.mean([reward.synthetic_reward(r["candidates"][0]) for r in results])
        best = np.mean([reward.synthetic_reward(r["response"]) for r in results])
        print(f"mean true reward: N=1 {first:.3f}, best of {args.n} {best:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
