"""Multimodal SFT data: conversations with images go through preprocessing (the engine's image processor,
the right number of image tokens), the indexed format (exact round trip of patches and grids), packing
(each sample's own 3D M-RoPE positions) and the loader (images cut by seq_length refused before training)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ovr.config import get_preset
from megatron_ovr.data import IndexedDataset, SFTDataLoader, SFTSample, collate, write_indexed
from megatron_ovr.data.chat import tokenize_conversation
from megatron_ovr.data.loader import BlendedDataset
from megatron_ovr.data.synthetic_visual import write_visual_sft
from megatron_ovr.data.tokenizer import load_tokenizer, qwen_tokenizer_dir
from megatron_ovr.models.qwen2_5_vl.positions import get_rope_index
from megatron_ovr.rollout.model_dir import ImageProcessor, write_engine_dir
from tools import preprocess_sft

CFG = get_preset("tiny")
IMAGE_ID, VISION_START, VISION_END = CFG.image_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id
VOCAB, PAD = 151_936, 151_643
PATCH_DIM = 3 * 2 * 14 * 14


def image_sample(rng, grids, text_before=3, text_after=5):
    """Tokens ``text, <vision_start>, image pads, <vision_end>`` per image, then text; random pixels."""
    ids = list(rng.integers(0, 1000, size=text_before))
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE_ID] * (t * h * w // 4) + [VISION_END]
    ids += list(rng.integers(0, 1000, size=text_after))
    ids = np.array(ids, dtype=np.int32)
    grids = np.array(grids, dtype=np.int64)
    pixels = rng.standard_normal((int(np.prod(grids, axis=1).sum()), PATCH_DIM)).astype(np.float32)
    return SFTSample(ids, rng.random(len(ids)) < 0.5, pixels, grids)


def text_sample(rng, n):
    return SFTSample(rng.integers(0, 1000, size=n).astype(np.int32), rng.random(n) < 0.5)


@pytest.fixture
def mixed(tmp_path):
    rng = np.random.default_rng(0)
    samples = [text_sample(rng, 7), image_sample(rng, [(1, 4, 6)]), text_sample(rng, 4),
               image_sample(rng, [(1, 2, 2), (1, 4, 4)], text_before=0), text_sample(rng, 9)]
    prefix = tmp_path / "mixed"
    header = write_indexed(prefix, samples, vocab_size=VOCAB, pad_id=PAD)
    return prefix, samples, header


def test_indexed_round_trip_with_images(mixed):
    prefix, samples, header = mixed
    assert header["version"] == 2 and header["num_images"] == 3 and header["patch_dim"] == PATCH_DIM
    assert header["num_patches"] == 24 + 4 + 16
    ds = IndexedDataset(prefix)
    for i, expected in enumerate(samples):
        got = ds[i]
        np.testing.assert_array_equal(got.token_ids, expected.token_ids)
        np.testing.assert_array_equal(got.loss_mask, expected.loss_mask)
        if expected.image_grid_thw is None:
            assert got.pixel_values is None and got.image_grid_thw is None and ds.image_end[i] == 0
        else:
            np.testing.assert_array_equal(got.pixel_values, expected.pixel_values)
            np.testing.assert_array_equal(got.image_grid_thw, expected.image_grid_thw)
            assert ds.image_end[i] == np.flatnonzero(expected.token_ids == IMAGE_ID)[-1] + 1
            assert isinstance(got.pixel_values.base, np.memmap)


def test_text_rewrite_removes_old_images_and_truncated_pixels_are_named(mixed, tmp_path):
    prefix, samples, header = mixed
    pixels = tmp_path / "mixed.pixels"
    pixels.write_bytes(pixels.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"mixed\.pixels has .* bytes but the index needs .*44 patches"):
        IndexedDataset(prefix)
    write_indexed(prefix, [samples[0]], vocab_size=VOCAB, pad_id=PAD)
    assert not pixels.exists() and not (tmp_path / "mixed.vision.npz").exists()
    assert IndexedDataset(prefix)[0].pixel_values is None


def test_patches_must_match_their_grids(tmp_path):
    rng = np.random.default_rng(1)
    bad = image_sample(rng, [(1, 4, 4)])._replace(pixel_values=np.zeros((15, PATCH_DIM), np.float32))
    with pytest.raises(ValueError, match=r"sample 0: pixel_values \(15, 1176\) do not hold the t\*h\*w patches"):
        write_indexed(tmp_path / "bad", [bad], vocab_size=VOCAB, pad_id=PAD)
    assert not list(tmp_path.iterdir())


def test_collate_gives_each_sample_its_own_rope_positions_and_images_in_order(mixed):
    _, samples, _ = mixed
    rows = [[samples[0], samples[1]], [samples[3], samples[2]]]
    batch = collate(rows, seq_length=64, pad_id=PAD)
    np.testing.assert_array_equal(batch["image_grid_thw"], np.concatenate([samples[1].image_grid_thw,
                                                                          samples[3].image_grid_thw]))
    np.testing.assert_array_equal(batch["pixel_values"], np.concatenate([samples[1].pixel_values,
                                                                        samples[3].pixel_values]))
    for r, row in enumerate(rows):
        cursor = 0
        for sample in row:
            n = len(sample.token_ids)
            grids = None if sample.image_grid_thw is None else torch.from_numpy(sample.image_grid_thw)
            alone, _ = get_rope_index(torch.from_numpy(sample.token_ids.astype(np.int64))[None], grids,
                                      image_token_id=IMAGE_ID, spatial_merge_size=2)
            torch.testing.assert_close(batch["position_ids"][:, r, cursor : cursor + n], alone[:, 0], rtol=0, atol=0)
            cursor += n
    # The image sample's 3D positions really are 3D (not the text rule t = h = w).
    image_positions = batch["position_ids"][:, 0, 7:7 + len(samples[1].token_ids)]
    assert not torch.equal(image_positions[1], image_positions[2])
    assert collate([[samples[0]]], seq_length=16, pad_id=PAD)["pixel_values"] is None


def test_images_cut_by_seq_length_are_refused_before_training(mixed):
    prefix, samples, _ = mixed
    with pytest.raises(ValueError, match=r"holds 4 of the 6 image tokens .*cut through an image"):
        collate([[samples[1]]], seq_length=8, pad_id=PAD)
    with pytest.raises(ValueError, match=r"image placeholder tokens but no images"):
        collate([[samples[1][:2]]], seq_length=64, pad_id=PAD)
    ds = IndexedDataset(prefix)
    loader_args = dict(micro_batch_size=1, num_microbatches=1, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match=r"1 sample\(s\) have images that end past seq_length=9 \(e\.g\. sample 1: its "
                       r"last image token is token 10\)"):
        SFTDataLoader(ds, seq_length=9, **loader_args)
    blend = BlendedDataset([ds, ds], [1, 1], seed=0)
    with pytest.raises(ValueError, match=r"2 sample\(s\) have images that end past seq_length=9"):
        SFTDataLoader(blend, seq_length=9, **loader_args)
    batches = next(iter(SFTDataLoader(blend, seq_length=64, **{**loader_args, "num_microbatches": 3})))
    assert any(mb["pixel_values"] is not None for mb in batches)


@pytest.fixture(scope="module")
def visual_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("visual_sft")
    jsonl = write_visual_sft(root / "data", 6, seed=0)
    model_dir = write_engine_dir(root / "model", CFG, qwen_tokenizer_dir(), min_pixels=56 * 56, max_pixels=112 * 112)
    return jsonl, model_dir


def test_preprocess_with_images_stores_what_the_engine_processor_computes(visual_data, tmp_path, capsys):
    jsonl, model_dir = visual_data
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[2]["images"] = ["images/missing.png"]
    broken = jsonl.parent / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "vis"
    code = preprocess_sft.main(["--input", str(broken), "--tokenizer", str(qwen_tokenizer_dir()),
                                "--processor", str(model_dir), "--output", str(prefix)])
    out = capsys.readouterr().out
    assert code == 0 and "images: 5 (240 patches" in out
    assert "broken.jsonl:3: image not readable" in out and "missing.png" in out
    ds = IndexedDataset(prefix)
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    processor = ImageProcessor(model_dir)
    for i, row in enumerate(rows[:2] + rows[3:]):
        with Image.open(jsonl.parent / row["images"][0]) as image:
            pixels, grids = processor([image.convert("RGB")])
        sample = ds[i]
        np.testing.assert_array_equal(sample.pixel_values, pixels.numpy())
        np.testing.assert_array_equal(sample.image_grid_thw, grids.numpy())
        expected = tokenize_conversation(row["messages"], tokenizer, [int(grids.prod()) // 4])
        np.testing.assert_array_equal(sample.token_ids, expected.token_ids)
        assert np.count_nonzero(sample.token_ids == IMAGE_ID) == 12  # a 112x84 image: 8x6 patches, 2x2 merged
        assert sample.loss_mask.sum() > 0 and not sample.loss_mask[sample.token_ids == IMAGE_ID].any()


def test_preprocess_images_without_a_processor_is_a_clear_error(visual_data, tmp_path, capsys):
    jsonl, _ = visual_data
    code = preprocess_sft.main(["--input", str(jsonl), "--tokenizer", str(qwen_tokenizer_dir()),
                                "--output", str(tmp_path / "vis")])
    assert code == 1
    assert "conversations.jsonl:1 has 1 image(s): pass --processor DIR" in capsys.readouterr().err
