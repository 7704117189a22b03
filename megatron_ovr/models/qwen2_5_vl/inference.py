"""Forward-only inference through megatron-core's real pipeline schedule, returning full logits.

``forward_logits`` is a collective over the whole model-parallel group (every TP/PP/CP rank of a data-parallel
replica calls it with the same batch). It runs the batch as one micro-batch through ``get_forward_backward_func``
(so the pipeline's point-to-point path is the one training uses; plain and interleaved schedules), then on the last pipeline stage gathers the
vocabulary shards over TP and the load-balanced sequence chunks over CP: every last-stage rank gets the full
``[b, s, V]`` logits, the other stages get None.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ovr import platform
from megatron_ovr.parallel.context_parallel import gather_from_context_parallel

from .reference import SampleBatch


def _gather_full_logits(local_logits: torch.Tensor, non_loss_data: bool) -> torch.Tensor:
    """[b, s/cp, V/tp] on this rank -> [b, s, V] (collective over the TP and CP groups). The schedule calls
    it with ``non_loss_data=True`` under ``collect_non_loss_data``."""
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(local_logits)
    return gather_from_context_parallel(logits, 1, parallel_state.get_context_parallel_group())


@torch.no_grad()
def forward_logits(
    model_chunks: Sequence[torch.nn.Module], batch: SampleBatch, seq_length: int
) -> Optional[torch.Tensor]:
    """Full logits ``[b, s, V]`` of ``batch`` on every last-stage rank, None on the other stages.

    ``seq_length`` is the batch's (padded) length: the schedule sizes pipeline messages from it, and it must
    be a multiple of ``2 * context_parallel`` (times ``tensor_parallel`` with sequence parallelism).
    """
    if batch.input_ids.shape[1] != seq_length:
        raise ValueError(f"seq_length={seq_length} but the batch has {batch.input_ids.shape[1]} positions")
    device = platform.default_device()
    inputs = [t.to(device) if t is not None else None for t in
              (batch.input_ids, batch.position_ids, batch.segment_ids, batch.pixel_values, batch.image_grid_thw)]

    def forward_step(data_iterator, module):
        return module(*inputs), _gather_full_logits

    # The interleaved (virtual-pipeline) schedule needs at least PP micro-batches: it runs the batch that
    # many times and the first result is kept.
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[None] * len(model_chunks),  # forward_step closes over the one batch
        model=list(model_chunks),
        num_microbatches=pp_size if len(model_chunks) > 1 else 1,
        seq_length=seq_length,
        micro_batch_size=batch.input_ids.shape[0],
        forward_only=True,
        # megatron's inference path: the schedule hands our gathered logits back instead of treating
        # them as a loss.
        collect_non_loss_data=True,
    )
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None
