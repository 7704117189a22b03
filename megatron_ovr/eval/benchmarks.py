r"""Benchmark files -> :class:`BenchmarkItem` lists, in our layout or as the public benchmarks ship them.

Files
-----
``.jsonl`` (one object per line; blank lines ignored), ``.json`` (a list of objects, or an object of
objects keyed by id, as MathVista's and MathVerse's GitHub releases are) or ``.parquet`` (HF dataset
exports; needs ``pyarrow``). Column names are matched case-insensitively (AIME 2024 ships ``Problem``).

Our layout ("generic")
----------------------
==========  ========  ==================================================================================
column      required  meaning
==========  ========  ==================================================================================
question    yes       the question text
answer      yes       the reference answer (string or number); for multiple choice the option letter or
                      the option's text (stored as the letter)
id          no        item id (default: the 1-based line or row number)
choices     no        list of option texts: makes the item multiple choice (answer -> letter)
images      no        list of images (``image``: a single one); each a path (relative to ``image_root``,
                      default the file's folder), ``{"bytes": ..., "path": ...}`` (an HF ``Image`` cell;
                      bytes raw or base64), or a base64 string / ``data:image/...;base64,`` URI
==========  ========  ==================================================================================

Public layouts (detected from the columns, most specific first; ``layout=`` forces one)
---------------------------------------------------------------------------------------
- ``mathverse`` (sample_index, problem_version, question, answer; image, question_type, query_wo):
  ``question_type == "multi-choice"`` -> multiple choice; a trailing ``Choices:\nA:...\nB:...`` block of
  the question becomes the choices, otherwise (options drawn in the image) the choices are empty and the
  letter is compared as an answer. An empty question (the vision-only version) falls back to ``query_wo``.
- ``mathvista`` (pid, question, answer, question_type; choices, decoded_image, image):
  ``multi_choice`` answers are option texts, stored as their letters.
- ``mathvision`` (id, question, options, answer; decoded_image, image): a non-empty ``options`` makes the
  item multiple choice (answer letter A-E); options that are just the letters (the options are drawn in
  the image) give empty choices.
- ``problem`` (problem, answer; unique_id or id): MATH500, AIME 2024 (``ID/Problem/Answer`` and
  ``id/problem/answer`` exports), AIME 2025 (math-ai), AIMO validation.
- ``generic`` (question, answer): our layout; also AIME 2025 from OpenCompass (question/answer).

Images are checked when the file is read (a path must exist, bytes must be non-empty) and decoded to RGB
only when the item is generated (:meth:`BenchmarkItem.load_images`). A malformed row raises ``ValueError``
naming ``file:line`` (a benchmark is all or nothing: skipping rows would change the denominator); a file
that matches no layout raises naming the file, the columns found and what each layout needs.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from megatron_ovr.data.prompts import OPTION_LETTERS

__all__ = ["BenchmarkItem", "LAYOUTS", "Layout", "detect_layout", "load_benchmark", "read_rows"]

ImageSource = bytes | Path


@dataclass(frozen=True)
class BenchmarkItem:
    """One question.

    Attributes:
        id: the benchmark's id for the item (unique within the file).
        question: question text as shown to the model (without the listed options).
        answer: reference answer; for multiple choice the option letter.
        choices: ``None`` for free-form; the option texts for multiple choice (empty when the options are
            only in the question text or the image).
        images: encoded image bytes or paths, in the order they are shown.
        source: ``file:line`` the item came from (for error messages).
    """

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] | None
    images: tuple[ImageSource, ...]
    source: str

    def load_images(self) -> list[Any]:
        """The images as RGB PIL images; ``ValueError`` naming the item if one cannot be decoded."""
        from PIL import Image, UnidentifiedImageError

        images = []
        for k, image in enumerate(self.images):
            try:
                opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
                images.append(opened.convert("RGB"))
            except (OSError, UnidentifiedImageError) as err:
                where = image if isinstance(image, Path) else f"{len(image)} embedded bytes"
                raise ValueError(f"{self.source}: image {k} ({where}) cannot be decoded: {err}") from err
        return images


class MalformedRow(ValueError):
    """A row that does not fit its layout; the converter's reason, placed at ``file:line`` by the reader."""


