"""Conversation sources: malformed samples are counted, skipped and named by file:line (or stop a strict
read); JSONL and Parquet read the same conversations."""

import json
import logging
import sys

import pytest

from megatron_ovr.data import ConversationReader, MalformedSample, read_records, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}


def good(i):
    return {"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


@pytest.fixture
def mixed_file(tmp_path):
    """5 good and 3 bad lines (bad: 2, 5, 8), and a blank line that is not a sample."""
    lines = [json.dumps(good(0)),
             '{"messages": [',                                                        # 2: bad JSON
             json.dumps(good(1)),
             json.dumps(good(2)),
             json.dumps({"conversation": []}),                                        # 5: no messages
             "",
             json.dumps(good(3)),
             json.dumps({"messages": [{"role": "bot", "content": "x"}]}),             # 8: unknown role
             json.dumps(good(4))]
    return write_lines(tmp_path / "mixed.jsonl", lines)


def test_malformed_lines_are_counted_skipped_and_named(mixed_file):
    reader = ConversationReader([mixed_file])
    conversations = list(reader)
    assert [c.messages for c in conversations] == [good(i)["messages"] for i in range(5)]
    assert [c.line for c in conversations] == [1, 3, 4, 7, 9]
    assert [m.line for m in reader.malformed] == [2, 5, 8]
    reasons = [str(m) for m in reader.malformed]
    assert reasons[0].startswith(f"{mixed_file}:2: invalid JSON")
    assert reasons[1] == f"{mixed_file}:5: missing 'messages'"
    assert reasons[2].startswith(f"{mixed_file}:8: messages[0]: unknown role 'bot'")


def test_strict_raises_at_the_first_bad_line(mixed_file):
    reader = ConversationReader([mixed_file], strict=True)
    with pytest.raises(ValueError, match=f"^{mixed_file}:2: invalid JSON"):
        list(reader)


def test_warnings_are_capped(mixed_file, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_ovr.data.sources"):
        reader = ConversationReader([mixed_file], max_warnings=1)
        list(reader)
    assert len(reader.malformed) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"skipping malformed sample {mixed_file}:2: invalid JSON: Expecting value at column 15"
    assert messages[1].startswith("more malformed samples")
    assert len(messages) == 2


@pytest.mark.parametrize("line, reason", [
    (json.dumps([1, 2]), "expected an object with 'messages', got list"),
    (json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}),
     "messages[0]: content must be a string or a list of parts, got NoneType"),
    (json.dumps({"messages": []}), "empty conversation"),
    (json.dumps({**GOOD, "images": ["a.png"]}), "image count mismatch: 1 path(s) in 'images' but 0 image part(s)"),
    (json.dumps({**GOOD, "images": "a.png"}), "'images' must be a list of path strings"),
    (b'{"messages": "\xff"}\n', "not valid UTF-8"),
])
def test_reasons(tmp_path, line, reason):
    path = write_lines(tmp_path / "one.jsonl", [json.dumps(GOOD), line])
    records = list(read_records(path))
    assert records[0].messages == GOOD["messages"]
    assert isinstance(records[1], MalformedSample) and records[1].line == 2
    assert records[1].reason.startswith(reason)


def test_images_are_kept_with_their_sample(tmp_path):
    sample = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
                           {"role": "assistant", "content": "a cat"}], "images": ["cat.png"]}
    (record,) = read_records(write_jsonl([sample], tmp_path / "img.jsonl"))
    assert record.images == ("cat.png",)


def test_jsonl_round_trip_and_unsupported_files(tmp_path):
    path = write_jsonl([good(i) for i in range(3)], tmp_path / "x.jsonl")
    assert [r.messages for r in read_records(path)] == [good(i)["messages"] for i in range(3)]
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        read_records(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(read_records(tmp_path / "x.parquet"))


def test_parquet_reads_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [good(0)["messages"], [{"role": "bot", "content": "x"}], good(1)["messages"], good(2)["messages"]]
    pq.write_table(pa.table({"messages": rows, "source": ["a", "b", "c", "d"]}), tmp_path / "x.parquet",
                   row_group_size=2)
    reader = ConversationReader([tmp_path / "x.parquet"])
    assert [c.messages for c in reader] == [good(i)["messages"] for i in range(3)]
    assert [str(m) for m in reader.malformed] == [
        f"{tmp_path / 'x.parquet'}:2: messages[0]: unknown role 'bot' (expected one of system, user, assistant)"]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'messages' column"):
        list(read_records(tmp_path / "bad.parquet"))
