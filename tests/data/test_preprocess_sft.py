"""``tools/preprocess_sft.py`` end to end: a synthetic set with 2 workers (a real subprocess) equals the
1-worker output and the in-process tokenisation; bad lines are skipped and reported, or stop a strict run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from launch import REPO

from megatron_ovr.data import (
    IndexedDataset,
    generate_conversations,
    load_tokenizer,
    qwen_tokenizer_dir,
    tokenize_conversation,
    write_jsonl,
)
from tools.preprocess_sft import main

TOOL = REPO / "tools" / "preprocess_sft.py"


def run_tool(*args):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_synthetic_with_two_workers(tmp_path):
    tokenizer_dir = qwen_tokenizer_dir()
    proc = run_tool("--synthetic", 300, "--seed", 4, "--tokenizer", tokenizer_dir, "--output", tmp_path / "w2",
                    "--workers", 2)
    assert proc.returncode == 0, proc.stderr
    assert "samples: 300" in proc.stdout and "skipped: 0" in proc.stdout
    assert main(["--synthetic", "300", "--seed", "4", "--tokenizer", str(tokenizer_dir),
                 "--output", str(tmp_path / "w1")]) == 0
    for suffix in (".bin", ".mask", ".idx.npy", ".idx.json"):
        assert (tmp_path / f"w2{suffix}").read_bytes() == (tmp_path / f"w1{suffix}").read_bytes(), suffix
    tokenizer = load_tokenizer(tokenizer_dir)
    dataset = IndexedDataset(tmp_path / "w2")
    assert dataset.vocab_size == tokenizer.vocab_size and dataset.pad_id == tokenizer.pad_id
    for i, conversation in enumerate(generate_conversations(300, seed=4)):
        expected = tokenize_conversation(conversation["messages"], tokenizer)
        np.testing.assert_array_equal(dataset[i][0], expected.token_ids)
        np.testing.assert_array_equal(dataset[i][1], expected.loss_mask)


@pytest.fixture
def bad_file(tmp_path):
    good = [json.dumps(c) for c in generate_conversations(5, seed=0)]
    image = {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
             "images": []}
    lines = [good[0], "not json", good[1], json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
             good[2], good[3], json.dumps(image), json.dumps({"msgs": []}), good[4]]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_lines_are_skipped_and_reported(bad_file, tmp_path, capsys):
    assert main(["--input", str(bad_file), "--tokenizer", str(qwen_tokenizer_dir()),
                 "--output", str(tmp_path / "out"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "samples: 5 " in out and "skipped: 4" in out
    assert f"  {bad_file}:2: invalid JSON" in out
    assert f"  {bad_file}:4: no assistant turn" in out
    assert f"  {bad_file}:7: image count mismatch: 0 path(s) in 'images' but 1 image part(s)" in out
    assert f"  {bad_file}:8: missing 'messages'" in out
    assert len(IndexedDataset(tmp_path / "out")) == 5


def test_strict_stops_at_the_first_bad_line(bad_file, tmp_path, capsys):
    assert main(["--input", str(bad_file), "--tokenizer", str(qwen_tokenizer_dir()),
                 "--output", str(tmp_path / "out"), "--strict"]) == 1
    assert f"\nerror: {bad_file}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.idx.json").exists()


def test_max_samples_and_no_valid_samples(tmp_path, capsys):
    path = write_jsonl(generate_conversations(10, seed=1), tmp_path / "ten.jsonl")
    assert main(["--input", str(path), "--tokenizer", str(qwen_tokenizer_dir()), "--output", str(tmp_path / "o"),
                 "--max-samples", "4"]) == 0
    assert len(IndexedDataset(tmp_path / "o")) == 4
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{}\n")
    assert main(["--input", str(empty), "--tokenizer", str(qwen_tokenizer_dir()), "--output", str(tmp_path / "e")]) == 1
    assert "no valid samples" in capsys.readouterr().err


def test_help():
    proc = run_tool("--help")
    assert proc.returncode == 0
    for flag in ("--input", "--synthetic", "--tokenizer", "--output", "--workers", "--strict", "--max-samples"):
        assert flag in proc.stdout
