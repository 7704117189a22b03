"""Behaviour analysis: emergence rates and BTR arithmetic, the offline rule judge's cues, reading saved
generations, and the command end to end against the loopback judge."""

import json
from pathlib import Path

import pytest

from megatron_ovr.eval.behaviors import (
    BEHAVIOR_PAIRS, BEHAVIORS, format_report, judge_messages, plot_report, read_responses, summarise,
)
from megatron_ovr.eval.commands import analyze_main
from megatron_ovr.eval.judge_server import count_cues, rule_judge_reply

SAMPLE_GENERATIONS = Path(__file__).resolve().parents[2] / "examples" / "eval" / "sample_generations.jsonl"


def _counts(**by_key):
    """Every behaviour with four responses of zero counts, except those given."""
    return {key: by_key.get(key, [0, 0, 0, 0]) for key in BEHAVIORS}


def test_rates_and_transfer_rates():
    report = summarise(_counts(
        visual_reflection=[1, 0, 2, 0],     # 2 of 4 -> 0.5, mean 0.75
        backtracking=[3, 1, 1, 1],          # 4 of 4 -> 1.0
        divide_and_conquer=[0, 0, 0, 1],    # 0.25
        subgoal_setting=[1, 1, 0, 0],       # 0.5
        visual_verification=[1, 1, 1, 0],   # 0.75, verification stays 0 -> BTR undefined
        goal_driven_visual_tracing=[0, 1, 0, 0],  # 0.25
        backward_chaining=[0, 0, 1, 1],     # 0.5
    ))
    assert report.rates["visual_reflection"].rate == 0.5
    assert report.rates["visual_reflection"].mean_count == 0.75
    assert report.rates["visual_reflection"].with_behavior == 2 and report.rates["backtracking"].rate == 1.0
    assert report.rates["verification"].modality == "linguistic"
    btr = {(p.visual, p.linguistic): p.btr for p in report.pairs}
    assert btr == {("visual_reflection", "backtracking"): 0.5, ("divide_and_conquer", "subgoal_setting"): 0.5,
                   ("visual_verification", "verification"): None,
                   ("goal_driven_visual_tracing", "backward_chaining"): 0.5}
    # Overall: mean visual rate / mean linguistic rate = (0.5+0.25+0.75+0.25) / (1.0+0.5+0+0.5).
    assert report.overall_btr == pytest.approx(1.75 / 2.0)


def test_overall_btr_undefined_without_linguistic_behaviour():
    report = summarise(_counts(visual_reflection=[1, 0, 0, 0]))
    assert report.overall_btr is None and all(p.btr is None for p in report.pairs)
    assert "Overall BTR: n/a over 4 responses" in format_report(report)


def test_counts_must_align():
    with pytest.raises(ValueError, match="one count per response"):
        summarise({**_counts(), "backtracking": [1]})


def test_table_and_chart(tmp_path):
    report = summarise(_counts(visual_reflection=[1, 1, 0, 0], backtracking=[1, 1, 1, 1]))
    table = format_report(report)
    assert ("| Visual reflection (re-inspecting the image) | 50.0% | 0.50 | Backtracking | 100.0% | 1.00 | 0.50 |"
            in table)
    assert len([row for row in table.splitlines() if row.startswith("| ")]) == 1 + len(BEHAVIOR_PAIRS)
    path = plot_report(report, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("key, text, expected", [
    ("backtracking", "Wait, that is wrong. Let me reconsider. wait", 4),
    ("visual_reflection", "Let me re-check the image. Looking back at the figure again, it is 5.", 2),
    ("subgoal_setting", "First, find x.\nThen, compute y. Step 3: done.", 2),
    ("verification", "Let me verify: 2+2=4. Double-check: yes.", 2),
    ("visual_verification", "This matches the diagram, and checking it against the chart confirms it.", 2),
    ("divide_and_conquer", "Split the figure into two halves and measure each region.", 2),
    ("goal_driven_visual_tracing", "I trace the curve, following the line to locate the peak on the graph.", 3),
    ("backward_chaining", "Working backwards: to find the area, we need the radius.", 2),
])
def test_offline_judge_cues(key, text, expected):
    assert count_cues(key, text) == expected
    assert rule_judge_reply(judge_messages(BEHAVIORS[key], text)).endswith(f"<count>{expected}</count>")


def test_judge_prompt_asks_for_a_count():
    messages = judge_messages(BEHAVIORS["verification"], "RESPONSE", question="QUESTION")
    prompt = messages[-1]["content"]
    assert "## Behavior: Verification\n" in prompt and "<count>N</count>" in prompt
    assert "<question>\nQUESTION\n</question>" in prompt and "<response>\nRESPONSE\n</response>" in prompt


def test_read_responses_filters_and_names_bad_lines(tmp_path):
    responses = read_responses(SAMPLE_GENERATIONS, benchmark="mathvision")
    assert len(responses) == 5 and responses[0].id == "mathvision/1#0" and responses[0].question
    path = tmp_path / "g.jsonl"
    path.write_text('{"response": "ok"}\n\n{"text": "no response"}\n')
    with pytest.raises(ValueError, match=f"^{path}:3: expected an object with a string 'response'"):
        read_responses(path)
    with pytest.raises(ValueError, match="no responses of benchmark 'mathverse'"):
        read_responses(SAMPLE_GENERATIONS, benchmark="mathverse")


def test_analyze_command_with_offline_judge(tmp_path, capsys):
    argv = ["--generations", str(SAMPLE_GENERATIONS), "--offline-judge", "--output-dir", str(tmp_path),
            "--benchmark", "mathvision", "--concurrency", "2"]
    assert analyze_main(argv) == 0
    assert "Overall BTR" in capsys.readouterr().out
    result = json.loads((tmp_path / "behaviors.json").read_text())
    assert result["responses"] == 5 and set(result["rates"]) == set(BEHAVIORS)
    counts = [json.loads(line) for line in (tmp_path / "behavior_counts.jsonl").read_text().splitlines()]
    assert counts[0]["id"] == "mathvision/1#0" and counts[0]["visual_reflection"] == 1
    assert (tmp_path / "behaviors.png").stat().st_size > 0 and (tmp_path / "behaviors.md").is_file()
    # A rerun judges nothing again: all 40 calls come from the cache.
    cached = (tmp_path / "judge_cache.jsonl").read_text()
    assert len(cached.splitlines()) == 5 * len(BEHAVIORS)
    assert analyze_main(argv) == 0
    assert (tmp_path / "judge_cache.jsonl").read_text() == cached


def test_analyze_command_needs_a_judge_model():
    with pytest.raises(SystemExit):
        analyze_main(["--generations", str(SAMPLE_GENERATIONS), "--output-dir", "x", "--judge-url", "http://h/v1"])
