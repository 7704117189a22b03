"""Torch-native core attention for megatron-core's ``SelfAttention``: SDPA with segment masks and
context parallelism.

It replaces megatron's local ``DotProductAttention`` (same constructor, same forward signature), which has
neither packed-sequence masks nor context parallelism; megatron-core only offers those inside Transformer
Engine. Used by the torch-native layer spec (CPU, tests, GPUs without TE).

Mask contract (how megatron-ovr models call it):
- ``attention_mask=None``: every query sees every key (``AttnMaskType.no_mask``) or every earlier key
  (``causal``).
- ``attention_mask`` = LongTensor of segment ids ``[b, s_full]`` over the FULL sequence (before any
  context-parallel split): a query sees only keys of its own segment (and, if causal, not later ones). This
  one form serves packed SFT samples, padding (pad tokens form their own segment, so no row is empty) and
  the ViT's windows.
- ``[k, b, s_full]``: ``k`` alternative masks; the layer uses row ``mask_index`` (set per layer by the spec;
  the ViT passes its window and full-image segments together and each block picks one).

Context parallelism: the local sequence is this rank's two load-balanced chunks (``context_parallel``);
keys and values are all-gathered over the CP group (backward: reduce-scatter), and the mask is built from
the global positions of local queries and gathered keys, so no reordering is needed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from .context_parallel import cp_gathered_positions, cp_local_positions


def _cp_group(pg_collection, config):
    if config.context_parallel_size == 1:
        return None
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        return pg_collection.cp
    return parallel_state.get_context_parallel_group()


def build_attention_mask(
    segment_ids: Optional[torch.Tensor],
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    causal: bool,
) -> Optional[torch.Tensor]:
    """Boolean mask [b or 1, 1, sq, sk] (True = may attend) from segment ids [b, s_full] and the global
    positions of the queries [sq] and keys [sk]; None when nothing needs masking."""
    mask = None
    if causal:
        mask = (key_positions[None, :] <= query_positions[:, None])[None, None]
    if segment_ids is not None:
        same = segment_ids[:, query_positions, None] == segment_ids[:, None, key_positions]
        same = same[:, None]
        mask = same if mask is None else (mask & same)
    return mask


class SegmentCoreAttention(MegatronModule):
    """SDPA core attention with segment masks and context parallelism (see module docstring)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        mask_index: Optional[int] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        else:
            tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.mask_index = mask_index
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = _cp_group(pg_collection, config)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (local) -> context [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "SegmentCoreAttention takes packed sequences as segment ids in attention_mask, "
                "not packed_seq_params / attention_bias"
            )
        attn_mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        segment_ids = attention_mask
        if segment_ids is not None and segment_ids.dim() == 3:
            if self.mask_index is None:
                raise ValueError("a stacked [k, b, s] attention mask needs a layer spec with mask_index")
            segment_ids = segment_ids[self.mask_index]

        sq = query.shape[0]
        if self.cp_group is not None:
            cp_size = self.cp_group.size()
            cp_rank = self.cp_group.rank()
            key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=self.cp_group)
            full_len = sq * cp_size
            query_positions = cp_local_positions(full_len, cp_rank, cp_size, device=query.device)
            key_positions = cp_gathered_positions(full_len, cp_size, device=query.device)
            mask = build_attention_mask(segment_ids, query_positions, key_positions, causal)
            is_causal = False
        elif segment_ids is None:
            # The fast path: lets SDPA pick the flash / memory-efficient kernels on GPUs.
            mask, is_causal = None, causal
        else:
            positions = torch.arange(sq, device=query.device)
            mask = build_attention_mask(segment_ids, positions, positions, causal)
            is_causal = False

        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads_per_partition != self.num_groups_per_partition,
        )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, context.shape[0], -1)
