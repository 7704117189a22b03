"""The memory-mapped tokenised format: exact round trip, and clear errors for missing, truncated or
mismatched files."""

import json

import numpy as np
import pytest

from megatron_ovr.data import IndexedDataset, TokenizedSample, write_indexed
from megatron_ovr.data.indexed import VERSION

VOCAB, PAD = 1000, 999


def random_samples(n, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    return [TokenizedSample(token_ids=rng.integers(0, VOCAB, size=k).astype(np.int32),
                            loss_mask=rng.random(k) < 0.5, num_images=0)
            for k in rng.integers(1, max_len, size=n)]


@pytest.fixture
def written(tmp_path):
    samples = random_samples(25)
    prefix = tmp_path / "sub" / "train"
    header = write_indexed(prefix, iter(samples), vocab_size=VOCAB, pad_id=PAD)
    return prefix, samples, header


def test_round_trip(written):
    prefix, samples, header = written
    ds = IndexedDataset(prefix)
    assert len(ds) == 25 and ds.vocab_size == VOCAB and ds.pad_id == PAD
    assert header == ds.header and header["version"] == VERSION
    assert header["num_images"] == 0 and ds[0].pixel_values is None and not ds.image_end.any()
    assert header["num_tokens"] == sum(s.token_ids.size for s in samples)
    assert header["num_loss_tokens"] == sum(int(s.loss_mask.sum()) for s in samples)
    np.testing.assert_array_equal(ds.lengths, [s.token_ids.size for s in samples])
    for i, sample in enumerate(samples):
        tokens, mask = ds[i].token_ids, ds[i].loss_mask
        assert tokens.dtype == np.int32 and mask.dtype == bool
        np.testing.assert_array_equal(tokens, sample.token_ids)
        np.testing.assert_array_equal(mask, sample.loss_mask)
    np.testing.assert_array_equal(ds[-1][0], samples[-1].token_ids)
    assert isinstance(ds[0][0].base, np.memmap)
    with pytest.raises(IndexError):
        ds[25]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["train.bin", "train.idx.json", "train.idx.npy",
                                                              "train.mask"]


@pytest.mark.parametrize("suffix, change", [(".bin", -4), (".mask", -1), (".bin", 4)])
def test_truncated_or_foreign_file(written, suffix, change):
    prefix = written[0]
    path = prefix.parent / f"train{suffix}"
    data = path.read_bytes()
    path.write_bytes(data[:change] if change < 0 else data + bytes(change))
    message = rf"train\{suffix} has .* bytes but the index needs .*truncated or from another write"
    with pytest.raises(ValueError, match=message):
        IndexedDataset(prefix)


def test_version_1_text_datasets_still_load(written):
    prefix, samples, header = written
    old = {k: v for k, v in header.items() if k not in ("num_images", "num_patches", "patch_dim")}
    (prefix.parent / "train.idx.json").write_text(json.dumps({**old, "version": 1}))
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds[3].token_ids, samples[3].token_ids)
    assert ds[3].image_grid_thw is None


def test_inconsistent_offsets(written):
    prefix = written[0]
    offsets = np.load(f"{prefix}.idx.npy")
    np.save(f"{prefix}.idx.npy", offsets[:-1])
    with pytest.raises(ValueError, match="offsets do not describe 25 non-empty samples"):
        IndexedDataset(prefix)


def test_missing_file_and_wrong_version(written):
    prefix = written[0]
    header = json.loads((prefix.parent / "train.idx.json").read_text())
    (prefix.parent / "train.idx.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        IndexedDataset(prefix)
    (prefix.parent / "train.mask").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.mask is missing"):
        IndexedDataset(prefix)


def test_bad_sample_leaves_no_dataset(tmp_path):
    bad = TokenizedSample(np.array([1, VOCAB], dtype=np.int32), np.array([True, True]), 0)
    with pytest.raises(ValueError, match=r"sample 3: token ids must lie in \[0, vocab_size=1000\)"):
        write_indexed(tmp_path / "x", random_samples(3) + [bad], vocab_size=VOCAB, pad_id=PAD)
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset(tmp_path):
    write_indexed(tmp_path / "empty", [], vocab_size=VOCAB, pad_id=PAD)
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.lengths.size == 0
