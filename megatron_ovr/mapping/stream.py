"""Streaming load of HF tensors into this rank's megatron shards, and streaming export back to HF names.

Both walk the mapping table one parameter at a time, so peak extra memory is one full tensor:
- ``load_hf_weights`` pulls each HF tensor it needs through a callable (a safetensors reader, a dict),
  reshapes it to megatron's format and copies this TP rank's shard into the parameter.
- ``export_hf_weights`` is a generator of ``(hf_name, full_tensor)``: it gathers TP shards and
  broadcasts from the owning pipeline stage, so every rank sees the same stream. It is a collective:
  every rank of the model-parallel group must iterate it to the end. The HF converter writes it to disk,
  rollout weight sync feeds it to the engine, and tests compare it (or gradients, via ``tensor_of``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ovr import platform
from megatron_ovr.config import Qwen25VLConfig

from .params import ParamMapping
from .qwen2_5_vl import qwen2_5_vl_mappings

_LM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class BoundParam:
    """A local parameter with its global name (pipeline layer offset applied) and table entry."""

    name: str
    entry: ParamMapping
    layer: Optional[int]
    param: torch.nn.Parameter

    def hf_names(self) -> list[str]:
        return [p.replace("*", str(self.layer)) if self.layer is not None else p for p in self.entry.hf]


def _compile(table: Sequence[ParamMapping]) -> list[tuple[re.Pattern, ParamMapping]]:
    return [(re.compile("^" + re.escape(e.megatron).replace(r"\*", r"(\d+)") + "$"), e) for e in table]


def _global_name(chunk: torch.nn.Module, name: str) -> str:
    """Megatron names layers by their index in this stage; the HF table needs the global layer index."""
    match = _LM_LAYER.match(name)
    if not match:
        return name
    local = int(match.group(1))
    global_index = chunk.language_model.decoder.layers[local].layer_number - 1
    return f"language_model.decoder.layers.{global_index}." + name[match.end():]


def bind_parameters(model_chunks: Sequence[torch.nn.Module], table: Sequence[ParamMapping]) -> list[BoundParam]:
    """Every parameter of this rank's chunks with its table entry; a parameter the table does not know is
    an error (so the table cannot silently fall behind the model)."""
    compiled = _compile(table)
    bound = []
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            global_name = _global_name(chunk, name)
            for pattern, entry in compiled:
                match = pattern.match(global_name)
                if match:
                    layer = int(match.group(1)) if match.groups() else None
                    bound.append(BoundParam(global_name, entry, layer, param))
                    break
            else:
                raise KeyError(f"megatron parameter {global_name!r} has no entry in the HF mapping table")
    return bound


def model_mappings(model_chunks, cfg: Qwen25VLConfig) -> list[ParamMapping]:
    """The table of these chunks: their layer backend and head (policy or critic) decide it."""
    return qwen2_5_vl_mappings(cfg, getattr(model_chunks[0], "backend", "torch"), getattr(model_chunks[0], "head", "lm"))


@torch.no_grad()
def load_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    cfg: Qwen25VLConfig,
    get_hf_tensor: Callable[[str], torch.Tensor],
    *,
    keep: Collection[str] = (),
) -> None:
    """Copies this rank's shard of every parameter from HF tensors (on-disk names) fetched one by one.
    Parameters whose HF names are in ``keep`` keep their current values (a fresh critic head)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for bound in bind_parameters(model_chunks, model_mappings(model_chunks, cfg)):
        if set(bound.hf_names()) <= set(keep):
            continue
        hf_tensors = [get_hf_tensor(n) for n in bound.hf_names()]
        shard = bound.entry.shard(bound.entry.hf_to_megatron(hf_tensors), tp_rank, tp_size)
        if shard.shape != bound.param.shape:
            raise ValueError(
                f"{bound.name}: HF tensor(s) {bound.hf_names()} give a TP shard of shape {tuple(shard.shape)}, "
                f"the model expects {tuple(bound.param.shape)}: does the config match the checkpoint?"
            )
        bound.param.copy_(shard)


def _gather_tp(shard: torch.Tensor, entry: ParamMapping) -> torch.Tensor:
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if entry.tp_dim is None or tp_size == 1:
        return shard
    shards = [torch.empty_like(shard) for _ in range(tp_size)]
    dist.all_gather(shards, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return entry.unshard(shards)


def _param_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    return param.detach()


@torch.no_grad()
def export_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    cfg: Qwen25VLConfig,
    *,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = _param_tensor,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(hf_name, full tensor)`` for every exported HF tensor, the same stream on every rank.

    ``tensor_of`` picks what to export from each parameter (the weight by default; a gradient in tests).
    """
    table = model_mappings(model_chunks, cfg)
    local = [b for b in bind_parameters(model_chunks, table) if b.entry.export]
    by_name = {b.name: b for b in local}
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    # Every stage learns which parameters the others own (uneven and virtual layouts included).
    manifest = [(b.name, tuple(tensor_of(b.param).shape), tensor_of(b.param).dtype) for b in local]
    if pp_size > 1:
        manifests: list = [None] * pp_size
        dist.all_gather_object(manifests, manifest, group=parallel_state.get_pipeline_model_parallel_group())
    else:
        manifests = [manifest]
    by_pattern = {e.megatron: e for e in table}
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()) if pp_size > 1 else None
    tp_size = parallel_state.get_tensor_model_parallel_world_size()

    for owner, stage_manifest in enumerate(manifests):
        for name, shard_shape, dtype in stage_manifest:
            bound = by_name.get(name) if owner == parallel_state.get_pipeline_model_parallel_rank() else None
            if bound is not None:
                full = _gather_tp(tensor_of(bound.param), bound.entry)
                entry, layer = bound.entry, bound.layer
            else:
                entry, layer = _lookup(by_pattern, name)
                full_shape = list(shard_shape)
                if entry.tp_dim is not None:
                    full_shape[entry.tp_dim] *= tp_size
                full = torch.empty(full_shape, dtype=dtype, device=platform.default_device())
            if pp_size > 1:
                dist.broadcast(full, src=pp_ranks[owner], group=parallel_state.get_pipeline_model_parallel_group())
            hf_names = [p.replace("*", str(layer)) if layer is not None else p for p in entry.hf]
            yield from zip(hf_names, entry.megatron_to_hf(full))


def _lookup(table: dict[str, ParamMapping], global_name: str) -> tuple[ParamMapping, Optional[int]]:
    match = re.search(r"\.layers\.(\d+)\.", global_name)
    if match:
        pattern = global_name[: match.start()] + ".layers.*." + global_name[match.end():]
        return table[pattern], int(match.group(1))
    return table[global_name], None
