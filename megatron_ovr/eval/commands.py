r"""Command lines of the evaluation stage: ``megatron-ovr eval`` / ``tools/evaluate.py`` (:func:`eval_main`)
and ``tools/analyze_behaviors.py`` (:func:`analyze_main`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from megatron_ovr.config.eval import EvalConfig
from megatron_ovr.config.io import load_yaml, to_dict
from megatron_ovr.rollout.engine import RolloutEngine, SamplingSettings

from .behaviors import count_behaviors, format_report, plot_report, read_responses, summarise
from .benchmarks import LAYOUTS, BenchmarkItem, load_benchmark
from .harness import EvalResults, evaluate, format_table, write_results
from .judge import JudgeCache, JudgeClient, JudgeError
from .judge_server import OFFLINE_JUDGE_MODEL, ChatCompletionsServer, rule_judge_reply

__all__ = ["analyze_main", "eval_main", "run_eval"]

logger = logging.getLogger(__name__)

EVAL_DESCRIPTION = """\
Evaluate an HF checkpoint on math benchmarks through the rollout engine (vLLM), with the recipe's prompt,
scored by the RL reward's verifier. Writes OUTPUT_DIR/results.json, results.md (accuracy table) and
generations.jsonl (every scored response; tools/analyze_behaviors.py reads it).

    megatron-ovr eval --config examples/eval/tiny.yaml --set engine.hf_dir=outputs/tiny/hf
    python tools/evaluate.py --config FILE --set generation.samples_per_prompt=8

Config (YAML, see examples/eval/tiny.yaml):
  engine: {{hf_dir, max_model_len, dtype, options}}   options: extra keyword arguments of build_engine
  benchmarks: [{{name, path, layout, image_root, limit}}, ...]
  generation: {{max_new_tokens, temperature, top_p, samples_per_prompt, seed, batch_size}}
  output_dir, truncated_is_wrong (score cut-off responses 0, as the RL reward), verifier_timeout_s

Benchmark files: .jsonl / .json / .parquet, either our layout (question, answer, optional id, choices,
images) or as MathVista, MathVerse, MathVision, MATH500 and AIME ship them.
Layouts (layout: auto detects them from the columns): {layouts}; see megatron_ovr/eval/benchmarks.py.
"""

ANALYZE_DESCRIPTION = """\
Count cognitive behaviours in saved generations with an LLM judge behind an OpenAI-compatible endpoint:
four visual behaviours and their linguistic counterparts; emergence rate per behaviour and the Behaviour
Transfer Rate (visual rate / linguistic rate). Judge calls are retried, cached in --cache and resumable.
Writes OUTPUT_DIR/behaviors.json, behaviors.md, behaviors.png and behavior_counts.jsonl.

    python tools/analyze_behaviors.py --generations outputs/eval/generations.jsonl --benchmark mathvision \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct --output-dir outputs/behaviors
    python tools/analyze_behaviors.py --generations examples/eval/sample_generations.jsonl --offline-judge \\
        --output-dir outputs/behaviors_demo

