"""Qwen2.5-VL position bookkeeping checked against the Hugging Face transformers implementation."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.vision_utils import get_vision_cu_seqlens

from megatron_ovr.models.qwen2_5_vl.positions import (
    VisionWindowLayout,
    get_rope_index,
    vision_patch_positions,
    vision_window_layout,
)

MERGE = 2
PATCH = 14
IMAGE = 151655
VISION_START = 151652
VISION_END = 151653
PAD = 151643

GRID_SETS = {
    "square": [(1, 8, 8)],
    "mixed_sizes": [(1, 4, 6), (1, 10, 6), (1, 6, 14)],
    "odd_merged_sides": [(1, 6, 10)],
    "two_frames": [(2, 8, 12)],
    "large_and_video_like": [(1, 36, 52), (2, 16, 16), (3, 6, 14), (1, 2, 2)],
}


def cu_to_segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """HF ``cu_seqlens`` ``[k+1]`` -> one segment id per element ``[cu[-1]]``."""
    lengths = torch.diff(torch.unique_consecutive(cu_seqlens.long()))
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


@pytest.mark.parametrize("grids", GRID_SETS.values(), ids=GRID_SETS.keys())
def test_vision_patch_positions_match_hf(grids):
    grid_thw = torch.tensor(grids)
    ours = vision_patch_positions(grid_thw, MERGE)
    expected = hf.get_vision_position_ids(grid_thw, MERGE)
    assert ours.dtype == torch.long
    assert ours.shape == (int(grid_thw.prod(-1).sum()), 2)
    assert torch.equal(ours, expected)


def test_vision_patch_positions_block_order():
    # One 2x4-patch frame: two 2x2 merge blocks, each listed row-major before moving right.
    ours = vision_patch_positions(torch.tensor([[1, 2, 4]]), MERGE)
    expected = [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert ours.tolist() == expected


@pytest.mark.parametrize("window_size", [56, 112], ids=["window56", "window112"])
@pytest.mark.parametrize("grids", GRID_SETS.values(), ids=GRID_SETS.keys())
def test_vision_window_layout_matches_hf(grids, window_size):
    grid_thw = torch.tensor(grids)
    layout = vision_window_layout(grid_thw, MERGE, window_size, PATCH)
    assert isinstance(layout, VisionWindowLayout)
    hf_index, hf_cu_window = hf.get_vision_window_index(grid_thw, MERGE, window_size, PATCH)
    hf_cu_full = get_vision_cu_seqlens(grid_thw)

    num_patches = int(grid_thw.prod(-1).sum())
    assert layout.window_index.dtype == torch.long
    assert layout.window_segment_ids.shape == (num_patches,)
    assert layout.image_segment_ids.shape == (num_patches,)
    assert torch.equal(layout.window_index, hf_index)
    assert torch.equal(layout.window_segment_ids, cu_to_segment_ids(hf_cu_window))
    assert torch.equal(layout.image_segment_ids, cu_to_segment_ids(hf_cu_full))
    assert torch.equal(layout.reverse_index, torch.argsort(hf_index))


@pytest.mark.parametrize("window_size", [56, 112])
def test_vision_window_layout_geometry(window_size):
    """Independent of HF: every window is one aligned box of a single frame, partial at borders."""
    grid_thw = torch.tensor([(1, 6, 10), (2, 14, 6)])
    layout = vision_window_layout(grid_thw, MERGE, window_size, PATCH)
    side = window_size // MERGE // PATCH * MERGE  # window side in patches
    rows_cols = vision_patch_positions(grid_thw, MERGE)
    merged = rows_cols.view(-1, MERGE * MERGE, 2)[layout.window_index].view(-1, 2)
    seg = layout.window_segment_ids
    assert torch.equal(seg, torch.sort(seg).values)
    assert torch.equal(torch.unique(seg), torch.arange(int(seg.max()) + 1))
    sizes = []
    for window in range(int(seg.max()) + 1):
        sel = seg == window
        assert layout.image_segment_ids[sel].unique().numel() == 1
        boxes = merged[sel] // side
        assert (boxes == boxes[0]).all()
        sizes.append(int(sel.sum()))
    # Window 56 -> 4x4-patch windows: a 6x10 frame has partial windows at the bottom and right.
    if window_size == 56:
        assert sizes[:3] == [16, 16, 8]
    inverse = torch.arange(layout.window_index.numel())[layout.window_index][layout.reverse_index]
    assert torch.equal(inverse, torch.arange(layout.window_index.numel()))


def test_vision_rejects_bad_grids():
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision_patch_positions(torch.tensor([[1, 5, 4]]), MERGE)
    with pytest.raises(ValueError, match="smaller than one merged token"):
        vision_window_layout(torch.tensor([[1, 4, 4]]), MERGE, 14, PATCH)


# --------------------------------------------------------------------------- get_rope_index


@pytest.fixture(scope="module")
def hf_model():
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[0],
        ),
    )
    assert config.vision_config.spatial_merge_size == MERGE
    assert config.image_token_id == IMAGE
    return hf.Qwen2_5_VLModel(config).eval()


def build_row(parts) -> list[int]:
    """``parts``: ints (that many text tokens) or ``(t, h, w)`` grids (vision_start, image tokens, vision_end)."""
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += [1000 + len(ids) + k for k in range(part)]
        else:
            t, h, w = part
            ids += [VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END]
    return ids


def build_batch(rows, padding_side="right"):
    """Pad rows of ``build_row`` parts to one length; return ids, mask, grids in batch order."""
    id_rows = [build_row(parts) for parts in rows]
    seq = max(len(r) for r in id_rows)
    input_ids = torch.full((len(rows), seq), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, r in enumerate(id_rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(seq - len(r), seq)
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    grids = [p for parts in rows for p in parts if not isinstance(p, int)]
    grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
    return input_ids, mask, grid_thw


def hf_rope_index(model, input_ids, grid_thw, mask):
    return model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE).int(),
        image_grid_thw=grid_thw,
        attention_mask=mask,
    )


def assert_rope_matches_hf(model, input_ids, grid_thw, mask):
    ours_pos, ours_delta = get_rope_index(
        input_ids, grid_thw, image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask=mask
    )
    ref_pos, ref_delta = hf_rope_index(model, input_ids, grid_thw, mask)
    assert ours_pos.dtype == torch.long and ours_delta.dtype == torch.long
    assert ours_pos.shape == (3, *input_ids.shape)
    assert ours_delta.shape == (input_ids.shape[0], 1)
    assert torch.equal(ours_pos, ref_pos)
    assert torch.equal(ours_delta, ref_delta)
    return ours_pos, ours_delta


ROPE_CASES = {
    "single_image": ([[3, (1, 8, 8), 5]], "right", True),
    "single_image_no_mask": ([[3, (1, 8, 8), 5]], "right", False),
    "image_first_token": ([[(1, 4, 6), 4]], "right", False),
    "two_images_one_row": ([[2, (1, 4, 6), 3, (1, 10, 6), 4]], "right", False),
    "three_mixed_sizes": ([[1, (1, 4, 6), 2, (1, 10, 6), 1, (1, 6, 14), 2]], "right", True),
    "two_frames": ([[2, (2, 8, 12), 3]], "right", False),
    # t larger than max(h, w)/m: temporal ids run past the next text positions (HF rule).
    "many_frames_small_image": ([[2, (6, 4, 4), 3]], "right", False),
    "text_only": ([[7]], "right", False),
    "text_only_batch_padded": ([[7], [4]], "right", True),
    "batch_right_padding": ([[2, (1, 8, 8), 6], [1, (1, 4, 6), 2, (1, 6, 14), 1]], "right", True),
    "batch_left_padding": ([[2, (1, 8, 8), 6], [1, (1, 4, 6), 2]], "left", True),
    "batch_text_row_between": ([[2, (1, 4, 4), 1], [9], [(1, 6, 10), 2]], "right", True),
}


@pytest.mark.parametrize("rows,padding_side,use_mask", ROPE_CASES.values(), ids=ROPE_CASES.keys())
def test_get_rope_index_matches_hf(hf_model, rows, padding_side, use_mask):
    input_ids, mask, grid_thw = build_batch(rows, padding_side)
    if not use_mask:
        assert bool(mask.all()), "cases without a mask must not be padded"
        mask = None
    assert_rope_matches_hf(hf_model, input_ids, grid_thw, mask)


def test_get_rope_index_random_batches_match_hf(hf_model):
    rng = random.Random(0)
    for _ in range(25):
        rows = []
        for _ in range(rng.randint(1, 3)):
            parts: list = [rng.randint(0, 4)]  # may be 0: row starts with an image
            for _ in range(rng.randint(0, 3)):
                grid = (rng.choice([1, 1, 2, 3]), 2 * rng.randint(1, 7), 2 * rng.randint(1, 7))
                parts += [grid, rng.randint(1, 4)]
            parts = [p for p in parts if p != 0]
            rows.append(parts or [rng.randint(1, 4)])  # HF cannot handle a row without real tokens
        input_ids, mask, grid_thw = build_batch(rows, rng.choice(["left", "right"]))
        assert_rope_matches_hf(hf_model, input_ids, grid_thw, mask)


def test_get_rope_index_rows_ending_in_image_match_hf(hf_model):
    # The last image's h/w ids, not a text token, hold the row maximum that sets rope_deltas.
    row0 = [VISION_START] + [IMAGE] * 12  # (1, 4, 12): 2x6 merged tokens, width dominates
    row1 = [5, 6, VISION_START] + [IMAGE] * 6 + [VISION_START] + [IMAGE] * 12  # (1, 6, 4), (3, 4, 4)
    input_ids = torch.full((2, len(row1)), PAD)
    mask = torch.zeros_like(input_ids)
    input_ids[0, : len(row0)], mask[0, : len(row0)] = torch.tensor(row0), 1
    input_ids[1], mask[1] = torch.tensor(row1), 1
    grid_thw = torch.tensor([[1, 4, 12], [1, 6, 4], [3, 4, 4]])
    _, delta = assert_rope_matches_hf(hf_model, input_ids, grid_thw, mask)
    # Row 0 peaks at w = 1 + 5; row 1 at t = 7 + 2 (third frame of the last image).
    assert delta.tolist() == [[6 + 1 - len(row0)], [9 + 1 - len(row1)]]


def test_get_rope_index_hand_computed_with_padding():
    # text, image (1, 4, 6) -> 2x3 merged tokens, text, pad.
    input_ids = torch.tensor([[5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 6, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    pos, delta = get_rope_index(
        input_ids, torch.tensor([[1, 4, 6]]), image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask=mask
    )
    assert pos[0, 0].tolist() == [0, 1, 1, 1, 1, 1, 1, 4, 0]
    assert pos[1, 0].tolist() == [0, 1, 1, 1, 2, 2, 2, 4, 0]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 0]
    assert delta.tolist() == [[4 + 1 - 8]]


def test_get_rope_index_splits_adjacent_images():
    # HF groups adjacent image tokens into one run and cannot express this; we split by grid size.
    input_ids = torch.tensor([[7, IMAGE, IMAGE, IMAGE, 8]])
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 1 token, then 1x2 tokens
    pos, delta = get_rope_index(input_ids, grids, image_token_id=IMAGE, spatial_merge_size=MERGE)
    assert pos[:, 0].T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [4, 4, 4]]
    assert delta.tolist() == [[0]]


def test_get_rope_index_wrong_token_count_names_row_and_counts():
    input_ids, mask, grid_thw = build_batch([[2, (1, 4, 6), 1], [1, (1, 8, 8), 2]])
    # Drop one of row 1's 16 image tokens.
    row1_image = (input_ids[1] == IMAGE).nonzero().flatten()
    input_ids[1, row1_image[-1]] = 4242
    with pytest.raises(ValueError, match=r"row 1: image 1 .*expects 16 .*found 15"):
        get_rope_index(input_ids, grid_thw, image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask=mask)


def test_get_rope_index_too_many_image_tokens():
    input_ids, mask, _ = build_batch([[2, (1, 4, 6), 1, (1, 4, 4), 1]])
    with pytest.raises(ValueError, match=r"row 0: .*no image_grid_thw entry left"):
        get_rope_index(
            input_ids, torch.tensor([[1, 4, 6]]), image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask=mask
        )
    with pytest.raises(ValueError, match=r"row 0: .*no image_grid_thw entry left"):
        get_rope_index(input_ids, None, image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask=mask)


def test_get_rope_index_unused_grids():
    input_ids, mask, _ = build_batch([[2, (1, 4, 6), 1]])
    grids = torch.tensor([[1, 4, 6], [1, 4, 4]])
    with pytest.raises(ValueError, match=r"2 entries but input_ids hold image tokens for 1 images"):
        get_rope_index(input_ids, grids, image_token_id=IMAGE, spatial_merge_size=MERGE, attention_mask=mask)


def test_get_rope_index_run_straddling_text_is_rejected():
    # 4 + 4 image tokens split 3 | 5 by text: totals match the grids but an image would cross text.
    input_ids = torch.tensor([[1] + [IMAGE] * 3 + [2] + [IMAGE] * 5])
    grids = torch.tensor([[1, 4, 4], [1, 4, 4]])
    with pytest.raises(ValueError, match=r"row 0: image 0 .*expects 4 .*found 3"):
        get_rope_index(input_ids, grids, image_token_id=IMAGE, spatial_merge_size=MERGE)