# ---- rows ------------------------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{line_no}: not a JSON object line: {err}") from err
            yield line_no, obj


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if isinstance(data, dict):
        # MathVista's release: {pid: record}; the key is the id when the record lacks one.
        data = [{"id": key, **value} if isinstance(value, dict) and "id" not in value else value
                for key, value in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records or an object of records, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for record in batch.to_pylist():
            row += 1
            yield row, record


_READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict]]]] = {
    ".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows,
}


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` for every record of a benchmark file; keys lower-cased. ``line`` is the 1-based JSONL
    line, JSON list position or Parquet row."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected one of {', '.join(_READERS)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    for line, record in _READERS[path.suffix](path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line}: expected an object, got {type(record).__name__}")
        yield line, {str(key).lower(): value for key, value in record.items()}


# ---- field helpers ---------------------------------------------------------------------------------------

def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MalformedRow(f"'{column}' must be a string or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise MalformedRow(f"'{column}' is empty")
    return text


def _optional_id(row: dict, columns: Sequence[str], line: int) -> str:
    for column in columns:
        if row.get(column) not in (None, ""):
            return str(row[column])
    return str(line)


# The smallest encoded images (a 1x1 PNG) take ~90 base64 characters.
_MIN_BASE64_IMAGE_CHARS = 64


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as err:
        raise MalformedRow(f"image string is neither an existing path nor base64 data ({err})") from err


def _image(value: Any, image_root: Path) -> ImageSource:
    """One image cell (see the module docstring for the accepted forms)."""
    if isinstance(value, dict):  # an HF Image cell: bytes win, the path is where it was once stored
        if value.get("bytes"):
            data = value["bytes"]
            return data if isinstance(data, bytes) else _decode_base64(str(data))
        value = value.get("path")
        if not value:
            raise MalformedRow("image cell has neither 'bytes' nor 'path'")
    if isinstance(value, bytes):
        if not value:
            raise MalformedRow("image bytes are empty")
        return value
    if not isinstance(value, str) or not value:
        raise MalformedRow(f"an image must be a path, bytes or a {{bytes, path}} cell, got {type(value).__name__}")
    if value.startswith("data:"):
        return _decode_base64(value)
    path = Path(value) if Path(value).is_absolute() else image_root / value
    if path.is_file():
        return path
    # Not a file: accept it as inline base64 data only when it plausibly is (a path such as "images/1.jpg"
    # is never valid base64: the dot is outside the alphabet).
    if len(value) >= _MIN_BASE64_IMAGE_CHARS:
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            pass
    raise MalformedRow(f"image file {path} does not exist (set image_root to the folder images are relative to)")


def _images(row: dict, image_root: Path, preferred: Sequence[str]) -> tuple[ImageSource, ...]:
    """The first present column of ``preferred``; a list column gives several images."""
    for column in preferred:
        value = row.get(column)
        if value is None or value == "" or value == []:
            continue
        values = value if isinstance(value, list) else [value]
        return tuple(_image(v, image_root) for v in values)
    return ()


def _choices(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # some exports store the list as its JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise MalformedRow(f"choices {value!r:.60} is a string but not a JSON list") from err
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, (str, int, float)) for c in value):
        raise MalformedRow(f"choices must be a list of strings, got {value!r:.80}")
    if len(value) > len(OPTION_LETTERS):
        raise MalformedRow(f"{len(value)} choices: at most {len(OPTION_LETTERS)} can be lettered")
    return tuple(str(c).strip() for c in value)


def _choice_letter(answer: str, choices: tuple[str, ...]) -> str:
    """The answer as an option letter: a letter within range as is, else the letter of the equal option."""
    letters = OPTION_LETTERS[: len(choices)]
    if len(answer) == 1 and answer.upper() in letters:
        return answer.upper()
    if answer in choices:
        return letters[choices.index(answer)]
    raise MalformedRow(f"answer {answer!r} is neither an option letter ({letters[0]}-{letters[-1]}) nor one "
                       f"of the choices {list(choices)}")


def _multiple_choice(answer: str, choices: tuple[str, ...] | None) -> tuple[str, tuple[str, ...] | None]:
    if not choices:
        return answer, None
    return _choice_letter(answer, choices), choices


# ---- layouts ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    name: str
    required: frozenset[str]
    """Lower-cased columns that identify the layout."""
    convert: Callable[[dict, int, Path, str], BenchmarkItem]
    """``(row, line, image_root, source) -> item``; raises :class:`MalformedRow`."""
    benchmarks: str
    """Which public benchmarks ship this layout (for --help and errors)."""


def _generic(row: dict, line: int, image_root: Path, source: str) -> BenchmarkItem:
    answer, choices = _multiple_choice(_text(row, "answer"), _choices(row.get("choices")))
    return BenchmarkItem(id=_optional_id(row, ("id",), line), question=_text(row, "question"), answer=answer,
                         choices=choices, images=_images(row, image_root, ("images", "image")), source=source)


def _problem(row: dict, line: int, image_root: Path, source: str) -> BenchmarkItem:
    return BenchmarkItem(id=_optional_id(row, ("unique_id", "id"), line), question=_text(row, "problem"),
                         answer=_text(row, "answer"), choices=None, images=(), source=source)


def _mathvista(row: dict, line: int, image_root: Path, source: str) -> BenchmarkItem:
    choices = _choices(row.get("choices")) if row.get("question_type") == "multi_choice" else None
    answer, choices = _multiple_choice(_text(row, "answer"), choices)
    return BenchmarkItem(id=_optional_id(row, ("pid",), line), question=_text(row, "question"), answer=answer,
                         choices=choices, images=_images(row, image_root, ("decoded_image", "image")),
                         source=source)


def _mathvision(row: dict, line: int, image_root: Path, source: str) -> BenchmarkItem:
    answer, choices = _multiple_choice(_text(row, "answer"), _choices(row.get("options")))
    if choices is not None and "".join(choices) == OPTION_LETTERS[: len(choices)]:
        choices = ()  # options ["A", ..., "E"]: the options themselves are drawn in the image
    return BenchmarkItem(id=_optional_id(row, ("id",), line), question=_text(row, "question"), answer=answer,
                         choices=choices, images=_images(row, image_root, ("decoded_image", "image")),
                         source=source)


_OPTIONS_BLOCK = re.compile(r"\n\s*Choices:\s*\n(?P<options>(?:[A-Z]\s*[:.)].*(?:\n|$))+)\s*$")
_OPTION_LINE = re.compile(r"([A-Z])\s*[:.)]\s*(.*)")


def _split_options(question: str) -> tuple[str, tuple[str, ...]]:
    """MathVerse writes the options into the question (``...\nChoices:\nA:40°\nB:50°``): the question
    without them and the option texts, or the question as is and ``()`` when there is no such block (the
    options are then in the image)."""
    block = _OPTIONS_BLOCK.search(question)
    if block is None:
        return question, ()
    options = [_OPTION_LINE.fullmatch(line.strip()) for line in block["options"].strip().splitlines()]
    letters = "".join(option.group(1) for option in options)
    if letters != OPTION_LETTERS[: len(letters)]:  # not A, B, C... in order: keep the text untouched
        return question, ()
    return question[: block.start()].rstrip(), tuple(option.group(2).strip() for option in options)


def _mathverse(row: dict, line: int, image_root: Path, source: str) -> BenchmarkItem:
    # The vision-only version moves the whole question into the image; query_wo then holds the instruction.
    question = _text(row, "question" if str(row.get("question") or "").strip() else "query_wo")
    answer = _text(row, "answer")
    choices = None
    if row.get("question_type") == "multi-choice":
        question, choices = _split_options(question)
        answer = answer.strip("()").upper()
        if choices:
            answer = _choice_letter(answer, choices)
    return BenchmarkItem(id=_optional_id(row, ("sample_index",), line), question=question, answer=answer,
                         choices=choices, images=_images(row, image_root, ("image",)), source=source)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("mathverse", frozenset({"sample_index", "problem_version", "question", "answer"}), _mathverse,
           "MathVerse (AI4Math/MathVerse testmini)"),
    Layout("mathvista", frozenset({"pid", "question", "answer", "question_type"}), _mathvista,
           "MathVista (AI4Math/MathVista testmini)"),
    Layout("mathvision", frozenset({"id", "question", "options", "answer"}), _mathvision,
           "MathVision (MathLLMs/MathVision test/testmini)"),
    Layout("problem", frozenset({"problem", "answer"}), _problem,
           "MATH500 (HuggingFaceH4/MATH-500), AIME 2024/2025 (ID/Problem/Answer, id/problem/answer)"),
    Layout("generic", frozenset({"question", "answer"}), _generic,
           "our layout; AIME 2025 (opencompass: question/answer)"),
)}
"""Tried in this order by :func:`detect_layout`: the most specific first."""


def detect_layout(columns: set[str], source: str) -> Layout:
    """The first layout whose required columns are all present; ``ValueError`` naming the file otherwise."""
    for layout in LAYOUTS.values():
        if layout.required <= columns:
            return layout
    needs = "; ".join(f"{name} needs {sorted(layout.required)}" for name, layout in LAYOUTS.items())
    raise ValueError(f"{source}: no known benchmark layout matches the columns {sorted(columns)} ({needs})")


def load_benchmark(path: str | Path, *, layout: str = "auto", image_root: str | Path | None = None,
                   limit: int | None = None) -> list[BenchmarkItem]:
    """Every item of one benchmark file (see the module docstring for files and layouts).

    Args:
        layout: ``"auto"`` (detect from the first row's columns) or a name in :data:`LAYOUTS`.
        image_root: folder that image paths are relative to (default: the file's folder).
        limit: read only the first ``limit`` items (quick runs).
    """
    path = Path(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose 'auto' or one of {sorted(LAYOUTS)}")
    root = Path(image_root) if image_root is not None else path.parent
    chosen = None if layout == "auto" else LAYOUTS[layout]
    items: list[BenchmarkItem] = []
    seen_ids: dict[str, str] = {}
    for line, row in read_rows(path):
        if limit is not None and len(items) >= limit:
            break
        source = f"{path}:{line}"
        if chosen is None:
            chosen = detect_layout(set(row), str(path))
        missing = sorted(chosen.required - set(row))
        if missing:
            raise ValueError(f"{source}: missing column(s) {missing} of layout {chosen.name!r} "
                             f"(columns found: {sorted(row)})")
        try:
            item = chosen.convert(row, line, root, source)
        except MalformedRow as err:
            raise ValueError(f"{source}: {err}") from None
        if item.id in seen_ids:
            raise ValueError(f"{source}: duplicate id {item.id!r} (first at {seen_ids[item.id]})")
        seen_ids[item.id] = source
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no benchmark rows")
    return items
