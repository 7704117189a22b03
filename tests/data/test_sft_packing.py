"""Packing plans (capacity, coverage, determinism, first-fit against a plain loop) and ``collate`` (a
hand-made example, positions as ``get_rope_index``, packed == unpacked in content)."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_ovr.data import collate, plan_packed_rows, plan_unpacked_rows
from megatron_ovr.data.packing import first_fit
from megatron_ovr.models.qwen2_5_vl.positions import get_rope_index

PAD = 99


def random_lengths(n, seed=0, high=300):
    return np.random.default_rng(seed).integers(1, high, size=n)


def naive_first_fit(sizes, capacity):
    bins, free = [], []
    for position, size in enumerate(sizes):
        for b, room in enumerate(free):
            if room >= size:
                bins[b].append(position)
                free[b] -= size
                break
        else:
            bins.append([position])
            free.append(capacity - size)
    return bins


@pytest.mark.parametrize("n, capacity, seed", [(1, 10, 0), (7, 10, 1), (300, 256, 2), (513, 100, 3)])
def test_first_fit_equals_a_plain_loop(n, capacity, seed):
    sizes = np.random.default_rng(seed).integers(1, capacity + 1, size=n).tolist()
    assert first_fit(sizes, capacity) == naive_first_fit(sizes, capacity)


def test_packed_plan_fits_covers_and_is_deterministic(caplog):
    lengths, seq = random_lengths(400), 256
    with caplog.at_level(logging.WARNING, logger="megatron_ovr.data.packing"):
        rows = plan_packed_rows(lengths, seq, seed=7, epoch=0)
    too_long = int((lengths > seq).sum())
    assert too_long > 0 and f"{too_long} of 400 samples are longer than seq_length=256" in caplog.text
    assert all(np.minimum(lengths[row], seq).sum() <= seq for row in rows)
    assert sorted(np.concatenate(rows).tolist()) == list(range(400))
    assert len(rows) < 0.8 * 400  # it does pack
    same = plan_packed_rows(lengths, seq, seed=7, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(rows, same)) and len(rows) == len(same)
    other = plan_packed_rows(lengths, seq, seed=7, epoch=1)
    assert [r.tolist() for r in other] != [r.tolist() for r in rows]
    assert [r.tolist() for r in plan_packed_rows(lengths, seq, seed=8, epoch=0)] != [r.tolist() for r in rows]


def test_unpacked_plan_is_the_shuffled_order():
    lengths = random_lengths(50)
    rows = plan_unpacked_rows(lengths, 64, seed=1, epoch=2)
    assert all(len(r) == 1 for r in rows)
    assert sorted(np.concatenate(rows).tolist()) == list(range(50))
    assert np.concatenate(rows).tolist() != list(range(50))


def test_plan_rejects_bad_lengths():
    with pytest.raises(ValueError, match="positive lengths"):
        plan_packed_rows(np.array([3, 0]), 8, seed=0, epoch=0)


def sample(tokens, mask):
    return np.array(tokens, dtype=np.int32), np.array(mask, dtype=bool)


def test_collate_hand_made_example():
    a = sample([10, 11, 12], [0, 1, 1])
    b = sample([20, 21], [0, 1])
    c = sample(range(30, 40), [0, 0, 0, 1, 1, 1, 1, 1, 1, 1])  # longer than the row: cut to 8
    batch = collate([[a, b], [c]], seq_length=8, pad_id=PAD)
    expected = {
        "tokens": [[10, 11, 12, 20, 21, PAD, PAD, PAD], list(range(30, 38))],
        "labels": [[11, 12, PAD, 21, PAD, PAD, PAD, PAD], list(range(31, 38)) + [PAD]],
        "loss_mask": [[1, 1, 0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]],
        "segment_ids": [[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8],
    }
    for key, value in expected.items():
        assert batch[key].tolist() == value, key
    positions = [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))]
    assert batch["position_ids"].tolist() == [positions] * 3
    assert {k: v.dtype for k, v in batch.items() if v is not None} == {
        "tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32, "segment_ids": torch.int64,
        "position_ids": torch.int64}
    assert batch["pixel_values"] is None and batch["image_grid_thw"] is None
    assert batch["position_ids"].shape == (3, 2, 8)


def test_text_positions_are_get_rope_index_per_sample():
    samples = [sample(np.arange(5) + 100, [1] * 5), sample(np.arange(7) + 200, [1] * 7)]
    batch = collate([samples], seq_length=16, pad_id=PAD)
    for segment, (tokens, _) in enumerate(samples, start=1):
        in_sample = batch["segment_ids"][0] == segment
        rope, _ = get_rope_index(torch.from_numpy(tokens.astype(np.int64))[None], None,
                                 image_token_id=151655, spatial_merge_size=2)
        torch.testing.assert_close(batch["position_ids"][:, 0, in_sample], rope[:, 0])


def sample_triples(batch):
    """Each sample's (token, label, loss) triples, as a multiset over the batch."""
    found = Counter()
    for r in range(batch["tokens"].shape[0]):
        for segment in batch["segment_ids"][r].unique().tolist():
            if segment:
                keep = batch["segment_ids"][r] == segment
                found[tuple(zip(*(batch[k][r, keep].tolist() for k in ("tokens", "labels", "loss_mask"))))] += 1
    return found


def test_packed_and_unpacked_hold_the_same_triples():
    rng = np.random.default_rng(0)
    lengths, seq = random_lengths(60, high=80), 64
    data = [sample(rng.integers(0, 1000, size=k), rng.random(k) < 0.5) for k in lengths]
    packed = collate([[data[i] for i in row] for row in plan_packed_rows(lengths, seq, 0, 0)], seq, PAD)
    unpacked = collate([[data[i] for i in row] for row in plan_unpacked_rows(lengths, seq, 0, 0)], seq, PAD)
    assert packed["tokens"].shape[0] < unpacked["tokens"].shape[0] == 60
    assert sample_triples(packed) == sample_triples(unpacked)
    assert sum(sample_triples(packed).values()) == 60


def test_collate_errors():
    with pytest.raises(ValueError, match="row 0: its samples hold more than seq_length=4"):
        collate([[sample([1, 2, 3], [1, 1, 1]), sample([4, 5], [1, 1])]], seq_length=4, pad_id=PAD)
    with pytest.raises(ValueError, match="row 0, sample 1: 1 image placeholder tokens but no images"):
        collate([[sample([1, 151652, 151655, 151653], [0, 0, 0, 0])]], seq_length=8, pad_id=PAD)
    with pytest.raises(ValueError, match="video placeholder tokens found"):
        collate([[sample([1, 151652, 151656, 151653], [0, 0, 0, 0])]], seq_length=8, pad_id=PAD)
