"""Benchmark loaders: every layout as the public datasets ship it (JSONL and Parquet, embedded image bytes
and image paths), our generic layout, and errors that name the file and line."""

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_ovr.eval.benchmarks import LAYOUTS, detect_layout, load_benchmark


def _png(size=(28, 20), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        # JSON has no bytes: image bytes go in as base64 text, as JSON exports of HF Image cells do.
        path.write_text("".join(json.dumps(row, default=lambda b: base64.b64encode(b).decode()) + "\n" for row in rows))
    return path


def _write_image_file(folder: Path, name: str) -> str:
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / name).write_bytes(_png(color="blue"))
    return f"images/{name}"


# Column sets and values as the HF exports have them (image columns are HF Image cells {bytes, path}).
def _mathvista_rows(folder: Path, embed: bool) -> list[dict]:
    image = ({"decoded_image": {"bytes": _png(), "path": None}} if embed
             else {"image": _write_image_file(folder, "1.jpg")})
    common = {"unit": None, "precision": None, "metadata": {"source": "FunctionQA"}, "query": "Hint: ..."}
    return [
        {"pid": "1", "question": "The derivative of f(x) at x=2 is ____ that at x=5",
         "choices": ["larger than", "equal to", "smaller than"], "answer": "equal to",
         "question_type": "multi_choice", "answer_type": "text", **image, **common},
        {"pid": "2", "question": "What is the total volume?", "choices": None, "answer": "1.45",
         "question_type": "free_form", "answer_type": "float", **image, **common},
    ]


def _mathverse_rows(folder: Path, embed: bool) -> list[dict]:
    image = {"bytes": _png(), "path": "1.png"} if embed else _write_image_file(folder, "v.png")
    common = {"problem_index": "1", "image": image, "metadata": {"split": "testmini", "source": "GeoQA",
                                                                  "subject": "Plane Geometry", "subfield": "Angle"}}
    return [
        {"sample_index": "1", "problem_version": "Text Dominant", "question_type": "multi-choice",
         "question": "As shown in the figure, find angle BOC.\nChoices:\nA:40°\nB:50°\nC:80°\nD:100°",
         "answer": "B", "query_wo": "...", "query_cot": "...", **common},
        {"sample_index": "2", "problem_version": "Vision Only", "question_type": "multi-choice", "question": "",
         "answer": "C", "query_wo": "According to the question shown in the image, answer it.",
         "query_cot": "...", **common},
        {"sample_index": "3", "problem_version": "Text Lite", "question_type": "free-form",
         "question": "Find the length of AB.", "answer": "5", "query_wo": "...", "query_cot": "...", **common},
    ]


def _mathvision_rows(folder: Path, embed: bool) -> list[dict]:
    image = ({"decoded_image": {"bytes": _png(), "path": "images/1.jpg"}} if embed
             else {"image": _write_image_file(folder, "m.jpg")})
    common = {"solution": None, "level": 2, "subject": "metric geometry - angle", **image}
    return [
        {"id": "1", "question": "<image1> Which shape is missing?", "options": ["A", "B", "C", "D", "E"],
         "answer": "C", **common},
        {"id": "2", "question": "<image1> How many dots?", "options": [], "answer": "12", **common},
        {"id": "3", "question": "<image1> How long is the side?", "options": ["1", "2", "3", "4", "5"],
         "answer": "D", **common},
    ]


def _math500_rows(folder: Path, embed: bool) -> list[dict]:
    return [{"problem": "Compute $\\dbinom{8}{4}$.", "solution": "...", "answer": "70", "subject": "Counting",
             "level": 2, "unique_id": "test/counting_and_probability/1.json"}]


def _aime2024_rows(folder: Path, embed: bool) -> list[dict]:
    return [{"ID": "2024-I-1", "Problem": "Find the number of ...", "Solution": "...", "Answer": 204}]


def _aime2025_rows(folder: Path, embed: bool) -> list[dict]:
    return [{"id": "0", "problem": "Find the sum of all integer bases ...", "answer": "70"}]


def _opencompass_aime_rows(folder: Path, embed: bool) -> list[dict]:
    return [{"question": "Find the sum of all integer bases ...", "answer": "70"}]


def _generic_rows(folder: Path, embed: bool) -> list[dict]:
    image = {"bytes": base64.b64encode(_png()).decode()} if embed else _write_image_file(folder, "g.png")
    return [
        {"id": "a", "question": "Which is prime?", "choices": ["4", "7"], "answer": "7", "images": [image, image]},
        {"question": "What is 1+1?", "answer": "2"},
    ]


