"""Converts an HF Qwen2.5-VL checkpoint into a megatron-core distributed checkpoint at a TP/PP layout.

    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf-dir IN --out OUT --tp 2 --pp 2

Run it with tp x pp processes (CPU and gloo are enough). Each rank loads only its shard, one HF tensor at a
time, through the one mapping table, and the checkpoint is written as ``OUT/iter_0000000`` + ``OUT/latest``
(dist_checkpointing; written to a partial directory and renamed when complete). Megatron reshards it on
load, so the SFT trainer (``model.megatron_dir``) and the reverse converter read it at any layout. The
model config and the source directory are recorded in the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_ovr import platform
from megatron_ovr.checkpoint import HFCheckpoint
from megatron_ovr.config import ParallelConfig
from megatron_ovr.config.checks import DTYPES
from megatron_ovr.distributed import init_distributed, shutdown_distributed
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks
from megatron_ovr.training.checkpointing import save_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="megatron checkpoint root to create (must not hold one)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vp", type=int, default=None, help="virtual pipeline chunks per pipeline rank")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the megatron weights (default: bfloat16, as trained)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = HFCheckpoint(args.hf_dir)
    cfg = ckpt.config
    cfg.validate_parallel(args.tp)
    if (Path(args.out) / "latest").exists():
        raise FileExistsError(f"{args.out} already holds a megatron checkpoint")
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vp)
    init_distributed(parallel)
    if dist.get_rank() == 0:
        print(platform.describe_backends(), flush=True)
    chunks = build_model_chunks(cfg, parallel, dtype=DTYPES[args.dtype])
    ckpt.load_into(chunks)
    extra = {"step": 0, "model_config": cfg.to_hf_config(), "source_hf_dir": str(Path(args.hf_dir).resolve()),
             "world_size": dist.get_world_size()}
    final = save_checkpoint(args.out, 0, chunks, None, None, extra)
    if dist.get_rank() == 0:
        print(f"wrote {final} (tp={args.tp} pp={args.pp} vp={args.vp} dtype={args.dtype})", flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
