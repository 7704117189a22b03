r"""Deterministic synthetic RL prompts for the tiny demo: small drawn images and text arithmetic.

Contract
--------
Records are in the evaluation harness's generic benchmark layout (:mod:`megatron_ovr.eval.benchmarks`), so
the PPO prompt loader and the evaluation harness both read them with ``load_benchmark``::

    {"id": "train-count-00000", "kind": "count", "question": "How many red squares are in the image?",
     "answer": "3", "images": ["images/train-count-00000.png"]}
    {"id": "train-bars-00000", "kind": "bars", "question": "Which bar is taller?",
     "choices": ["the left bar", "the right bar"], "answer": "B", "images": ["images/train-bars-00000.png"]}
    {"id": "train-arithmetic-00000", "kind": "arithmetic", "question": "What is 3 + 4?", "answer": "7"}

``kind`` is extra to the layout (the loader ignores it); it lets rewards and accuracy be split by task.
The tasks keep their answer spaces small so a tiny model's reward can rise within a few PPO iterations:

- ``count``: 1-4 red squares (3 in 60% of the images: :data:`RED_SQUARE_WEIGHTS`) among 0-2 squares of
  another colour, none touching; "How many red squares are in the image?" -> ``1``-``4``.
- ``digit``: one black digit in Pillow's built-in font; "What digit is shown in the image?" -> ``0``-``9``.
- ``bars``: two bars standing on one line; "Which bar is taller?", multiple choice -> ``A`` / ``B``.
- ``arithmetic``: text only, the SFT data's problems (:func:`.synthetic.random_arithmetic_problem`) -> the
  integer result, ``0``-``90``.
- ``counting``: text only, the SFT data's counting word problems (:func:`.synthetic.random_counting_problem`)
  -> ``1``-``8``.

Images are 112x84 RGB PNGs by default: a multiple of Qwen2.5-VL's 28-pixel merge unit within a
``max_pixels`` of 112*112, so the processor keeps them as they are and each becomes 12 image tokens.

:func:`write_visual_sft` turns visual questions into multimodal SFT conversations (``{"messages", "images"}``,
the recipe's prompt from :func:`.prompts.question_messages` and a short ``<think>`` trace ending in
``\boxed{answer}``) for the multimodal SFT path (``tools/preprocess_sft.py --processor``).

Determinism: the same arguments give the same records and byte-identical PNGs. Each kind draws from its own
random stream and visual kinds take turns, so a longer list extends a shorter one.

Held-out split: an item is identified by what it shows and asks (for arithmetic, the expression, so a
reworded problem is the same item). That identity hashes into one of :data:`SPLIT_BUCKETS` buckets and
bucket 0 is the ``eval`` split: train and eval never share an item, whatever the seeds and counts. (The SFT
conversations of :mod:`.synthetic` are drawn without this filter, so an eval arithmetic problem may have
been seen in SFT.)
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from .prompts import question_messages
from .sources import write_jsonl
from .synthetic import random_arithmetic_problem, random_counting_problem

__all__ = [
    "DEFAULT_IMAGE_SIZE", "IMAGE_FOLDER", "PROMPTS_FILE", "SPLIT_BUCKETS", "VISUAL_KINDS", "VISUAL_SFT_FILE", "TEXT_KINDS", "Split",
    "generate_text_questions", "generate_visual_questions", "write_rl_prompts", "write_visual_sft",
]

Split = Literal["train", "eval"]
RGB = tuple[int, int, int]

SPLIT_BUCKETS = 8
"""One in this many items (by identity hash) belongs to the eval split."""
PROMPTS_FILE = "prompts.jsonl"
IMAGE_FOLDER = "images"
VISUAL_SFT_FILE = "conversations.jsonl"
DEFAULT_IMAGE_SIZE = (112, 84)

_WHITE: RGB = (255, 255, 255)
_BLACK: RGB = (0, 0, 0)
_RED: RGB = (220, 20, 20)
# Nothing reddish, so "red" is never ambiguous.
_OTHER_COLORS: tuple[RGB, ...] = ((30, 80, 220), (20, 150, 50), (120, 120, 120))

_COUNT_CELL = 28
"""The counting canvas is cut into cells of this side, one square per cell at most: squares never touch."""
_COUNT_CELL_MARGIN = 2
_SQUARE_SIDES = (10, 16)
RED_SQUARE_WEIGHTS = {1: 0.1, 2: 0.15, 3: 0.6, 4: 0.15}
"""How often each count of red squares is drawn: skewed, as real benchmarks' answers are, so that a policy
that cannot count yet still has something to learn from the reward (the tiny demo's PPO learns this prior
within a few iterations; a random ViT does not learn to count in that time)."""
_MAX_OTHER_SQUARES = 2
_DIGIT_FONT_SIZES = (48, 56, 64)
_DIGIT_MARGIN = 3
_BAR_WIDTHS = (14, 22)
_BAR_MIN_HEIGHT = 8
_BAR_MIN_DIFFERENCE = 10
"""Pixels between the two bars' heights: a difference a 14-pixel patch grid can show."""
_BAR_BASE_MARGIN = 6
_MIN_IMAGE_SIZE = (84, 56)
"""The smallest canvas that fits every task (6 counting cells, the largest digit, visibly different bars)."""


