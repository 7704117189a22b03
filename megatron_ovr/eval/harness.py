r"""Benchmark evaluation through the rollout engine seam, scored by the RL reward's verifier.

Contract
--------
:func:`evaluate` takes benchmarks (name -> :class:`~megatron_ovr.eval.benchmarks.BenchmarkItem` list), any
:class:`~megatron_ovr.rollout.engine.RolloutEngine` and a scorer with the verifier's
``score_batch(responses, references, truncated, choices) -> list[float]`` (in production
:class:`megatron_ovr.rl.reward.MathVerifyReward`: the exact function that rewards PPO rollouts). Every item
is prompted with :func:`megatron_ovr.data.prompts.build_prompt` (the recipe's prompt, shared with PPO) and
sampled ``samples_per_prompt`` times, in batches of ``batch_size`` items.

Per benchmark it reports ``accuracy`` (mean score over all samples: avg@k), ``pass_at_k`` (share of items
with at least one correct sample), the truncation rate and the mean response length. With
``truncated_is_wrong`` (the default, as in the RL reward) a response cut at ``max_new_tokens`` scores 0
even if it boxed an answer on the way. Each scored sample is one :class:`Generation`, appended to
``generations_path`` (JSONL) as its batch finishes: the behaviour analysis reads that file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Mapping, Optional, Protocol, Sequence

from tqdm import tqdm

from megatron_ovr.data.prompts import build_prompt
from megatron_ovr.rollout.engine import Completion, RolloutEngine, RolloutRequest, SamplingSettings

from .benchmarks import BenchmarkItem

__all__ = ["BenchmarkScore", "EvalResults", "Generation", "Scorer", "evaluate", "format_table", "write_results"]


class Scorer(Protocol):
    """What the harness needs of the verifier (:class:`megatron_ovr.rl.reward.MathVerifyReward`): one score
    per response; ``choices[i]`` not None makes response ``i`` multiple choice with a letter reference."""

    def score_batch(self, responses: Sequence[str], references: Sequence[str], truncated: Sequence[bool],
                    choices: Optional[Sequence[Optional[Sequence[str]]]] = None) -> list[float]: ...


@dataclass(frozen=True)
class Generation:
    """One scored sample: a line of ``generations.jsonl``."""

    benchmark: str
    id: str
    sample: int
    question: str
    choices: Optional[list[str]]
    answer: str
    response: str
    score: float
    finish_reason: str
    truncated: bool
    num_tokens: int


@dataclass(frozen=True)
class BenchmarkScore:
    benchmark: str
    items: int
    samples_per_item: int
    accuracy: float
    """Mean score over all samples (avg@k)."""
    pass_at_k: float
    """Share of items with at least one sample scoring 1."""
    truncated_rate: float
    mean_response_tokens: float
    generation_seconds: float


@dataclass(frozen=True)
class EvalResults:
    scores: list[BenchmarkScore]

    @property
    def macro_accuracy(self) -> float:
        """Unweighted mean of the benchmarks' accuracies (how papers average benchmarks)."""
        return sum(s.accuracy for s in self.scores) / len(self.scores) if self.scores else math.nan

    def to_json(self) -> dict:
        return {"benchmarks": {s.benchmark: asdict(s) for s in self.scores}, "macro_accuracy": self.macro_accuracy}


def _requests(items: Sequence[BenchmarkItem]) -> list[RolloutRequest]:
    return [RolloutRequest(prompt=build_prompt(item.question, len(item.images), item.choices),
                           images=item.load_images()) for item in items]


def _score_batch(name: str, items: Sequence[BenchmarkItem], completions: Sequence[Sequence[Completion]], scorer: Scorer,
                 truncated_is_wrong: bool) -> list[Generation]:
    if len(completions) != len(items):
        raise RuntimeError(f"the engine returned {len(completions)} completion lists for {len(items)} requests")
    samples = [(item, k, completion) for item, item_samples in zip(items, completions)
               for k, completion in enumerate(item_samples)]
    scores = scorer.score_batch(
        [completion.text for _, _, completion in samples],
        [item.answer for item, _, _ in samples],
        [truncated_is_wrong and completion.truncated for _, _, completion in samples],
        # Options known only from the question text or image (None here) leave the letter to math-verify,
        # which matches a boxed letter against the reference letter.
        [item.choices or None for item, _, _ in samples],
    )
    return [Generation(benchmark=name, id=item.id, sample=k, question=item.question,
                       choices=list(item.choices) if item.choices is not None else None, answer=item.answer,
                       response=completion.text, score=float(score), finish_reason=completion.finish_reason,
                       truncated=completion.truncated, num_tokens=len(completion.token_ids))
            for (item, k, completion), score in zip(samples, scores)]


