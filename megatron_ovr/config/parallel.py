"""Parallel layout: the sizes handed to megatron-core's ``parallel_state``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP over the TP group (needs tensor_parallel > 1)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved schedule); None for the plain schedule."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name}={value!r}: must be a positive integer")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel=True: needs parallel.tensor_parallel > 1")
        if self.virtual_pipeline is not None and (self.virtual_pipeline < 2 or self.pipeline_parallel < 2):
            raise ValueError(
                f"parallel.virtual_pipeline={self.virtual_pipeline!r}: needs >= 2 chunks and pipeline_parallel > 1"
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel
