"""Conversation sources: JSONL and Parquet files of chat samples, read robustly.

Contract
--------
JSONL: one object per line, ``{"messages": [...], "images": [path, ...]}`` (``images`` optional, one path
per image part, in order). Parquet: a ``messages`` column (list of ``{role, content}`` structs) and an
optional ``images`` column; it needs ``pyarrow``. Blank JSONL lines are ignored.

:func:`read_records` yields a :class:`Conversation` for each valid sample and a :class:`MalformedSample`
(file, 1-based line or row, reason) for each bad one; it never raises on a bad sample.
:class:`ConversationReader` reads several files, yields only the good samples, and counts, keeps and logs
(up to a cap) the bad ones — or raises ``ValueError("file:line: reason")`` at the first one with
``strict=True``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

from .chat import count_images, validate_messages

__all__ = ["Conversation", "ConversationReader", "MalformedSample", "read_records", "write_jsonl"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversation:
    """A valid sample and where it came from (``line`` is 1-based: a JSONL line or a Parquet row)."""

    messages: list
    images: tuple[str, ...]
    source: str
    line: int


@dataclass(frozen=True)
class MalformedSample:
    """A sample that was skipped, and why."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


Record = Union[Conversation, MalformedSample]


def _record(obj, source: str, line: int) -> Record:
    if not isinstance(obj, dict):
        return MalformedSample(source, line, f"expected an object with 'messages', got {type(obj).__name__}")
    if "messages" not in obj:
        return MalformedSample(source, line, "missing 'messages'")
    messages, images = obj["messages"], obj.get("images") or []
    try:
        validate_messages(messages)
    except ValueError as err:
        return MalformedSample(source, line, str(err))
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return MalformedSample(source, line, "'images' must be a list of path strings")
    if len(images) != count_images(messages):
        return MalformedSample(
            source, line, f"image count mismatch: {len(images)} path(s) in 'images' but "
            f"{count_images(messages)} image part(s) in the messages"
        )
    return Conversation(messages=messages, images=tuple(images), source=source, line=line)


def _jsonl_records(path: Path) -> Iterator[Record]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield MalformedSample(str(path), line_no, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))  # so that error columns refer to this line
            except json.JSONDecodeError as err:
                yield MalformedSample(str(path), line_no, f"invalid JSON: {err.msg} at column {err.colno}")
                continue
            yield _record(obj, str(path), line_no)


def _parquet_records(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    parquet = pq.ParquetFile(path)
    if "messages" not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no 'messages' column (columns: {', '.join(parquet.schema_arrow.names)})")
    columns = [c for c in ("messages", "images") if c in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield _record(obj, str(path), row)


_READERS = {".jsonl": _jsonl_records, ".parquet": _parquet_records}


def read_records(path: str | Path) -> Iterator[Record]:
    """Every sample of one ``.jsonl`` or ``.parquet`` file, good or malformed, in file order."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected one of {', '.join(_READERS)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _READERS[path.suffix](path)


class ConversationReader:
    """Iterates the valid conversations of several files; counts and keeps the malformed ones.

    Args:
        paths: ``.jsonl`` / ``.parquet`` files, read in order.
        strict: raise ``ValueError("file:line: reason")`` at the first malformed sample instead of skipping.
        max_warnings: how many skipped samples are logged one by one (all are counted and kept).
    """

    def __init__(self, paths: Iterable[str | Path], *, strict: bool = False, max_warnings: int = 10):
        self.paths = [Path(p) for p in paths]
        self.strict = strict
        self.max_warnings = max_warnings
        self.malformed: list[MalformedSample] = []

    def records(self) -> Iterator[Record]:
        """Every sample of every file, good or malformed, in order (nothing counted)."""
        for path in self.paths:
            yield from read_records(path)

    def __iter__(self) -> Iterator[Conversation]:
        for record in self.records():
            if isinstance(record, Conversation):
                yield record
            else:
                self.skip(record)

    def skip(self, sample: MalformedSample) -> None:
        """Counts (or, strict, raises for) a malformed sample; also used for samples rejected downstream."""
        if self.strict:
            raise ValueError(str(sample))
        self.malformed.append(sample)
        if len(self.malformed) <= self.max_warnings:
            logger.warning("skipping malformed sample %s", sample)
        elif len(self.malformed) == self.max_warnings + 1:
            logger.warning("more malformed samples: no longer logging them one by one")


def write_jsonl(conversations: Iterable[dict], path: str | Path) -> Path:
    """Writes ``{"messages": ...}`` objects one per line (the format :func:`read_records` reads)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    return path
