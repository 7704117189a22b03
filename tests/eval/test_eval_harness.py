"""The evaluation harness through the rollout-engine seam (a scripted fake engine) and the real verifier:
prompts and images sent, scores, accuracy/pass@k table, saved generations; config, YAML and command line."""

import json
from pathlib import Path

import pytest
import yaml

from megatron_ovr import cli
from megatron_ovr.config.eval import EvalConfig
from megatron_ovr.config.io import from_dict, load_yaml, to_dict
from megatron_ovr.data.chat import render_conversation
from megatron_ovr.data.prompts import SYSTEM_PROMPT, build_prompt
from megatron_ovr.eval import commands
from megatron_ovr.eval.benchmarks import BenchmarkItem, load_benchmark
from megatron_ovr.eval.harness import evaluate, format_table, write_results
from megatron_ovr.rl.reward import MathVerifyReward
from megatron_ovr.rollout.engine import Completion, EngineInfo, RolloutEngine, SamplingSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "eval"

# Two scripted samples per question of examples/eval/tiny_benchmark.jsonl: (text, finish_reason).
SCRIPT = {
    "What is 3 + 4?": [("<think>\n3 + 4 = 7.\n</think>\n\n\\boxed{7}", "stop"), ("\\boxed{8}", "stop")],
    "Compute (2 + 3) * 4.": [("\\boxed{20} and then more", "length"), ("The answer is \\boxed{20}.", "stop")],
    "Which number is prime?": [("\\boxed{C}", "stop"), ("\\boxed{7}", "stop")],  # the letter, then the option text
    "What colour is the square in the image?": [("\\boxed{B}", "stop"), ("\\boxed{(B)}", "stop")],
    "How many circles are in the image?": [("\\boxed{1}", "stop"), ("no box", "stop")],
}
# Scores with truncated_is_wrong: 1 0 | 0 1 | 1 1 | 0 0 | 1 0 -> 5/10; items with a correct sample: 4/5.


class ScriptedEngine(RolloutEngine):
    """Answers each prompt from SCRIPT (matched by its question) and records what it was asked."""

    info = EngineInfo(name="scripted")

    def __init__(self, script=SCRIPT):
        self.script = script
        self.calls = []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        completions = []
        for request in requests:
            question = next(q for q in self.script if q in request.prompt)
            completions.append([
                Completion(prompt_token_ids=[1, 2, 3], token_ids=[9] * (10 + k), log_probs=[-0.5] * (10 + k),
                           finish_reason=reason, text=text)
                for k, (text, reason) in enumerate(self.script[question][: sampling.samples_per_prompt])
            ])
        return completions

    def update_weights(self, named_tensors):
        raise AssertionError("evaluation never updates weights")

    def sleep(self):
        pass

    def wake_up(self):
        pass


@pytest.fixture(scope="module")
def verifier():
    with MathVerifyReward(timeout_s=10.0) as reward:
        yield reward


@pytest.fixture(scope="module")
def tiny_items():
    return load_benchmark(EXAMPLES / "tiny_benchmark.jsonl")


SAMPLING = SamplingSettings(max_new_tokens=32, temperature=1.0, samples_per_prompt=2, seed=3)


def test_prompt_is_the_sft_template_with_an_open_assistant_turn():
    prompt = build_prompt("Which is larger?", num_images=2, choices=["2", "3"])
    header = "<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.endswith(header)
    user_text = prompt.split("<|vision_end|>")[-1].removesuffix(header)
    assert user_text.startswith("Which is larger?\n\nChoices:\n(A) 2\n(B) 3\n\nAnswer with the letter")
    # The same conversation with a reply renders (SFT template) as the prompt followed by that reply.
    conversation = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": user_text}]},
                    {"role": "assistant", "content": "REPLY"}]
    assert render_conversation(conversation, [1, 1]) == prompt + "REPLY<|im_end|>\n"
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2


def test_prompt_answer_formats():
    assert "letter" not in build_prompt("Free form?", 0)
    no_listed_options = build_prompt("Options are in the image.", 1, choices=[])
    assert "Choices:" not in no_listed_options and "Answer with the letter" in no_listed_options
    with pytest.raises(ValueError, match="num_images=-1"):
        build_prompt("q", -1)


