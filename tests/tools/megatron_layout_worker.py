"""Runs under torchrun at one TP/PP/VP layout, with the real megatron model (policy or critic):
1. dumps the model's sharded state dict (after megatron's factories) to ``--out/ssd_rank{R}.json``;
2. loads the model-free checkpoint ``--ckpt`` with ``checkpointing.load_checkpoint`` (as the trainer does)
   and checks every exported HF tensor bit for bit against ``--hf-dir``;
3. with ``--save-training ROOT``: wraps the model in DDP with megatron's distributed optimizer, takes one
   zero-gradient Adam step (weights unchanged, optimizer state created) and saves a training checkpoint with
   ``checkpointing.save_checkpoint`` at this layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

from megatron_ovr.checkpoint.hf import HFCheckpoint
from megatron_ovr.config import ParallelConfig
from megatron_ovr.distributed import init_distributed, shutdown_distributed
from megatron_ovr.mapping import export_hf_weights
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks
from megatron_ovr.training import checkpointing


def sharded_layout(chunks) -> list[dict]:
    entries = []
    for chunk in chunks:
        state = chunk.sharded_state_dict()
        apply_factories(state)
        for value in nested_values(state):
            if isinstance(value, ShardedTensor):
                entries.append(dict(kind="tensor", key=value.key, global_shape=list(value.global_shape),
                                    global_offset=list(value.global_offset), local_shape=list(value.local_shape),
                                    prepend_axis_num=value.prepend_axis_num, replica_id=list(value.replica_id)
                                    if isinstance(value.replica_id, tuple) else value.replica_id,
                                    flattened_range=value.flattened_range is not None,
                                    allow_shape_mismatch=value.allow_shape_mismatch))
            elif isinstance(value, ShardedObject):
                replica = value.replica_id
                main = all(r == 0 for r in replica) if isinstance(replica, tuple) else replica == 0
                entries.append(dict(kind="object", key=value.unique_key, main=main))
            else:
                entries.append(dict(kind=type(value).__name__, key=getattr(value, "key", None)))
    return entries


def zero_step_training_checkpoint(chunks, root: str, cfg, head: str) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = [DistributedDataParallel(c.config, ddp_config, c) for c in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, use_distributed_optimizer=True,
                        params_dtype=torch.float32), model)
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    extra = {"step": 3, "model_config": cfg.to_hf_config(), "head": head, "world_size": dist.get_world_size()}
    checkpointing.save_checkpoint(root, 3, model, optimizer, None, extra)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--head", default="lm")
    parser.add_argument("--save-training", default=None)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vp)
    init_distributed(parallel)
    rank = dist.get_rank()
    cfg = checkpointing.saved_model_config(args.ckpt)
    chunks = build_model_chunks(cfg, parallel, dtype=torch.float32, head=args.head)
    out = Path(args.out)
    (out / f"ssd_rank{rank}.json").write_text(json.dumps(sharded_layout(chunks)))

    for chunk in chunks:  # nothing may survive from the random init
        for param in chunk.parameters():
            param.data.fill_(float("nan"))
    checkpointing.load_checkpoint(args.ckpt, chunks, restore_rng=False)
    reference = HFCheckpoint(args.hf_dir)
    mismatched, seen = [], []
    for name, tensor in export_hf_weights(chunks, cfg):
        seen.append(name)
        if rank == 0 and not torch.equal(tensor, reference.get(name).to(tensor.dtype)):
            mismatched.append(name)
    if rank == 0:
        expected = sorted(reference.names())
        if cfg.text.tie_word_embeddings:
            expected = [n for n in expected if n != "lm_head.weight"]
        (out / "load.json").write_text(json.dumps({"mismatched": mismatched, "exported": sorted(seen),
                                                   "expected": expected}))
    if args.save_training:
        zero_step_training_checkpoint(chunks, args.save_training, cfg, args.head)
    dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
