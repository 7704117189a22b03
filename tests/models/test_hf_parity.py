"""Our megatron-core Qwen2.5-VL gives the logits of HF ``Qwen2_5_VLForConditionalGeneration`` with the same
random weights (fp32, one process), over the input shapes and model shapes that exercise every path."""

import dataclasses

import pytest
import torch

from megatron_ovr.config import ParallelConfig, get_preset
from megatron_ovr.mapping import load_hf_weights
from megatron_ovr.models.qwen2_5_vl import reference
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks

ATOL = 1e-4


def tiny_with(**changes):
    """The tiny preset with vision/text fields replaced (``vision_x=...`` / ``text_x=...``)."""
    cfg = get_preset("tiny")
    vision = {k[len("vision_"):]: v for k, v in changes.items() if k.startswith("vision_")}
    text = {k[len("text_"):]: v for k, v in changes.items() if k.startswith("text_")}
    return dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, **vision), text=dataclasses.replace(cfg.text, **text)
    )


def build_pair(cfg, seed=0):
    hf = reference.build_hf_model(cfg, seed=seed)
    [ours] = build_model_chunks(cfg, ParallelConfig())
    load_hf_weights([ours], cfg, reference.hf_state_dict(hf).__getitem__)
    return hf, ours.eval()


def max_logit_diff(hf, ours, cfg, rows, pad_to=None):
    batch = reference.sample_batch(cfg, rows, pad_to=pad_to, seed=3)
    with torch.no_grad():
        logits = ours(batch.input_ids, batch.position_ids, batch.segment_ids, batch.pixel_values, batch.image_grid_thw)
    expected = reference.hf_logits(hf, batch)
    valid = batch.attention_mask.bool()
    assert expected.abs().max() > 0.1, "reference logits are degenerate"
    return (logits[valid] - expected[valid]).abs().max().item()


# (name, batch rows): an int is that many text tokens, a tuple an image's (t, h, w) patch grid.
INPUTS = [
    ("text_only", [[23]]),
    ("one_image", [[5, (1, 8, 8), 7]]),
    ("images_of_different_sizes", [[3, (1, 4, 6), 4, (1, 10, 6), 2, (1, 6, 14), 3]]),
    ("batch_with_padding", [[9, (1, 6, 10), 3], [4], [2, (1, 4, 4), 11]]),
    ("partial_windows", [[2, (1, 10, 14), 2]]),  # 5x7 merged tokens in 2x2 windows
    ("image_first_no_text", [[(1, 4, 8)]]),
]


@pytest.fixture(scope="module")
def tiny_pair(single_rank_megatron):
    cfg = get_preset("tiny")
    return (cfg, *build_pair(cfg))


@pytest.mark.parametrize("name,rows", INPUTS, ids=[i[0] for i in INPUTS])
def test_logits_match_hf(tiny_pair, name, rows):
    cfg, hf, ours = tiny_pair
    assert max_logit_diff(hf, ours, cfg, rows) <= ATOL


# Model shapes beyond the preset: head_dim 16, more KV groups, the real 112-px window (partial windows on
# most grids), windows larger than the image, full attention in the first block only.
SHAPES = [
    ("head_dim_16", dict(text_hidden_size=64, text_num_attention_heads=4, text_num_key_value_heads=2,
                         text_mrope_section=(2, 3, 3), vision_hidden_size=32, vision_num_heads=2,
                         vision_out_hidden_size=64)),
    ("more_kv_groups", dict(text_num_attention_heads=8, text_num_key_value_heads=4, text_mrope_section=(2, 3, 3))),
    ("window_112", dict(vision_window_size=112, vision_depth=3, vision_fullatt_block_indexes=(2,))),
    ("window_larger_than_images", dict(vision_window_size=280, vision_fullatt_block_indexes=(0,))),
]


@pytest.mark.parametrize("name,changes", SHAPES, ids=[s[0] for s in SHAPES])
def test_odd_shapes_match_hf(single_rank_megatron, name, changes):
    cfg = tiny_with(**changes)
    hf, ours = build_pair(cfg, seed=5)
    rows = [[4, (1, 10, 14), 3, (1, 6, 4), 2], [7, (1, 12, 8)]]
    assert max_logit_diff(hf, ours, cfg, rows) <= ATOL


def test_image_token_count_mismatch_is_a_clear_error(tiny_pair):
    cfg, _, ours = tiny_pair
    batch = reference.sample_batch(cfg, [[3, (1, 8, 8), 3]])
    input_ids = batch.input_ids.clone()
    input_ids[0, 5] = 17  # one image slot fewer than the grid needs
    with pytest.raises(ValueError, match=r"15 <\|image_pad\|> tokens .* 16 embeddings"):
        ours(input_ids, batch.position_ids, batch.segment_ids, batch.pixel_values, batch.image_grid_thw)


def test_pixel_values_must_match_grid(tiny_pair):
    cfg, _, ours = tiny_pair
    batch = reference.sample_batch(cfg, [[3, (1, 8, 8), 3]])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        ours(batch.input_ids, batch.position_ids, batch.segment_ids, batch.pixel_values[:-4], batch.image_grid_thw)


def test_image_tokens_without_pixels_is_a_clear_error(tiny_pair):
    cfg, _, ours = tiny_pair
    batch = reference.sample_batch(cfg, [[3, (1, 8, 8), 3]])
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(batch.input_ids, batch.position_ids, batch.segment_ids)


def test_packed_samples_equal_separate_samples(tiny_pair):
    """Two samples packed in one row with segment ids and restarted positions give each sample's own
    logits: no attention crosses the boundary (the SFT packing contract)."""
    cfg, _, ours = tiny_pair
    first = reference.sample_batch(cfg, [[6, (1, 4, 6), 5]], seed=1)
    second = reference.sample_batch(cfg, [[9, (1, 8, 4), 2]], seed=2)
    with torch.no_grad():
        alone = [ours(b.input_ids, b.position_ids, None, b.pixel_values, b.image_grid_thw) for b in (first, second)]
        n1 = first.input_ids.shape[1]
        packed = ours(
            torch.cat([first.input_ids, second.input_ids], 1),
            torch.cat([first.position_ids, second.position_ids], 2),
            torch.cat([torch.ones_like(first.input_ids), 2 * torch.ones_like(second.input_ids)], 1),
            torch.cat([first.pixel_values, second.pixel_values]),
            torch.cat([first.image_grid_thw, second.image_grid_thw]),
        )
    torch.testing.assert_close(packed[:, :n1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, n1:], alone[1], atol=1e-5, rtol=1e-5)