# (layout, rows, expected (id, question, answer, choices, number of images) per item)
CASES = [
    ("mathvista", _mathvista_rows, [
        ("1", "The derivative of f(x) at x=2 is ____ that at x=5", "B", ("larger than", "equal to", "smaller than"), 1),
        ("2", "What is the total volume?", "1.45", None, 1)]),
    ("mathverse", _mathverse_rows, [
        ("1", "As shown in the figure, find angle BOC.", "B", ("40°", "50°", "80°", "100°"), 1),
        ("2", "According to the question shown in the image, answer it.", "C", (), 1),
        ("3", "Find the length of AB.", "5", None, 1)]),
    ("mathvision", _mathvision_rows, [
        ("1", "<image1> Which shape is missing?", "C", (), 1),
        ("2", "<image1> How many dots?", "12", None, 1),
        ("3", "<image1> How long is the side?", "D", ("1", "2", "3", "4", "5"), 1)]),
    ("problem", _math500_rows, [("test/counting_and_probability/1.json", "Compute $\\dbinom{8}{4}$.", "70", None, 0)]),
    ("problem", _aime2024_rows, [("2024-I-1", "Find the number of ...", "204", None, 0)]),
    ("problem", _aime2025_rows, [("0", "Find the sum of all integer bases ...", "70", None, 0)]),
    ("generic", _opencompass_aime_rows, [("1", "Find the sum of all integer bases ...", "70", None, 0)]),
    ("generic", _generic_rows, [("a", "Which is prime?", "B", ("4", "7"), 2), ("2", "What is 1+1?", "2", None, 0)]),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("embed", [True, False], ids=["embedded-bytes", "image-paths"])
@pytest.mark.parametrize("layout, make_rows, expected", CASES, ids=[f"{c[0]}-{c[1].__name__[1:-5]}" for c in CASES])
def test_layouts_load_as_published(tmp_path, layout, make_rows, expected, suffix, embed):
    rows = make_rows(tmp_path, embed)
    path = _write(rows, tmp_path / f"bench{suffix}")
    items = load_benchmark(path)
    assert detect_layout({column.lower() for column in rows[0]}, str(path)).name == layout
    assert [(i.id, i.question, i.answer, i.choices, len(i.images)) for i in items] == expected
    for item in items:
        for image in item.load_images():
            assert image.mode == "RGB" and image.size == (28, 20)
    assert items[0].source == f"{path}:1"


def test_json_release_keyed_by_id(tmp_path):
    """MathVista's GitHub release: one JSON object of records keyed by pid."""
    rows = {row["pid"]: row for row in _mathvista_rows(tmp_path, embed=False)}
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(rows))
    assert [i.id for i in load_benchmark(path)] == ["1", "2"]


def test_image_root_and_limit(tmp_path):
    images = tmp_path / "elsewhere"
    images.mkdir()
    _write_image_file(images, "1.jpg")
    rows = [{"pid": str(k), "question": "q", "answer": "1", "question_type": "free_form", "image": "images/1.jpg"}
            for k in range(5)]
    path = _write(rows, tmp_path / "b.jsonl")
    items = load_benchmark(path, image_root=images, limit=3)
    assert len(items) == 3 and items[0].images == (images / "images" / "1.jpg",)


def test_no_matching_layout_names_file_and_columns(tmp_path):
    path = _write([{"prompt": "x", "target": "y"}], tmp_path / "odd.jsonl")
    with pytest.raises(ValueError) as err:
        load_benchmark(path)
    message = str(err.value)
    assert str(path) in message and "['prompt', 'target']" in message
    for name in LAYOUTS:
        assert name in message


@pytest.mark.parametrize("bad_row, reason", [
    ({"question": "q"}, r"missing column\(s\) \['answer'\]"),
    ({"question": "q", "answer": ""}, "'answer' is empty"),
    ({"question": "q", "answer": "9", "choices": ["1", "2"]}, "neither an option letter"),
    ({"question": "q", "answer": "1", "images": ["images/missing.png"]}, "missing.png does not exist"),
    ({"question": "q", "answer": "1", "choices": "not json"}, "not a JSON list"),
    ({"id": "1", "question": "q", "answer": "1"}, r"duplicate id '1' \(first at .*:1\)"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, reason):
    path = _write([{"id": "1", "question": "q", "answer": "1"}, {"id": "2", "question": "q", "answer": "2"}, bad_row],
                  tmp_path / "bench.jsonl")
    with pytest.raises(ValueError, match=f"^{path}:3: .*{reason}"):
        load_benchmark(path)


def test_invalid_json_line_and_undecodable_image(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=f"^{path}:2: not a JSON object line"):
        load_benchmark(path)
    path = _write([{"question": "q", "answer": "1", "image": {"bytes": base64.b64encode(b"x" * 80).decode()}}], path)
    with pytest.raises(ValueError, match=f"^{path}:1: image 0 \\(80 embedded bytes\\) cannot be decoded"):
        load_benchmark(path)[0].load_images()


def test_forced_layout_and_unknown_layout(tmp_path):
    path = _write(_math500_rows(tmp_path, embed=False), tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"m.jsonl:1: missing column\(s\) \['question'\] of layout 'generic'"):
        load_benchmark(path, layout="generic")
    with pytest.raises(ValueError, match="layout='nope': choose 'auto' or one of"):
        load_benchmark(path, layout="nope")


def test_example_benchmark_loads():
    path = Path(__file__).resolve().parents[2] / "examples" / "eval" / "tiny_benchmark.jsonl"
    items = load_benchmark(path)
    assert [len(i.images) for i in items] == [0, 0, 0, 1, 1]
    assert items[2].answer == "C" and all(len(i.load_images()) == len(i.images) for i in items)
