"""Stage 1 composition root: config -> distributed set-up -> data loader -> trainer."""

from __future__ import annotations

import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from megatron_ovr import platform
from megatron_ovr.config.io import to_dict
from megatron_ovr.config.sft import BatchSection, DataSection, SFTConfig
from megatron_ovr.data.indexed import IndexedDataset
from megatron_ovr.data.loader import BlendedDataset, SFTDataLoader
from megatron_ovr.distributed import init_distributed, shutdown_distributed

from .losses import masked_token_loss
from .trainer import Trainer


def build_sft_loader(data: DataSection, batch: BatchSection, *, dp_rank: int, dp_size: int) -> SFTDataLoader:
    if batch.global_batch_size % (batch.micro_batch_size * dp_size) != 0:
        raise ValueError(
            f"batch.global_batch_size={batch.global_batch_size} must be a multiple of micro_batch_size x "
            f"data-parallel size = {batch.micro_batch_size} x {dp_size}"
        )
    datasets = [IndexedDataset(path) for path in data.paths]
    if len(datasets) == 1:
        dataset = datasets[0]
    else:
        weights = data.weights or [len(d) for d in datasets]
        dataset = BlendedDataset(datasets, weights, seed=data.seed)
    return SFTDataLoader(
        dataset,
        seq_length=data.seq_length,
        micro_batch_size=batch.micro_batch_size,
        num_microbatches=batch.global_batch_size // (batch.micro_batch_size * dp_size),
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=data.seed,
        packed=data.packed,
    )


def run_sft(cfg: SFTConfig, *, loss_fn=masked_token_loss) -> list[dict]:
    """Runs (or resumes) the cold-start SFT in this process group; returns the logged history."""
    init_distributed(cfg.parallel, seed=cfg.seed)
    if dist.get_rank() == 0:
        print(platform.describe_backends(), flush=True)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    loader = build_sft_loader(
        cfg.data, cfg.batch,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
    )
    history = Trainer(cfg, loader, loss_fn=loss_fn).train()
    shutdown_distributed()
    return history
