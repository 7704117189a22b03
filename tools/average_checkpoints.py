"""Uniform average of the model weights of several checkpoints (the paper's final model averages several
RL checkpoints), streamed one tensor at a time with float32 accumulation.

    python tools/average_checkpoints.py --ckpt-root /checkpoints/ovr_7b_rl --last 4 --out /checkpoints/ovr_7b_avg
    python tools/average_checkpoints.py --ckpt A B C --hf-out /models/ovr-7b-avg --tokenizer-dir /models/base

Inputs are megatron dist checkpoints (the main case: training checkpoints of one run, any TP/PP/VP layout;
optimizer and RNG state are ignored): ``--ckpt`` takes roots (their ``latest`` iteration) or ``iter_NNNNNNN``
directories, ``--ckpt-root ROOT --last N`` the N newest complete iterations under ROOT. HF directories are
accepted too. All inputs must have the same model config and kind (policy or critic).

Output: ``--out`` writes a megatron checkpoint root (model weights only, ``iter_0000000`` + ``latest``) that
the trainer reads as ``model.megatron_dir`` and ``convert_megatron_to_hf.py`` exports; ``--hf-out`` writes an
HF directory directly instead. Each tensor gets the dtype it has in the first input (or ``--dtype``). One
process, no GPU; memory holds one tensor per input plus the float32 sum; the output appears only when
complete.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_ovr.checkpoint.convert import average, is_secondary_rank, select_checkpoints
from megatron_ovr.config.checks import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--ckpt", nargs="+", metavar="DIR", help="checkpoints to average (roots, iteration or HF dirs)")
    inputs.add_argument("--ckpt-root", metavar="ROOT", help="average the --last N iterations under this root")
    parser.add_argument("--last", type=int, default=None, help="with --ckpt-root: how many newest iterations")
    outputs = parser.add_mutually_exclusive_group(required=True)
    outputs.add_argument("--out", help="megatron checkpoint root to create")
    outputs.add_argument("--hf-out", help="HF directory to create instead")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the averaged weights (default: each tensor's dtype in the first input)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard with --hf-out")
    parser.add_argument("--tokenizer-dir", default=None, help="with --hf-out: copy tokenizer/processor files from here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.last is not None and args.ckpt_root is None:
        parser.error("--last goes with --ckpt-root")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if is_secondary_rank():
        return 0
    start = time.perf_counter()
    paths = select_checkpoints(args.ckpt or (), args.ckpt_root, args.last)
    out = average(paths, args.hf_out or args.out, hf_out=args.hf_out is not None,
                  dtype=DTYPES[args.dtype] if args.dtype else None, max_shard_bytes=int(args.max_shard_gb * 2**30),
                  tokenizer_dir=args.tokenizer_dir, progress=not args.no_progress)
    print(f"averaged {len(paths)} checkpoint(s) into {out} in {time.perf_counter() - start:.1f} s:", flush=True)
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
