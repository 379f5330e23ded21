"""Export a GPT-2 to a Hugging Face PyTorch directory that `GPT2LMHeadModel.from_pretrained` loads.

    jaxdp export --from SRC --out DIR [--tokenizer TOK]

(`python scripts/export_to_pytorch.py ...` is the same command.) SRC is a Hugging Face model
directory or Hub id, or a jaxdp run directory (`--workdir` of `jaxdp train`) whose latest
checkpoint is exported (verified against its checksums). The tokenizer files are copied from
--tokenizer, else from SRC when it has them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxdp import export
from jaxdp.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", required=True, help="HF dir/id or jaxdp workdir")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir/id to save alongside")
    args = parser.parse_args(argv)
    try:
        out = export.export_to_hf(args.src, args.out, tokenizer=args.tokenizer)
    except (OSError, ValueError, NotImplementedError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {out}; load it with transformers.GPT2LMHeadModel.from_pretrained('{out}').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
