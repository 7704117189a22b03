"""Converts a megatron checkpoint (converted, SFT or PPO training checkpoint; optimizer state is ignored)
back into a sharded HF safetensors directory that transformers and vLLM load as is.

    torchrun --nproc-per-node 2 tools/convert_megatron_to_hf.py --ckpt ROOT --out HF_DIR --pp 2
    python tools/convert_megatron_to_hf.py --ckpt ROOT --out HF_DIR            # one process

Any TP/PP layout can read any saved layout (megatron reshards on load). The weights stream out of the
model one HF tensor at a time through the one mapping table (TP gather, PP broadcast) and rank 0 writes
them in shards of --max-shard-gb; the directory appears only when complete. Tokenizer and processor files
come from --tokenizer-dir, or from the HF directory the checkpoint was converted from.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from megatron_ovr.checkpoint import write_hf_checkpoint
from megatron_ovr.config import ParallelConfig
from megatron_ovr.config.checks import DTYPES
from megatron_ovr.distributed import init_distributed, shutdown_distributed
from megatron_ovr.mapping import export_hf_weights
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks
from megatron_ovr.training.checkpointing import load_checkpoint, saved_extra, saved_model_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="megatron checkpoint root (with a 'latest' pointer)")
    parser.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size used to read it")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used to read it")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the HF weights")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="copy tokenizer/processor files from here (default: the source HF directory)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = saved_model_config(args.ckpt)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    init_distributed(parallel)
    dtype = DTYPES[args.dtype]
    chunks = build_model_chunks(cfg, parallel, dtype=dtype)
    load_checkpoint(args.ckpt, chunks, restore_rng=False)
    stream = export_hf_weights(chunks, cfg)
    if dist.get_rank() == 0:
        auxiliary = args.tokenizer_dir or saved_extra(args.ckpt).get("source_hf_dir")
        out = write_hf_checkpoint(args.out, cfg, stream, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                  auxiliary_from=auxiliary)
        print(f"wrote {out}", flush=True)
    else:
        for _ in stream:  # the export is a collective: every rank walks it to the end
            pass
    dist.barrier()
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
