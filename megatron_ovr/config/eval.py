"""Configuration of a benchmark evaluation (``megatron-ovr eval``); ``examples/eval/*.yaml`` mirror it field
for field. The benchmark file layouts are documented in ``megatron_ovr/eval/benchmarks.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import DTYPES, require
from .io import from_dict


@dataclass(kw_only=True)
class BenchmarkSpec:
    name: str
    """Names the benchmark in the results table and tags its generations (e.g. ``mathvista``)."""
    path: str
    """A ``.jsonl``, ``.json`` or ``.parquet`` file in a known layout."""
    layout: str = "auto"
    """``auto`` (detect from the columns) or one of mathverse, mathvista, mathvision, problem, generic."""
    image_root: str | None = None
    """Folder that image paths are relative to (default: the file's folder)."""
    limit: int | None = None
    """Evaluate only the first N items (quick runs)."""

    def __post_init__(self) -> None:
        require(bool(self.name), "benchmarks[].name", self.name, "must be a non-empty string")
        require(self.limit is None or self.limit > 0, f"benchmarks[{self.name}].limit", self.limit, "must be positive")


@dataclass(kw_only=True)
class EngineSection:
    hf_dir: str
    """The HF checkpoint to evaluate (e.g. tools/convert_megatron_to_hf.py output), with its tokenizer."""
    max_model_len: int = 8192
    """Prompt plus response tokens per sequence (must exceed generation.max_new_tokens)."""
    dtype: str = "bfloat16"
    """Engine weights' dtype (float32 is the faster one on CPU)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of ``megatron_ovr.rollout.build_engine`` (e.g. gpu_memory_utilization)."""

    def __post_init__(self) -> None:
        require(self.max_model_len > 0, "engine.max_model_len", self.max_model_len, "must be positive")
        require(self.dtype in DTYPES, "engine.dtype", self.dtype, f"choose one of {sorted(DTYPES)}")


@dataclass(kw_only=True)
class GenerationSection:
    max_new_tokens: int = 4096
    temperature: float = 0.0
    """0 is greedy; the RL rollouts sample at 1.0."""
    top_p: float = 1.0
    samples_per_prompt: int = 1
    """k: accuracy is avg@k and pass@k is reported too."""
    seed: int = 1234
    batch_size: int = 64
    """Questions per engine call (progress is reported per call)."""

    def __post_init__(self) -> None:
        require(self.max_new_tokens > 0, "generation.max_new_tokens", self.max_new_tokens, "must be positive")
        require(self.temperature >= 0, "generation.temperature", self.temperature, "must be >= 0")
        require(0 < self.top_p <= 1, "generation.top_p", self.top_p, "must be in (0, 1]")
        require(self.samples_per_prompt > 0, "generation.samples_per_prompt", self.samples_per_prompt,
                "must be positive")
        require(self.batch_size > 0, "generation.batch_size", self.batch_size, "must be positive")


@dataclass(kw_only=True)
class EvalConfig:
    engine: EngineSection
    benchmarks: list[BenchmarkSpec]
    generation: GenerationSection = field(default_factory=GenerationSection)
    output_dir: str = "outputs/eval"
    """Gets results.json, results.md and generations.jsonl."""
    truncated_is_wrong: bool = True
    """Score a response cut at max_new_tokens as 0, as the RL reward does."""
    verifier_timeout_s: float = 5.0
    """Per-answer time limit of the math verifier."""

    def __post_init__(self) -> None:
        # The YAML gives a list of mappings: build (and check) one spec per entry.
        self.benchmarks = [
            spec if isinstance(spec, BenchmarkSpec) else from_dict(BenchmarkSpec, spec, f"benchmarks[{i}]")
            for i, spec in enumerate(self.benchmarks)
        ]
        require(len(self.benchmarks) > 0, "benchmarks", self.benchmarks, "give at least one benchmark")
        names = [spec.name for spec in self.benchmarks]
        require(len(set(names)) == len(names), "benchmarks", names, "benchmark names must be unique")
        require(self.verifier_timeout_s > 0, "verifier_timeout_s", self.verifier_timeout_s, "must be positive")
        require(self.engine.max_model_len > self.generation.max_new_tokens, "engine.max_model_len",
                self.engine.max_model_len, f"must exceed generation.max_new_tokens={self.generation.max_new_tokens} "
                "(the prompt needs room too)")
