"""Process-group and megatron ``parallel_state`` set-up for torchrun-launched (or single) processes."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_ovr import platform
from megatron_ovr.config import ParallelConfig


def init_distributed(parallel: ParallelConfig, *, seed: int = 1234, timeout_s: int = 600) -> None:
    """Joins (or creates, when not under torchrun) the default process group and builds megatron's
    TP/PP/CP/DP groups. Installs the CPU compatibility layer when CUDA is absent."""
    platform.enable_cpu_compat()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if platform.HAVE_CUDA:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=platform.distributed_backend(),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world_size = dist.get_world_size()
    if world_size % parallel.model_parallel_size != 0:
        raise ValueError(
            f"world size {world_size} is not a multiple of tensor x pipeline x context parallel = "
            f"{parallel.tensor_parallel} x {parallel.pipeline_parallel} x {parallel.context_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
    )
    model_parallel_cuda_manual_seed(seed)


def is_reporting_rank() -> bool:
    """The one rank that holds full results (losses, logits) and reports them: last pipeline stage,
    first tensor/context/data-parallel rank."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


_REPLICA_GROUP = None


def replica_group():
    """The ranks that hold one data-parallel replica of the model (its TP x PP x CP ranks): they share a
    micro-batch stream, so PPO gathers a replica's rollouts over this group. Built once, collectively."""
    global _REPLICA_GROUP
    if _REPLICA_GROUP is None:
        dp_ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(dp_ranks, parallel_state.get_data_parallel_rank())
        for replica in sorted(set(dp_ranks)):
            group = dist.new_group([r for r, d in enumerate(dp_ranks) if d == replica])
            if replica == parallel_state.get_data_parallel_rank():
                _REPLICA_GROUP = group
    return _REPLICA_GROUP


def shutdown_distributed() -> None:
    global _REPLICA_GROUP
    _REPLICA_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
