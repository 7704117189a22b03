"""The rollout engine seam: everything PPO and evaluation need from a generation engine.

One interface, two implementations behind ``build_engine``: vLLM (``rollout.vllm_engine``, the production
path, colocated with the trainer's ranks) and nothing else yet. Prompts are chat-formatted strings (the
engine's own processor expands each ``<|image_pad|>`` for its image); completions carry the engine's prompt
token ids so the trainer scores exactly the tokens the engine saw.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch


@dataclass
class RolloutRequest:
    prompt: str
    """Chat-formatted prompt text ending with the assistant header; one ``<|vision_start|><|image_pad|>
    <|vision_end|>`` per image."""
    images: Sequence[Any] = ()
    """PIL images, in the order of their placeholders."""


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    samples_per_prompt: int = 1
    seed: Optional[int] = None
    """Seed of this call's sampling (exact resume replays the same rollouts)."""


@dataclass
class Completion:
    prompt_token_ids: list[int]
    """The prompt as the engine tokenised it (image placeholders expanded)."""
    token_ids: list[int]
    log_probs: list[float]
    """The engine's log-probability of each generated token."""
    finish_reason: str
    """'stop' (end-of-sequence or a stop token) or 'length' (hit max_new_tokens: truncated)."""
    text: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class EngineInfo:
    name: str
    details: dict = field(default_factory=dict)


class RolloutEngine(ABC):
    """A generation engine colocated with training. Every method is called by every rank that owns an
    engine, at the same point of the program."""

    info: EngineInfo

    @abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSettings) -> list[list[Completion]]:
        """``samples_per_prompt`` completions for each request, in request order."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the engine's weights in place from full tensors under on-disk HF names."""

    @abstractmethod
    def sleep(self) -> None:
        """Frees the engine's accelerator memory (weights and KV cache) while the trainer runs."""

    @abstractmethod
    def wake_up(self) -> None:
        """Undoes ``sleep`` before the next ``generate`` or ``update_weights``."""

    def close(self) -> None:
        """Releases the engine; call it before the trainer destroys its process groups."""
