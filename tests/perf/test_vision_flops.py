"""The vision tower's FLOP count (``training.flops``) equals the model's own matmul shapes and the
attention pairs of its window layout, also for windows that do not divide the grid and for t > 1."""

import torch

from megatron_ovr.config import ParallelConfig, get_preset
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks
from megatron_ovr.models.qwen2_5_vl.positions import vision_window_layout
from megatron_ovr.training.flops import (
    lm_training_flops_per_token, qwen2_5_vl_training_flops, vision_training_flops,
)

# The tiny ViT's window is 2x2 merged tokens: 3x5 and 5x3 merged grids leave partial border windows.
GRIDS = [(1, 6, 10), (2, 4, 4), (1, 10, 6)]


def _pairs(segment_ids: torch.Tensor) -> int:
    """(query, key) pairs that attend when attention stays inside equal segment ids."""
    return int((torch.bincount(segment_ids) ** 2).sum())


def test_vision_flops_count_the_models_matmuls_and_attention_pairs(single_rank_megatron):
    cfg = get_preset("tiny")
    [model] = build_model_chunks(cfg, ParallelConfig())
    vision = model.vision
    per_patch = 2 * sum(p.numel() for n, p in vision.named_parameters()
                        if p.dim() == 2 and not n.startswith("merger."))
    per_merged_token = 2 * sum(p.numel() for p in vision.merger.parameters() if p.dim() == 2)
    layout = vision_window_layout(torch.tensor(GRIDS), cfg.vision.spatial_merge_size, cfg.vision.window_size,
                                  cfg.vision.patch_size)
    full_blocks = len(cfg.vision.fullatt_block_indexes)
    attention = 2 * 2 * cfg.vision.hidden_size * (
        full_blocks * _pairs(layout.image_segment_ids)
        + (cfg.vision.depth - full_blocks) * _pairs(layout.window_segment_ids)
    )
    patches = sum(t * h * w for t, h, w in GRIDS)
    forward = patches * per_patch + patches // cfg.vision.merge_unit * per_merged_token + attention
    assert vision_training_flops(cfg.vision, cfg.text.hidden_size, GRIDS) == 3 * forward


def test_model_flops_add_the_towers():
    cfg = get_preset("7b")
    rows, seq = 2, 8192
    expected = rows * seq * lm_training_flops_per_token(cfg.text, seq) + vision_training_flops(
        cfg.vision, cfg.text.hidden_size, [(1, 64, 64)])
    assert qwen2_5_vl_training_flops(cfg, rows, seq, [(1, 64, 64)]) == expected
    assert qwen2_5_vl_training_flops(cfg, rows, seq) == rows * seq * lm_training_flops_per_token(cfg.text, seq)


def test_seven_b_vit_per_patch_matmuls_by_hand():
    """The 7B ViT (width 1280, SwiGLU 3420, 32 blocks, 1176-wide patches) on one 8x8-patch image: a single
    window of 64 patches, so every block attends over the same 64 x 64 pairs; 16 merged tokens."""
    cfg = get_preset("7b")
    per_patch = 2 * 1176 * 1280 + 32 * (2 * 1280 * 3840 + 2 * 1280 * 1280 + 2 * 3 * 1280 * 3420)
    attention = 32 * 2 * 2 * 1280 * 64 * 64
    merger = 16 * (2 * 5120 * 5120 + 2 * 5120 * 3584)
    assert vision_training_flops(cfg.vision, 3584, [(1, 8, 8)]) == 3 * (64 * per_patch + attention + merger)
