"""The SFT loader: a resumed loader continues at exactly the next row, DP ranks split each global batch,
epochs run on into each other without dropping rows; blending proportions and determinism."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_ovr.data import BlendedDataset, IndexedDataset, SFTDataLoader, TokenizedSample, write_indexed
from megatron_ovr.data.packing import plan_packed_rows, plan_unpacked_rows

VOCAB, PAD = 100_000, 0


def make_dataset(path, lengths, first_id=1):
    """Sample i holds only the token ``first_id + i``, so every token names its sample."""
    samples = [TokenizedSample(np.full(k, first_id + i, dtype=np.int32), np.arange(k) % 2 == 1, 0)
               for i, k in enumerate(lengths)]
    write_indexed(path, samples, vocab_size=VOCAB, pad_id=PAD)
    return IndexedDataset(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loader") / "ds", np.random.default_rng(0).integers(1, 60, size=40))


def loader(dataset, dp_rank, **overrides):
    kwargs = dict(seq_length=64, micro_batch_size=2, num_microbatches=2, dp_rank=dp_rank, dp_size=2, seed=3)
    return SFTDataLoader(dataset, **{**kwargs, **overrides})


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for global_a, global_b in zip(a, b):
        assert len(global_a) == len(global_b) == 2
        for micro_a, micro_b in zip(global_a, global_b):
            assert micro_a.keys() == micro_b.keys()
            for key in micro_a:
                torch.testing.assert_close(micro_a[key], micro_b[key], rtol=0, atol=0)


@pytest.mark.parametrize("dp_rank", [0, 1])
@pytest.mark.parametrize("packed", [True, False])
def test_resume_continues_at_the_next_row(dataset, dp_rank, packed):
    uninterrupted = loader(dataset, dp_rank, packed=packed)
    reference = take(uninterrupted, 12)
    assert uninterrupted.state_dict()["epoch"] >= 2  # the resumed stretch crosses epoch boundaries
    for k in (3, 5):
        first = loader(dataset, dp_rank, packed=packed)
        assert_same_batches(take(first, k), reference[:k])
        resumed = loader(dataset, dp_rank, packed=packed)
        resumed.load_state_dict(first.state_dict())
        assert_same_batches(take(resumed, 12 - k), reference[k:])


def sample_ids(micro_batches):
    """The sample ids in each row (the token at every sample start), rows in order."""
    ids = []
    for micro in micro_batches:
        for r in range(micro["tokens"].shape[0]):
            starts = micro["position_ids"][0, r] == 0
            ids.append(micro["tokens"][r, starts & (micro["segment_ids"][r] > 0)].tolist())
    return ids


def test_dp_shares_and_epoch_boundary_lose_no_row(dataset):
    lengths = dataset.lengths[:10]
    small = make_dataset(dataset.prefix + "_small", lengths)
    settings = dict(micro_batch_size=1, packed=False)
    ranks = [take(loader(small, r, **settings), 3) for r in (0, 1)]
    order = [row[0] - 1 for batch in range(3) for r in (0, 1) for row in sample_ids(ranks[r][batch])]
    # 3 global batches of 4 rows: epoch 0's 10 rows, then epoch 1's first 2, each rank its contiguous share.
    epoch0 = np.concatenate(plan_unpacked_rows(lengths, 64, seed=3, epoch=0)).tolist()
    epoch1 = np.concatenate(plan_unpacked_rows(lengths, 64, seed=3, epoch=1)).tolist()
    assert order == epoch0 + epoch1[:2]
    assert sorted(epoch0) == list(range(10))


def test_packed_rows_cover_the_epoch(dataset):
    ranks = [loader(dataset, r) for r in (0, 1)]
    iterators = [iter(l) for l in ranks]
    seen = Counter()
    while ranks[0].state_dict()["epoch"] == 0:
        for it in iterators:
            seen.update(i for row in sample_ids(next(it)) for i in row)
    state = ranks[0].state_dict()
    assert ranks[1].state_dict() == state and state["epoch"] == 1
    # All of epoch 0 once, plus the rows of epoch 1 that completed the last global batch.
    spill = plan_packed_rows(dataset.lengths, 64, seed=3, epoch=1)[: state["rows_consumed"]]
    expected = Counter(range(1, len(dataset) + 1)) + Counter(int(i) + 1 for row in spill for i in row)
    assert seen == expected


def test_invalid_arguments_and_state(dataset):
    with pytest.raises(ValueError, match="dp_rank=2"):
        loader(dataset, 2)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        loader(dataset, 0, micro_batch_size=0)
    with pytest.raises(ValueError, match="rows_consumed"):
        loader(dataset, 0).load_state_dict({"epoch": 0, "rows_consumed": 10_000})


def blended_parts(tmp_path, pads=(PAD, PAD, PAD)):
    parts = []
    for d, (n, pad) in enumerate(zip((50, 20, 5), pads)):
        lengths = np.random.default_rng(d).integers(1, 30, size=n)
        samples = [TokenizedSample(np.full(k, 1000 * (d + 1) + i, dtype=np.int32), np.ones(k, bool), 0)
                   for i, k in enumerate(lengths)]
        write_indexed(tmp_path / f"part{d}", samples, vocab_size=VOCAB, pad_id=pad)
        parts.append(IndexedDataset(tmp_path / f"part{d}"))
    return parts


def test_blending_proportions_and_determinism(tmp_path):
    parts = blended_parts(tmp_path)
    weights = np.array([0.6, 0.3, 0.1])
    blend = BlendedDataset(parts, [6, 3, 1], seed=0, size=1000)
    assert len(blend) == 1000
    counts = np.stack([np.cumsum(blend.dataset_index == d) for d in range(3)], axis=1)
    ideal = np.arange(1, 1001)[:, None] * weights
    assert np.abs(counts - ideal).max() <= 1  # every prefix, not just the whole
    for d, part in enumerate(parts):
        ids = [int(blend[i][0][0]) - 1000 * (d + 1) for i in np.flatnonzero(blend.dataset_index == d)]
        for start in range(0, len(ids) - len(part) + 1, len(part)):  # each pass over a part is a permutation
            assert sorted(ids[start : start + len(part)]) == list(range(len(part)))
        np.testing.assert_array_equal(blend.lengths[blend.dataset_index == d], part.lengths[np.array(ids)])
    again = BlendedDataset(parts, [6, 3, 1], seed=0, size=1000)
    np.testing.assert_array_equal(again.sample_index, blend.sample_index)
    assert not np.array_equal(BlendedDataset(parts, [6, 3, 1], seed=1, size=1000).sample_index, blend.sample_index)
    batches = take(SFTDataLoader(blend, seq_length=64, micro_batch_size=2, num_microbatches=1, dp_rank=0,
                                 dp_size=1, seed=0), 2)
    assert batches[0][0]["tokens"].shape == (2, 64)


def test_blending_rejects_mismatched_datasets(tmp_path):
    parts = blended_parts(tmp_path, pads=(PAD, PAD, 7))
    with pytest.raises(ValueError, match="disagree on pad_id"):
        BlendedDataset(parts, [1, 1, 1], seed=0)
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset(parts[:2], [1], seed=0)
    with pytest.raises(ValueError, match="positive"):
        BlendedDataset(parts[:2], [1, 0], seed=0)
