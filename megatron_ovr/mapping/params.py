"""Typed parameter mappings between HF tensors and megatron-core tensor-parallel shards.

Each mapping separates two pure steps:
- the *format* change (``hf_to_megatron`` / ``megatron_to_hf``): e.g. interleave Q, K, V per query group,
  or fuse gate and up projections; it sees full (unsharded) tensors only;
- the *distribution* over tensor-parallel ranks (``shard`` / ``unshard``).
Loaders, the HF exporter and rollout weight sync all go through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch


@dataclass(frozen=True)
class ParamMapping:
    """One megatron parameter <-> one or more HF tensors. ``megatron``/``hf`` are name patterns in
    which ``*`` stands for the layer index."""

    megatron: str
    hf: tuple[str, ...]
    export: bool = True
    """False for a tensor that duplicates another HF tensor (a tied output layer): loaded, never exported."""
    tp_dim: ClassVar[int | None] = None  # None: replicated over TP

    def hf_to_megatron(self, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        (tensor,) = hf_tensors
        return tensor

    def megatron_to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        if self.tp_dim is None or tp_size == 1:
            return full
        return _even_chunks(full, self.tp_dim, tp_size, self.megatron)[tp_rank]

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_dim)


def _even_chunks(tensor: torch.Tensor, dim: int, parts: int, name: str) -> tuple[torch.Tensor, ...]:
    if tensor.shape[dim] % parts != 0:
        raise ValueError(f"{name}: dimension {dim} of size {tensor.shape[dim]} does not split into {parts} TP shards")
    return tensor.chunk(parts, dim=dim)


@dataclass(frozen=True)
class Replicated(ParamMapping):
    """Norm weights and other tensors every TP rank holds whole."""


@dataclass(frozen=True)
class ColumnParallel(ParamMapping):
    """Output-dimension split: column-parallel linears, their biases, vocab-parallel embeddings."""

    tp_dim: ClassVar[int] = 0


@dataclass(frozen=True)
class RowParallel(ParamMapping):
    """Input-dimension split: row-parallel linears (their bias is replicated: use ``Replicated``)."""

    tp_dim: ClassVar[int] = 1


@dataclass(frozen=True)
class PatchEmbed(Replicated):
    """HF's Conv3d patch embedding [out, c, t, p, p] == our Linear [out, c*t*p*p] (stride == kernel)."""

    conv_shape: tuple[int, ...] = ()

    def hf_to_megatron(self, hf_tensors):
        (weight,) = hf_tensors
        return weight.reshape(weight.shape[0], -1)

    def megatron_to_hf(self, tensor):
        return [tensor.reshape(self.conv_shape)]


@dataclass(frozen=True)
class QKV(ColumnParallel):
    """Q, K, V (separate HF tensors, or HF's stacked [Q; K; V] when ``stacked``) <-> megatron's
    ``linear_qkv``, whose rows are grouped per query group: [q heads of group g, k_g, v_g] for each g.
    Groups are contiguous, so the TP split is a plain split of dim 0. Works for weights and biases."""

    num_heads: int = 0
    num_groups: int = 0
    head_dim: int = 0
    stacked: bool = False

    def shard(self, full, tp_rank, tp_size):
        # An even row split would silently cut a query group in half.
        if self.num_groups % tp_size:
            raise ValueError(f"{self.megatron}: {self.num_groups} query groups do not split into {tp_size} TP shards")
        return super().shard(full, tp_rank, tp_size)

    def _split_hf(self, hf_tensors):
        if self.stacked:
            (qkv,) = hf_tensors
            q_rows = self.num_heads * self.head_dim
            kv_rows = self.num_groups * self.head_dim
            return torch.split(qkv, [q_rows, kv_rows, kv_rows], dim=0)
        return hf_tensors

    def hf_to_megatron(self, hf_tensors):
        q, k, v = self._split_hf(hf_tensors)
        rest = q.shape[1:]
        heads_per_group = self.num_heads // self.num_groups
        q = q.reshape(self.num_groups, heads_per_group * self.head_dim, *rest)
        k = k.reshape(self.num_groups, self.head_dim, *rest)
        v = v.reshape(self.num_groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def megatron_to_hf(self, tensor):
        rest = tensor.shape[1:]
        heads_per_group = self.num_heads // self.num_groups
        grouped = tensor.reshape(self.num_groups, (heads_per_group + 2) * self.head_dim, *rest)
        q, k, v = torch.split(grouped, [heads_per_group * self.head_dim, self.head_dim, self.head_dim], dim=1)
        q, k, v = (t.reshape(-1, *rest) for t in (q, k, v))
        return [torch.cat([q, k, v], dim=0)] if self.stacked else [q, k, v]


@dataclass(frozen=True)
class GatedMLP(ColumnParallel):
    """HF gate_proj and up_proj <-> megatron's fused ``linear_fc1``. Each TP shard holds [gate_r; up_r],
    so sharding splits gate and up separately (a plain split of the fused tensor would be wrong)."""

    def hf_to_megatron(self, hf_tensors):
        gate, up = hf_tensors
        return torch.cat([gate, up], dim=0)

    def megatron_to_hf(self, tensor):
        return list(tensor.chunk(2, dim=0))

    def shard(self, full, tp_rank, tp_size):
        gate, up = full.chunk(2, dim=0)
        return torch.cat(
            [_even_chunks(gate, 0, tp_size, self.megatron)[tp_rank], _even_chunks(up, 0, tp_size, self.megatron)[tp_rank]]
        )

    def unshard(self, shards):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups], dim=0)
