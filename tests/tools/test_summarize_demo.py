"""tools/summarize_demo.py: the demo's closing summary from the files the stages write (SFT and PPO metrics,
evaluation results and generations, behaviours, timings), and a clear "not run" for a stage that is missing."""

import json

from tools.summarize_demo import accuracy_by_kind, main, moving_average, slope


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_helpers():
    assert moving_average([0.0, 1.0, 2.0, 3.0], window=2) == [0.0, 0.5, 1.5, 2.5]
    assert slope([1.0, 3.0, 5.0]) == 2.0
    table = accuracy_by_kind([{"id": "eval-count-00001", "score": 1.0}, {"id": "eval-count-00002", "score": 0.0},
                              {"id": "eval-counting-00001", "score": 1.0}, {"id": "other", "score": 0.0}])
    assert table == {"count": (2, 0.5), "counting": (1, 1.0), "all": (4, 0.5)}


def test_summary_from_every_stage(tmp_path, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"step": 5 * i, "loss": 10.0 / i, "tokens_per_s": 400.0}
                                               for i in range(1, 5)])
    ppo = write_jsonl(tmp_path / "ppo.jsonl", [
        {"step": i, "reward/mean": 0.1 * i, "reward/image": 0.1 * i, "response_length/mean": 20.0 + i,
         "truncation_rate": 0.0, "entropy": 0.5, "time/iteration_s": 30.0, "time/generate_s": 4.0}
        for i in range(1, 7)])
    evals = []
    for name, score in (("sft", 0.0), ("ppo", 1.0)):
        directory = tmp_path / f"eval_{name}"
        directory.mkdir()
        (directory / "results.json").write_text(json.dumps({"benchmarks": {"synthetic": {
            "items": 2, "accuracy": score / 2, "truncated_rate": 0.0, "mean_response_tokens": 21.0}}}))
        write_jsonl(directory / "generations.jsonl", [{"id": "eval-count-00000", "score": score},
                                                      {"id": "eval-counting-00000", "score": 0.0}])
        evals += ["--eval", f"{name}={directory}"]
    (tmp_path / "timings.tsv").write_text("sft\t170\nppo\t400\n")
    out = tmp_path / "summary"
    assert main(["--out", str(out), "--sft-metrics", str(sft), "--ppo-metrics", str(ppo), *evals,
                 "--behaviors", str(tmp_path / "absent"), "--timings", str(tmp_path / "timings.tsv")]) == 0
    text = (out / "summary.md").read_text()
    assert "| **total** | **9 min 30 s** |" in text
    assert "| 5..20 | 10.000 (step 5) | 2.500 (step 20) | 400 |" in text
    assert "| 6 | 0.100 -> 0.600 |" in text and "+0.1000 / iteration" in text
    assert "| 6 | 0.600 | 0.500 | 0.600 |  | 26.0 |" in text  # image reward column filled, text column empty
    assert "| ppo | 100.0% (n=1) | 0.0% (n=1) | 50.0% (n=2) |" in text
    assert "## Cognitive behaviours (offline rule judge)\n\nnot run" in text
    assert (out / "summary.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
