"""Synthetic RL prompts: deterministic, answers correct by construction (checked from the pixels), read by
``load_benchmark``, train and eval disjoint; the tiny checkpoint directory is loadable as a served model."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from megatron_ovr.data.synthetic_visual import (
    generate_text_questions,
    generate_visual_questions,
    write_rl_prompts,
    write_visual_sft,
)
from megatron_ovr.data.sources import ConversationReader
from megatron_ovr.eval.benchmarks import load_benchmark
from tools.make_synthetic_data import main as make_synthetic_data_main

WIDTH, HEIGHT = 112, 84
EXPRESSION = re.compile(r"(?:What is |Compute |Calculate )(.+?)(?:\?| step by step\.|\.)")


def pixels(tmp_path, record) -> np.ndarray:
    (image,) = record["images"]
    return np.asarray(Image.open(tmp_path / image).convert("RGB")).astype(int)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (row, column) points."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, points = [start], []
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(points))
    return found


def test_deterministic_and_seeded(tmp_path):
    first = generate_visual_questions(12, seed=3, image_dir=tmp_path / "a" / "images")
    again = generate_visual_questions(12, seed=3, image_dir=tmp_path / "b" / "images")
    other = generate_visual_questions(12, seed=4, image_dir=tmp_path / "c" / "images")
    assert first == again != other
    for record in first:
        (image,) = record["images"]
        assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert generate_visual_questions(6, seed=3, image_dir=tmp_path / "d" / "images") == first[:6]
    assert generate_text_questions(30, seed=3) == generate_text_questions(30, seed=3) != generate_text_questions(30, 4)


def test_counting_answers_are_the_red_squares(tmp_path):
    records = generate_visual_questions(40, seed=0, image_dir=tmp_path / "images", kinds=("count",))
    for record in records:
        image = pixels(tmp_path, record)
        red = (image[..., 0] > 180) & (image[..., 1] < 60) & (image[..., 2] < 60)
        squares = components(red)
        assert record["answer"] == str(len(squares)), record["id"]
        for points in squares:  # a solid square, not two touching ones
            height, width = np.ptp(points, axis=0) + 1
            assert height == width and len(points) == height * width, record["id"]
    assert Counter(r["answer"] for r in records).keys() == {"1", "2", "3", "4"}


def ink_crop(image: np.ndarray) -> np.ndarray:
    rows, columns = np.nonzero((image < 255).any(axis=-1))
    return image[rows.min(): rows.max() + 1, columns.min(): columns.max() + 1]


def test_digit_answers_match_a_fresh_rendering(tmp_path):
    # Every digit at every plausible size, drawn here from scratch: the image must match exactly one of
    # them, the answer's.
    renderings = {}
    for size in range(32, 73):
        font = ImageFont.load_default(size=size)
        for digit in "0123456789":
            canvas = Image.new("RGB", (2 * size, 2 * size), "white")
            ImageDraw.Draw(canvas).text((size // 2, size // 2), digit, font=font, fill="black")
            renderings[digit, size] = ink_crop(np.asarray(canvas).astype(int))
    records = generate_visual_questions(40, seed=0, image_dir=tmp_path / "images", kinds=("digit",))
    for record in records:
        image = pixels(tmp_path, record)
        assert (image[[0, -1]] == 255).all() and (image[:, [0, -1]] == 255).all(), "the digit touches the border"
        crop = ink_crop(image)
        matches = {digit for (digit, _), drawn in renderings.items()
                   if drawn.shape == crop.shape and (drawn == crop).all()}
        assert matches == {record["answer"]}, record["id"]
    assert {r["answer"] for r in records} == set("0123456789")


def test_bars_answer_is_the_taller_bar(tmp_path):
    records = generate_visual_questions(30, seed=0, image_dir=tmp_path / "images", kinds=("bars",))
    for record in records:
        assert record["choices"] == ["the left bar", "the right bar"]
        image = pixels(tmp_path, record)
        bars = components((image < 255).any(axis=-1))
        assert len(bars) == 2
        left, right = sorted(bars, key=lambda points: points[:, 1].min())
        assert left[:, 1].max() < WIDTH // 2 <= right[:, 1].min()
        assert left[:, 0].max() == right[:, 0].max()  # one baseline
        left_height, right_height = (np.ptp(bar[:, 0]) + 1 for bar in (left, right))
        assert abs(left_height - right_height) >= 10
        assert record["answer"] == ("A" if left_height > right_height else "B"), record["id"]
    assert Counter(r["answer"] for r in records).keys() == {"A", "B"}


def test_load_benchmark_reads_the_written_prompts(tmp_path):
    path = write_rl_prompts(tmp_path / "train", n_visual=9, n_text=3, seed=0)
    assert path == tmp_path / "train" / "prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert Counter(row["kind"] for row in rows) == {"count": 3, "digit": 3, "bars": 3, "arithmetic": 3}
    assert all(image.startswith("images/") for row in rows for image in row.get("images", []))
    items = load_benchmark(path)
    assert [item.id for item in items] == [row["id"] for row in rows]
    for item, row in zip(items, rows):
        assert (item.question, item.answer) == (row["question"], row["answer"])
        if row["kind"] == "arithmetic":
            assert item.images == () and item.choices is None
        else:
            (image,) = item.load_images()
            assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
            assert item.choices == (("the left bar", "the right bar") if row["kind"] == "bars" else None)


def test_train_and_eval_share_no_item(tmp_path):
    # The arithmetic space is small (~1,000 expressions): without the held-out split these would overlap.
    def expression(record: dict) -> str:
        return EXPRESSION.fullmatch(record["question"]).group(1)

    train = {expression(r) for seed in (0, 1) for r in generate_text_questions(300, seed)}
    held_out = {expression(r) for seed in (0, 1) for r in generate_text_questions(100, seed, split="eval")}
    assert train.isdisjoint(held_out) and len(held_out) > 30
    images = {}
    for split in ("train", "eval"):
        records = generate_visual_questions(30, seed=0, image_dir=tmp_path / split, split=split)
        assert all(r["id"].startswith(f"{split}-") for r in records)
        images[split] = {(tmp_path / split / r["id"]).with_suffix(".png").read_bytes() for r in records}
    assert images["train"].isdisjoint(images["eval"])


@pytest.mark.parametrize("call, message", [
    (lambda d: generate_visual_questions(-1, 0, d), "n=-1"),
    (lambda d: generate_visual_questions(3, 0, d, split="test"), "split='test'"),
    (lambda d: generate_visual_questions(3, 0, d, kinds=("count", "shapes")), "kinds=.*'digit'"),
    (lambda d: generate_visual_questions(3, 0, d, kinds=("count", "count")), "distinct"),
    (lambda d: generate_visual_questions(3, 0, d, image_size=(56, 56)), r"image_size=\(56, 56\)"),
    (lambda d: generate_text_questions(-2, 0), "n=-2"),
    (lambda d: generate_text_questions(2, 0, kind="geometry"), "kind='geometry'"),
])
def test_bad_arguments(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


def test_cli_writes_sft_and_both_splits(tmp_path, capsys):
    make_synthetic_data_main(["--out", str(tmp_path), "--sft", "5", "--train-visual", "3", "--train-text", "2",
                              "--eval-visual", "3", "--eval-text", "1", "--seed", "1"])
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 5
    assert len(load_benchmark(tmp_path / "rl_train" / "prompts.jsonl")) == 5
    assert len(load_benchmark(tmp_path / "rl_eval" / "prompts.jsonl")) == 4
    assert len(list((tmp_path / "rl_eval" / "images").glob("eval-*.png"))) == 3
    assert "rl_eval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_synthetic_data_main(["--out", str(tmp_path), "--image-size", "112by84"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_counting_text_questions_are_held_out_and_answered(tmp_path):
    train = generate_text_questions(200, 0, kind="counting")
    held_out = generate_text_questions(60, 0, kind="counting", split="eval")
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in held_out)
    for record in train:
        a, b = map(int, re.findall(r"\d+", record["question"]))
        expected = a - b if "erased" in record["question"] else a + b
        assert record["kind"] == "counting" and record["answer"] == str(expected)


def test_visual_sft_conversations_name_their_images(tmp_path):
    path = write_visual_sft(tmp_path, 6, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    conversations = list(ConversationReader([path], strict=True))
    assert len(rows) == len(conversations) == 6 and conversations[0].images == tuple(rows[0]["images"])
    for row in rows:
        assert (tmp_path / row["images"][0]).is_file()
        user, reply = row["messages"][1]["content"], row["messages"][2]["content"]
        assert user[0] == {"type": "image"} and reply.endswith("}.")
        assert re.search(r"\\boxed\{(\w)\}", reply).group(1) in "1234567890AB"


def test_tiny_checkpoint_has_tokenizer_and_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    from tools.make_tiny_checkpoint import make_checkpoint  # imports megatron-core: ~4 s, only for this test

    out = make_checkpoint(tmp_path / "hf", "tiny", seed=0)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".hf.tmp-*"))
    processor = AutoImageProcessor.from_pretrained(str(out))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (56 * 56, 112 * 112)
    (record,) = generate_visual_questions(1, seed=0, image_dir=tmp_path / "images")
    grid = processor(images=[Image.open(tmp_path / record["images"][0])], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, HEIGHT // 14, WIDTH // 14]]  # unresized: 12 image tokens after the 2x2 merge