def _summarise(name: str, items: int, samples_per_item: int, generations: Sequence[Generation],
               seconds: float) -> BenchmarkScore:
    total = len(generations)
    solved = {g.id for g in generations if g.score >= 1.0}
    return BenchmarkScore(
        benchmark=name, items=items, samples_per_item=samples_per_item,
        accuracy=sum(g.score for g in generations) / total,
        pass_at_k=len(solved) / items,
        truncated_rate=sum(g.truncated for g in generations) / total,
        mean_response_tokens=sum(g.num_tokens for g in generations) / total,
        generation_seconds=seconds,
    )


def _evaluate_one(name: str, items: Sequence[BenchmarkItem], engine: RolloutEngine, sampling: SamplingSettings,
                  scorer: Scorer, batch_size: int, truncated_is_wrong: bool,
                  sink: Optional[IO[str]]) -> BenchmarkScore:
    generations: list[Generation] = []
    seconds = 0.0
    with tqdm(total=len(items), desc=f"generate {name}", unit="q") as progress:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            requests = _requests(batch)
            began = time.perf_counter()
            completions = engine.generate(requests, sampling)
            seconds += time.perf_counter() - began
            scored = _score_batch(name, batch, completions, scorer, truncated_is_wrong)
            generations.extend(scored)
            if sink is not None:
                sink.writelines(json.dumps(asdict(g), ensure_ascii=False) + "\n" for g in scored)
                sink.flush()
            progress.update(len(batch))
    return _summarise(name, len(items), sampling.samples_per_prompt, generations, seconds)


def evaluate(benchmarks: Mapping[str, Sequence[BenchmarkItem]], engine: RolloutEngine, sampling: SamplingSettings,
             scorer: Scorer, *, batch_size: int = 64, truncated_is_wrong: bool = True,
             generations_path: str | Path | None = None) -> EvalResults:
    """Generates, scores and summarises every benchmark in order (see the module docstring).

    Args:
        benchmarks: name -> items; names key the results and tag each generation.
        batch_size: items per ``engine.generate`` call (each gives ``samples_per_prompt`` completions).
        generations_path: write every scored sample here as JSONL (replaced, then appended batch by batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    sink = None
    if generations_path is not None:
        Path(generations_path).parent.mkdir(parents=True, exist_ok=True)
        sink = Path(generations_path).open("w", encoding="utf-8")
    try:
        scores = [_evaluate_one(name, items, engine, sampling, scorer, batch_size, truncated_is_wrong, sink)
                  for name, items in benchmarks.items()]
    finally:
        if sink is not None:
            sink.close()
    return EvalResults(scores=scores)


def format_table(results: EvalResults) -> str:
    """The per-benchmark accuracy table (Markdown)."""
    rows = ["| benchmark | items | samples | accuracy | pass@k | truncated | mean tokens |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s in results.scores:
        rows.append(f"| {s.benchmark} | {s.items} | {s.samples_per_item} | {100 * s.accuracy:.1f}% | "
                    f"{100 * s.pass_at_k:.1f}% | {100 * s.truncated_rate:.1f}% | {s.mean_response_tokens:.0f} |")
    if len(results.scores) > 1:
        rows.append(f"| macro average | | | {100 * results.macro_accuracy:.1f}% | | | |")
    return "\n".join(rows)


def write_results(results: EvalResults, output_dir: str | Path, extra: Optional[dict] = None) -> dict[str, Path]:
    """Writes ``results.json`` (scores, plus ``extra`` such as the run's config) and ``results.md`` (the table)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md"}
    paths["json"].write_text(json.dumps({**results.to_json(), **(extra or {})}, indent=2))
    paths["table"].write_text(format_table(results) + "\n")
    return paths