--offline-judge starts a loopback server that counts cue phrases by rule (no model; for demos and tests).
The API key, if the endpoint needs one, is read from $JUDGE_API_KEY.
"""


def _load_benchmarks(config: EvalConfig) -> dict[str, list[BenchmarkItem]]:
    return {spec.name: load_benchmark(spec.path, layout=spec.layout, image_root=spec.image_root, limit=spec.limit)
            for spec in config.benchmarks}


def run_eval(config: EvalConfig, engine: Optional[RolloutEngine] = None) -> EvalResults:
    """Loads every benchmark (so a bad file fails before the engine starts), generates, scores and writes
    the outputs. ``engine``: default the vLLM engine built from ``config.engine``."""
    from megatron_ovr.rl.reward import MathVerifyReward

    benchmarks = _load_benchmarks(config)
    generation = config.generation
    if engine is None:
        from megatron_ovr.rollout import build_engine

        # The engine reserves room for the most images any one question has.
        most_images = max(len(item.images) for items in benchmarks.values() for item in items)
        engine = build_engine(model_dir=config.engine.hf_dir, max_model_len=config.engine.max_model_len,
                              dtype=config.engine.dtype, seed=generation.seed,
                              max_images_per_prompt=max(1, most_images), **config.engine.options)
    sampling = SamplingSettings(max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                                top_p=generation.top_p, samples_per_prompt=generation.samples_per_prompt,
                                seed=generation.seed)
    output_dir = Path(config.output_dir)
    with MathVerifyReward(timeout_s=config.verifier_timeout_s) as verifier:
        results = evaluate(benchmarks, engine, sampling, verifier, batch_size=generation.batch_size,
                           truncated_is_wrong=config.truncated_is_wrong,
                           generations_path=output_dir / "generations.jsonl")
    write_results(results, output_dir, extra={"config": to_dict(config)})
    return results


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ovr eval",
                                     description=EVAL_DESCRIPTION.format(layouts=", ".join(LAYOUTS)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML mirroring megatron_ovr/config/eval.py (EvalConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set generation.max_new_tokens=512 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_eval(load_yaml(EvalConfig, args.config, args.set))
    print(format_table(results))
    return 0


def _analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analyze_behaviors", description=ANALYZE_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", required=True,
                        help="JSONL with a 'response' per line (the harness's generations.jsonl)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--benchmark", help="only responses of this benchmark (the paper analyses mathvision)")
    parser.add_argument("--limit", type=int, help="only the first N responses")
    judge = parser.add_mutually_exclusive_group(required=True)
    judge.add_argument("--judge-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    judge.add_argument("--offline-judge", action="store_true", help="rule-based loopback judge (no model)")
    parser.add_argument("--judge-model",
                        help=f"served model name (default with --offline-judge: {OFFLINE_JUDGE_MODEL})")
    parser.add_argument("--cache", help="judge cache JSONL (default: OUTPUT_DIR/judge_cache.jsonl)")
    parser.add_argument("--concurrency", type=int, default=8, help="judge calls in flight (default 8)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="judge reply length limit (default 1024; raise it for reasoning judges)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per-attempt time-out (default 120)")
    parser.add_argument("--max-attempts", type=int, default=4, help="attempts per judge call (default 4)")
    parser.add_argument("--backoff-s", type=float, default=1.0,
                        help="first retry delay, doubled each retry up to 30 s (default 1)")
    return parser


def analyze_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _analyze_parser()
    args = parser.parse_args(argv)
    if args.judge_url and not args.judge_model:
        parser.error("--judge-url needs --judge-model")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    responses = read_responses(args.generations, args.benchmark)[: args.limit]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache = JudgeCache(args.cache or output_dir / "judge_cache.jsonl")
    logger.info("%d responses to judge; %d finished judge calls in %s", len(responses), len(cache), cache.path)

    server = ChatCompletionsServer(rule_judge_reply).start() if args.offline_judge else None
    try:
        client = JudgeClient(base_url=server.base_url if server else args.judge_url,
                             model=args.judge_model or OFFLINE_JUDGE_MODEL, cache=cache,
                             timeout_s=args.timeout_s, max_attempts=args.max_attempts, backoff_s=args.backoff_s,
                             max_tokens=args.max_tokens, api_key=os.environ.get("JUDGE_API_KEY"))
        counts = count_behaviors(responses, client, concurrency=args.concurrency)
    except JudgeError as err:
        print(f"error: {err}")
        return 1
    finally:
        if server is not None:
            server.stop()

    with (output_dir / "behavior_counts.jsonl").open("w", encoding="utf-8") as f:
        for i, response in enumerate(responses):
            f.write(json.dumps({"id": response.id, **{key: values[i] for key, values in counts.items()}}) + "\n")
    report = summarise(counts)
    (output_dir / "behaviors.json").write_text(json.dumps(
        {**report.to_json(), "responses": len(responses), "judge_model": client.model,
         "generations": args.generations, "benchmark": args.benchmark}, indent=2))
    table = format_report(report)
    (output_dir / "behaviors.md").write_text(table + "\n")
    plot_report(report, output_dir / "behaviors.png",
                title=f"Cognitive behaviours{f' on {args.benchmark}' if args.benchmark else ''}")
    print(table)
    return 0
