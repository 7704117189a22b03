"""Converts a megatron checkpoint (converted, SFT or PPO training checkpoint; optimizer and RNG state are
ignored) back into a sharded HF safetensors directory that transformers and vLLM load as is.

    python tools/convert_megatron_to_hf.py --ckpt ROOT --out HF_DIR [--dtype bfloat16]

One process, no GPU, no model: whatever TP/PP/VP layout the checkpoint was saved at, each weight is read
from the dist-checkpoint files one transformer layer at a time (its stored TP fragments stitched
together), converted to HF names and layout through the one mapping table, and written straight into its
safetensors shard (shard headers are planned up front, so memory holds one tensor, not one shard), with a
progress bar. ``--ckpt`` is a checkpoint root (its ``latest`` iteration) or one ``iter_NNNNNNN`` directory.
Each tensor keeps its stored dtype unless ``--dtype`` is given. The directory appears only when complete.
Tokenizer and processor files come from --tokenizer-dir, or from the HF directory the checkpoint was
converted from. ``--tp/--pp/--vp`` are accepted for older instructions and ignored (any layout reads).

Critic checkpoints (a value head ``[1, hidden]`` in the place of the LM output layer) are detected from the
checkpoint's keys and exported as the HF directory WITHOUT ``lm_head.weight`` plus ``value_head.safetensors``
holding ``value_head.weight`` [1, hidden] (no bias): the trunk loads in transformers/vLLM as is, the head is
read with ``safetensors.torch.load_file(DIR / "value_head.safetensors")["value_head.weight"]``.
Launched under torchrun (older instructions), rank 0 converts and the other ranks exit.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_ovr.checkpoint.convert import is_secondary_rank, megatron_to_hf
from megatron_ovr.config.checks import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="megatron checkpoint root ('latest' pointer) or iteration dir")
    parser.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--vp", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights to this dtype (default: keep the stored dtype)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="copy tokenizer/processor files from here (default: the source HF directory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if is_secondary_rank():
        return 0
    start = time.perf_counter()
    out = megatron_to_hf(args.ckpt, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                         max_shard_bytes=int(args.max_shard_gb * 2**30), tokenizer_dir=args.tokenizer_dir,
                         progress=not args.no_progress)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