@dataclass(frozen=True)
class _Rectangle:
    box: tuple[int, int, int, int]
    """``(left, top, right, bottom)``, all inclusive, as ``ImageDraw.rectangle`` takes it."""
    color: RGB


@dataclass(frozen=True)
class _Glyph:
    origin: tuple[int, int]
    text: str
    font_size: int
    color: RGB


@dataclass(frozen=True)
class _Scene:
    """One visual question: what is drawn, what is asked, and the answer by construction."""

    shapes: tuple[_Rectangle | _Glyph, ...]
    question: str
    answer: str
    choices: tuple[str, ...] | None = None

    def identity(self, kind: str, image_size: tuple[int, int]) -> str:
        return f"{kind}|{image_size}|{self.question}|{self.shapes!r}"

    def render(self, image_size: tuple[int, int]) -> Image.Image:
        image = Image.new("RGB", image_size, _WHITE)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            if isinstance(shape, _Rectangle):
                draw.rectangle(shape.box, fill=shape.color)
            else:
                draw.text(shape.origin, shape.text, font=_digit_font(shape.font_size), fill=shape.color)
        return image


@functools.cache
def _digit_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in TrueType font at ``size`` pixels (embedded in Pillow: no font files needed)."""
    if not features.check("freetype2"):
        # Without FreeType, load_default ignores the size and returns an 11-pixel bitmap font.
        raise RuntimeError("drawing digits needs Pillow built with FreeType, as the PyPI wheels are: "
                           "pip install --force-reinstall pillow")
    return ImageFont.load_default(size=size)


def _counting_scene(rng: random.Random, image_size: tuple[int, int]) -> _Scene:
    columns, rows = image_size[0] // _COUNT_CELL, image_size[1] // _COUNT_CELL
    red = rng.choices(list(RED_SQUARE_WEIGHTS), weights=list(RED_SQUARE_WEIGHTS.values()))[0]
    other = rng.randint(0, _MAX_OTHER_SQUARES)
    cells = rng.sample(range(columns * rows), red + other)
    squares = []
    for k, cell in enumerate(cells):
        side = rng.randint(*_SQUARE_SIDES)
        slack = _COUNT_CELL - 2 * _COUNT_CELL_MARGIN - side
        left = (cell % columns) * _COUNT_CELL + _COUNT_CELL_MARGIN + rng.randint(0, slack)
        top = (cell // columns) * _COUNT_CELL + _COUNT_CELL_MARGIN + rng.randint(0, slack)
        color = _RED if k < red else rng.choice(_OTHER_COLORS)
        squares.append(_Rectangle((left, top, left + side - 1, top + side - 1), color))
    return _Scene(tuple(squares), "How many red squares are in the image?", str(red))


def _digit_scene(rng: random.Random, image_size: tuple[int, int]) -> _Scene:
    digit, size = str(rng.randint(0, 9)), rng.choice(_DIGIT_FONT_SIZES)
    # The ink's box relative to the drawing origin: choose an origin that keeps all of it on the canvas.
    ink_left, ink_top, ink_right, ink_bottom = _digit_font(size).getbbox(digit)
    x = rng.randint(_DIGIT_MARGIN - ink_left, image_size[0] - _DIGIT_MARGIN - ink_right)
    y = rng.randint(_DIGIT_MARGIN - ink_top, image_size[1] - _DIGIT_MARGIN - ink_bottom)
    return _Scene((_Glyph((x, y), digit, size, _BLACK),), "What digit is shown in the image?", digit)


def _bars_scene(rng: random.Random, image_size: tuple[int, int]) -> _Scene:
    width, height = image_size
    base = height - _BAR_BASE_MARGIN
    tallest = base - _BAR_BASE_MARGIN
    taller = rng.randint(_BAR_MIN_HEIGHT + _BAR_MIN_DIFFERENCE, tallest)
    shorter = rng.randint(_BAR_MIN_HEIGHT, taller - _BAR_MIN_DIFFERENCE)
    left_is_taller = rng.random() < 0.5
    heights = (taller, shorter) if left_is_taller else (shorter, taller)
    bars = []
    for half, bar_height in enumerate(heights):
        bar_width = rng.randint(*_BAR_WIDTHS)
        # Each bar stays inside its own half of the canvas, so left and right are never in doubt.
        left = half * width // 2 + rng.randint(_BAR_BASE_MARGIN, width // 2 - _BAR_BASE_MARGIN - bar_width)
        bars.append(_Rectangle((left, base - bar_height, left + bar_width - 1, base - 1), rng.choice(_OTHER_COLORS)))
    return _Scene(tuple(bars), "Which bar is taller?", "A" if left_is_taller else "B",
                  choices=("the left bar", "the right bar"))


_VISUAL_TASKS: dict[str, Callable[[random.Random, tuple[int, int]], _Scene]] = {
    "count": _counting_scene, "digit": _digit_scene, "bars": _bars_scene,
}
VISUAL_KINDS = tuple(_VISUAL_TASKS)


def _in_split(identity: str, split: Split) -> bool:
    # sha256, not hash(): Python salts str hashes per process, and the split must never change.
    bucket = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") % SPLIT_BUCKETS
    return (bucket == 0) == (split == "eval")


def _stream(seed: int, split: Split, kind: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(f"{seed}/{split}/{kind}")


def _check(n: int, split: str) -> None:
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: choose 'train' or 'eval'")


def _scenes(kind: str, seed: int, split: Split, image_size: tuple[int, int]) -> Iterator[_Scene]:
    """The endless scenes of one kind that belong to ``split``, in stream order."""
    rng = _stream(seed, split, kind)
    while True:
        scene = _VISUAL_TASKS[kind](rng, image_size)
        if _in_split(scene.identity(kind, image_size), split):
            yield scene


def generate_visual_questions(
    n: int,
    seed: int,
    image_dir: str | Path,
    *,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    kinds: Sequence[str] = VISUAL_KINDS,
    split: Split = "train",
    progress: bool = False,
) -> list[dict]:
    """``n`` visual questions (``kinds`` take turns), their images saved as ``image_dir/<id>.png``.

    Image paths in the records are ``"<image_dir name>/<id>.png"``: relative to ``image_dir``'s parent,
    where :func:`write_rl_prompts` puts the JSONL file. ``progress`` shows a bar while drawing.
    """
    _check(n, split)
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(VISUAL_KINDS):
        raise ValueError(f"kinds={list(kinds)}: choose one or more distinct kinds of {list(VISUAL_KINDS)}")
    if image_size[0] < _MIN_IMAGE_SIZE[0] or image_size[1] < _MIN_IMAGE_SIZE[1]:
        raise ValueError(f"image_size={image_size}: must be at least {_MIN_IMAGE_SIZE} to fit every task")
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    streams = {kind: _scenes(kind, seed, split, image_size) for kind in kinds}
    records = []
    for i in tqdm(range(n), desc=f"drawing {split} images", unit=" images", disable=not progress):
        kind = kinds[i % len(kinds)]
        scene = next(streams[kind])
        item_id = f"{split}-{kind}-{i // len(kinds):05d}"
        scene.render(image_size).save(image_dir / f"{item_id}.png", format="PNG")
        record = {"id": item_id, "kind": kind, "question": scene.question, "answer": scene.answer}
        if scene.choices is not None:
            record["choices"] = list(scene.choices)
        record["images"] = [f"{image_dir.name}/{item_id}.png"]
        records.append(record)
    return records


TEXT_KINDS = ("arithmetic", "counting")


def generate_text_questions(n: int, seed: int, *, split: Split = "train", kind: str = "arithmetic") -> list[dict]:
    """``n`` text-only questions (no images): the SFT data's arithmetic problems, or (``kind="counting"``) its
    counting word problems (:func:`.synthetic.random_counting_problem`, answers 1-8)."""
    _check(n, split)
    if kind not in TEXT_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {list(TEXT_KINDS)}")
    draw = random_arithmetic_problem if kind == "arithmetic" else random_counting_problem
    rng = _stream(seed, split, kind)
    records: list[dict] = []
    while len(records) < n:
        problem = draw(rng)
        identity = problem.expression if kind == "arithmetic" else problem.question
        if _in_split(f"{kind}|{identity}", split):
            records.append({"id": f"{split}-{kind}-{len(records):05d}", "kind": kind,
                            "question": problem.question, "answer": str(problem.answer)})
    return records


def write_rl_prompts(
    out_dir: str | Path,
    n_visual: int,
    n_text: int,
    seed: int,
    *,
    split: Split = "train",
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    visual_kinds: Sequence[str] = VISUAL_KINDS,
    text_kind: str = "arithmetic",
    progress: bool = False,
) -> Path:
    """Writes ``out_dir/prompts.jsonl`` (visual and text questions shuffled together) and
    ``out_dir/images/``; returns the JSONL path, which ``load_benchmark`` reads."""
    out_dir = Path(out_dir)
    records = generate_visual_questions(n_visual, seed, out_dir / IMAGE_FOLDER, image_size=image_size, split=split,
                                        kinds=visual_kinds, progress=progress)
    records += generate_text_questions(n_text, seed, split=split, kind=text_kind)
    # Mixed, so that any prefix or batch of the file holds both modalities.
    random.Random(f"{seed}/{split}/order").shuffle(records)
    return write_jsonl(records, out_dir / PROMPTS_FILE)


_TRACES = {
    "count": "I count the red squares in the image one by one: there are {answer}.",
    "digit": "The image shows a single digit; it reads {answer}.",
    "bars": "I compare the heights of the two bars; option {answer} is the taller one.",
}


def write_visual_sft(out_dir: str | Path, n: int, seed: int, *,
                     image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, progress: bool = False) -> Path:
    """Writes ``out_dir/conversations.jsonl``: ``n`` multimodal SFT conversations over visual questions
    (train split), images in ``out_dir/images/`` (paths relative to the JSONL file); returns its path."""
    out_dir = Path(out_dir)
    conversations = []
    for record in generate_visual_questions(n, seed, out_dir / IMAGE_FOLDER, image_size=image_size, progress=progress):
        trace = _TRACES[record["kind"]].format(answer=record["answer"])
        reply = f"<think>\n{trace}\n</think>\n\nThe answer is \\boxed{{{record['answer']}}}."
        messages = question_messages(record["question"], 1, record.get("choices"))
        conversations.append({"messages": [*messages, {"role": "assistant", "content": reply}],
                              "images": record["images"]})
    return write_jsonl(conversations, out_dir / VISUAL_SFT_FILE)
