"""Rollout packing and the per-token quantities of the PPO batch: layout round trips, alignment of response
tokens with the positions that score them, and the log-prob / entropy of sampled tokens."""

import pytest
import torch

from megatron_ovr.config import get_preset
from megatron_ovr.rl.experience import Sample, pack_samples, split_into_minibatches, token_log_probs_and_entropy

CFG = get_preset("tiny")
PAD = CFG.bos_token_id


def text_samples():
    return [Sample(list(range(10, 15)), [1, 2, 3]), Sample([20, 21], [4]), Sample(list(range(30, 36)), [5, 6, 7, 8])]


def test_packing_places_whole_samples_and_keeps_them_apart():
    packed = pack_samples(text_samples(), row_length=12, cfg=CFG, pad_id=PAD)
    # 8 + 3 tokens share a row; the 10-token sample needs its own.
    assert len(packed.microbatches) == 2
    first = packed.microbatches[0]
    assert first["tokens"][0].tolist() == [10, 11, 12, 13, 14, 1, 2, 3, 20, 21, 4, PAD]
    assert first["segment_ids"][0].tolist() == [1] * 8 + [2] * 3 + [0]
    # Positions restart per sample; labels never cross into the next sample.
    assert first["position_ids"][0, 0].tolist() == list(range(8)) + list(range(3)) + [0]
    assert first["labels"][0, 7].item() == PAD and first["labels"][0, 6].item() == 3
    # The model's output at position i scores token i + 1: the action mask starts one before the response.
    assert first["action_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0]


def test_per_token_values_round_trip_between_rows_and_samples():
    packed = pack_samples(text_samples(), row_length=12, cfg=CFG, pad_id=PAD)
    mask = packed.response_mask()
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    values = torch.arange(12.0).reshape(3, 4) * mask
    rows = packed.to_rows(values)
    assert torch.equal(packed.to_samples(rows), values)
    # Each row holds the values exactly at its action positions.
    for row, mb in zip(rows, packed.microbatches):
        assert torch.equal(row != 0, (mb["action_mask"] != 0) & (row != 0))
    # Response token j of a sample is labelled at the position that carries its value.
    for i, (sample, where) in enumerate(zip(packed.samples, packed.placements)):
        mb = packed.microbatches[where.row]
        start = where.offset + len(sample.prompt_ids) - 1
        assert mb["labels"][0, start:start + len(sample.response_ids)].tolist() == sample.response_ids


def test_images_travel_with_their_samples_and_get_3d_positions():
    grid = torch.tensor([[1, 4, 4]])  # 16 patches -> 4 image tokens
    image_prompt = [CFG.vision_start_token_id] + [CFG.image_token_id] * 4 + [CFG.vision_end_token_id, 7]
    samples = [Sample([5, 6], [1]), Sample(image_prompt, [2, 3], torch.randn(16, CFG.vision.patch_dim), grid)]
    packed = pack_samples(samples, row_length=16, cfg=CFG, pad_id=PAD)
    (mb,) = packed.microbatches
    assert torch.equal(mb["image_grid_thw"], grid) and mb["pixel_values"].shape == (16, CFG.vision.patch_dim)
    image_rows = mb["position_ids"][1, 0, 4:8].tolist()  # height positions of the 2x2 merged image tokens
    assert image_rows == [1, 1, 2, 2]


def test_oversized_samples_and_bad_splits_are_refused():
    with pytest.raises(ValueError, match="longer than the micro-batch budget of 6 tokens"):
        pack_samples(text_samples(), row_length=6, cfg=CFG, pad_id=PAD)
    assert split_into_minibatches(5, 2) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="cannot split 2 samples into 3"):
        split_into_minibatches(2, 3)


def test_log_probs_and_entropy_of_sampled_tokens(single_rank_megatron):
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 5))
    log_probs, entropy = token_log_probs_and_entropy(logits.clone(), labels)
    reference = torch.log_softmax(logits, -1)
    assert torch.allclose(log_probs.double(), reference.gather(-1, labels[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(entropy.double(), -(reference.exp() * reference).sum(-1), atol=1e-5)