def test_scores_table_and_generations(tmp_path, verifier, tiny_items):
    engine = ScriptedEngine()
    results = evaluate({"tiny": tiny_items}, engine, SAMPLING, verifier, batch_size=2,
                       generations_path=tmp_path / "gen" / "generations.jsonl")
    (score,) = results.scores
    assert (score.items, score.samples_per_item) == (5, 2)
    assert score.accuracy == 0.5 and score.pass_at_k == 0.8 and score.truncated_rate == 0.1
    assert score.mean_response_tokens == 10.5

    # What the engine saw: batches of 2, the recipe's prompt, decoded images, the sampling settings.
    assert [len(requests) for requests, _ in engine.calls] == [2, 2, 1]
    requests = [r for batch, _ in engine.calls for r in batch]
    assert [r.prompt for r in requests] == [build_prompt(i.question, len(i.images), i.choices) for i in tiny_items]
    assert [len(r.images) for r in requests] == [0, 0, 0, 1, 1]
    assert requests[3].images[0].size == (56, 56) and requests[3].images[0].mode == "RGB"
    assert all(sampling is SAMPLING for _, sampling in engine.calls)

    lines = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert [(g["id"], g["sample"], g["score"]) for g in lines] == [
        ("add-1", 0, 1.0), ("add-1", 1, 0.0), ("two-step-1", 0, 0.0), ("two-step-1", 1, 1.0),
        ("mc-prime", 0, 1.0), ("mc-prime", 1, 1.0), ("img-color", 0, 0.0), ("img-color", 1, 0.0),
        ("img-shape", 0, 1.0), ("img-shape", 1, 0.0)]
    assert lines[2] == {"benchmark": "tiny", "id": "two-step-1", "sample": 0, "question": "Compute (2 + 3) * 4.",
                        "choices": None, "answer": "20", "response": "\\boxed{20} and then more", "score": 0.0,
                        "finish_reason": "length", "truncated": True, "num_tokens": 10}
    assert lines[4]["choices"] == ["4", "6", "7", "9"] and lines[4]["answer"] == "C"


def test_truncated_responses_may_count(verifier, tiny_items):
    results = evaluate({"tiny": tiny_items}, ScriptedEngine(), SAMPLING, verifier, truncated_is_wrong=False)
    assert results.scores[0].accuracy == 0.6


def test_accuracy_table_and_results_files(tmp_path, verifier, tiny_items):
    free_form = [BenchmarkItem(id="q", question="What is 3 + 4?", answer="7", choices=None, images=(), source="x:1")]
    results = evaluate({"tiny": tiny_items, "math": free_form}, ScriptedEngine(), SAMPLING, verifier)
    table = format_table(results)
    assert table.splitlines()[2:] == [
        "| tiny | 5 | 2 | 50.0% | 80.0% | 10.0% | 10 |",
        "| math | 1 | 2 | 50.0% | 100.0% | 0.0% | 10 |",
        "| macro average | | | 50.0% | | | |",
    ]
    paths = write_results(results, tmp_path, extra={"note": "test"})
    saved = json.loads(paths["json"].read_text())
    assert saved["benchmarks"]["math"]["pass_at_k"] == 1.0 and saved["macro_accuracy"] == 0.5
    assert saved["note"] == "test"
    assert paths["table"].read_text() == table + "\n"


def test_example_yaml_mirrors_the_config():
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    config = from_dict(EvalConfig, raw)
    assert to_dict(config) == raw
    raw["generation"]["temprature"] = 0.5
    with pytest.raises(ValueError, match=r"generation\.temprature"):
        from_dict(EvalConfig, raw)


@pytest.mark.parametrize("override, message", [
    ("benchmarks=[]", "give at least one benchmark"),
    ("benchmarks=[{name: a, path: x}, {name: a, path: y}]", "names must be unique"),
    ("benchmarks=[{name: a, path: x, limt: 3}]", r"benchmarks\[0\]\.limt"),
    ("generation.top_p=0", "generation.top_p=0"),
    ("generation.max_new_tokens=2000", "engine.max_model_len=1024: must exceed generation.max_new_tokens=2000"),
    ("engine.dtype=fp8", "engine.dtype='fp8'"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_yaml(EvalConfig, EXAMPLES / "tiny.yaml", [override])


def test_run_eval_writes_every_output(tmp_path):
    config = load_yaml(EvalConfig, EXAMPLES / "tiny.yaml",
                       [f"output_dir={tmp_path}", "generation.samples_per_prompt=2",
                        f"benchmarks=[{{name: tiny, path: {EXAMPLES / 'tiny_benchmark.jsonl'}, limit: 3}}]"])
    results = commands.run_eval(config, engine=ScriptedEngine())
    assert results.scores[0].items == 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["benchmarks"][0]["limit"] == 3 and saved["benchmarks"]["tiny"]["accuracy"] == 4 / 6
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "results.md").read_text().startswith("| benchmark |")


def test_command_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.eval_main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "mathverse, mathvista, mathvision, problem, generic" in help_text and "generations.jsonl" in help_text
    # `megatron-ovr eval` hands its --config and --set to the eval command line.
    seen = []
    monkeypatch.setattr(commands, "eval_main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["eval", "--config", "c.yaml", "--set", "a=1", "--set", "b=x=y"]) == 0
    assert seen == [["--config", "c.yaml", "--set=a=1", "--set=b=x=y"]]
