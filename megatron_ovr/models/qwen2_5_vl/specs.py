"""Layer specs for Qwen2.5-VL: one function per tower, one backend switch.

Both backends use our ``SegmentCoreAttention`` (SDPA; segment masks for packing, padding and ViT windows;
context parallelism). They differ in the GEMMs and norms:
- ``torch``: megatron-core's Column/RowParallelLinear and a torch RMSNorm (CPU, tests, any GPU).
- ``te``: Transformer Engine's fused norm+linear and row-parallel linears (FP8 through the megatron
  config's ``fp8`` fields). TE is imported here and nowhere else.

The backend is chosen once by ``platform.use_transformer_engine()``; no model code names TE.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ovr import platform
from megatron_ovr.parallel.attention import SegmentCoreAttention

BACKENDS = ("torch", "te")


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor; tags its weight for sequence parallelism so that
    megatron's ``finalize_model_grads`` all-reduces its gradient over the TP group (megatron's own
    ``WrappedTorchNorm`` refuses sequence parallelism)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def resolve_backend(backend: str | None = None) -> str:
    if backend is None:
        return "te" if platform.use_transformer_engine() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; choose one of {BACKENDS}")
    if backend == "te" and not platform.HAVE_TE:
        raise ImportError("backend 'te' needs Transformer Engine on a CUDA machine: pip install 'megatron-ovr[gpu]'")
    return backend


def _linears(backend: str):
    """(qkv/fc1 linear, proj/fc2 linear, separate norm or IdentityOp when fused into the linear)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return TELayerNormColumnParallelLinear, TERowParallelLinear, IdentityOp
    return ColumnParallelLinear, RowParallelLinear, RMSNorm


def layer_spec(backend: str, attn_mask_type: AttnMaskType, mask_index: int | None = None) -> ModuleSpec:
    """A pre-norm transformer layer: norm -> self-attention -> residual; norm -> SwiGLU MLP -> residual."""
    column, row, norm = _linears(backend)
    core_attention = ModuleSpec(module=SegmentCoreAttention, params={"mask_index": mask_index})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def final_norm(backend: str):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def language_block_spec(backend: str, config, vp_stage: int | None) -> TransformerBlockSubmodules:
    """This pipeline stage's causal decoder layers plus the final norm (given explicitly: megatron's
    default torch norm refuses sequence parallelism)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(backend, AttnMaskType.causal)] * num_layers, layer_norm=final_norm(backend)
    )


# Row of the stacked ViT mask each block reads: the vision tower passes [full-image segments, window segments].
VISION_FULL_MASK, VISION_WINDOW_MASK = 0, 1


def vision_block_spec(backend: str, depth: int, fullatt_block_indexes: Sequence[int]) -> TransformerBlockSubmodules:
    """Non-causal ViT blocks; blocks in ``fullatt_block_indexes`` attend over the whole image, the others
    within windows."""
    specs = [
        layer_spec(
            backend,
            AttnMaskType.no_mask,
            mask_index=VISION_FULL_MASK if i in fullatt_block_indexes else VISION_WINDOW_MASK,
        )
        for i in range(depth)
    ]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=None)


def merger_mlp_spec() -> MLPSubmodules:
    """The merger's norm runs before four patches are regrouped into one row, so it cannot fuse into the
    first linear as TE's fused layers would; the merger uses megatron's own parallel linears."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
