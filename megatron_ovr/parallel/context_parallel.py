"""The load-balanced context-parallel sequence layout, shared by the model, the data path and attention.

A sequence of length ``s`` is cut into ``2 * cp`` equal chunks; CP rank ``r`` holds chunks ``r`` and
``2*cp - 1 - r`` (megatron-core's convention, so causal attention work is balanced across ranks and
megatron's rotary embedding slices positions the same way).
"""

from __future__ import annotations

import torch


def cp_chunk_size(seq_len: int, cp_size: int) -> int:
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2 * context_parallel_size = {2 * cp_size}; "
            "pad the batch to a multiple of it"
        )
    return seq_len // (2 * cp_size)


def cp_local_positions(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global sequence indices [seq_len // cp] held by ``cp_rank``, in local order."""
    chunk = cp_chunk_size(seq_len, cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_chunk = 2 * cp_size - 1 - cp_rank
    second = torch.arange(second_chunk * chunk, (second_chunk + 1) * chunk, device=device)
    return torch.cat([first, second])


def cp_gathered_positions(seq_len: int, cp_size: int, device=None) -> torch.Tensor:
    """Global indices of a tensor all-gathered over the CP group (rank 0's tokens first, then rank 1's...)."""
    return torch.cat([cp_local_positions(seq_len, r, cp_size, device) for r in range(cp_size)])


def split_for_context_parallel(tensor: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's part of ``tensor`` along ``seq_dim`` (identity when cp_size == 1)."""
    if cp_size == 1:
        return tensor
    index = cp_local_positions(tensor.shape[seq_dim], cp_rank, cp_size, device=tensor.device)
    return tensor.index_select(seq_dim, index)


def gather_from_context_parallel(tensor: torch.Tensor, seq_dim: int, group) -> torch.Tensor:
    """Inverse of ``split_for_context_parallel`` over the CP ``group`` (no autograd): the full sequence."""
    cp_size = torch.distributed.get_world_size(group) if group is not None else 1
    if cp_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(cp_size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    gathered = torch.cat(parts, dim=seq_dim)
    full_len = gathered.shape[seq_dim]
    order = torch.argsort(cp_gathered_positions(full_len, cp_size, device=tensor.device))
    return gathered.index_select(seq_dim, order)
