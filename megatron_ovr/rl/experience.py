"""Rollouts as training data: packing variable-length samples into micro-batches by token budget, moving
per-token quantities between the packed rows the model sees and the sample-major layout the RL math uses,
and the vocab-parallel log-probabilities and entropy of sampled tokens.

Alignment: a sample is ``prompt + response`` tokens. The model's output at position ``i`` scores token
``i + 1`` (``labels``), so response token ``j`` is scored — its log-probability, its value estimate — at
the sample's position ``len(prompt) - 1 + j``. Sample-major tensors are ``[num_samples, max_response_len]``
with a mask of real response tokens; GAE runs there, one trajectory per row, never across packed samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.data.packing import first_fit
from megatron_ovr.models.qwen2_5_vl.positions import get_rope_index


@dataclass
class Sample:
    """One rollout: a prompt (as the engine tokenised it) and one sampled response."""

    prompt_ids: list[int]
    response_ids: list[int]
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Placement:
    """Where a sample sits: micro-batch ``row`` (one packed row each), starting at token ``offset``."""

    row: int
    offset: int


@dataclass
class PackedBatch:
    microbatches: list[dict]
    """Model inputs (``tokens``, ``labels``, ``segment_ids``, ``position_ids``, ``pixel_values``,
    ``image_grid_thw``) and ``action_mask`` (1 where the label is a response token), one row each."""
    placements: list[Placement]
    samples: Sequence[Sample]

    def response_mask(self) -> torch.Tensor:
        """[num_samples, max_response_len] 1.0 on real response tokens."""
        lengths = torch.tensor([len(s.response_ids) for s in self.samples])
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        return (torch.arange(width)[None, :] < lengths[:, None]).float()

    def to_samples(self, per_row: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-token row tensors ``[1, row_length]`` -> sample-major ``[num_samples, max_response_len]``."""
        out = torch.zeros(self.response_mask().shape, dtype=per_row[0].dtype)
        for i, (sample, where) in enumerate(zip(self.samples, self.placements)):
            start = where.offset + len(sample.prompt_ids) - 1
            out[i, : len(sample.response_ids)] = per_row[where.row][0, start : start + len(sample.response_ids)]
        return out

    def to_rows(self, sample_major: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of ``to_samples``: ``[num_samples, max_response_len]`` -> one ``[1, row_length]`` per row
        (zero outside response positions)."""
        rows = [torch.zeros(mb["tokens"].shape, dtype=sample_major.dtype) for mb in self.microbatches]
        for i, (sample, where) in enumerate(zip(self.samples, self.placements)):
            start = where.offset + len(sample.prompt_ids) - 1
            rows[where.row][0, start : start + len(sample.response_ids)] = sample_major[i, : len(sample.response_ids)]
        return rows

    def with_per_token(self, **sample_major: torch.Tensor) -> list[dict]:
        """The micro-batches with extra per-token tensors, given sample-major."""
        extra = {name: self.to_rows(value) for name, value in sample_major.items()}
        return [{**mb, **{name: rows[r] for name, rows in extra.items()}} for r, mb in enumerate(self.microbatches)]


def pack_samples(
    samples: Sequence[Sample], row_length: int, cfg: Qwen25VLConfig, *, pad_id: int, min_rows: int = 1
) -> PackedBatch:
    """First-fit packing of whole samples into rows of ``row_length`` tokens (the micro-batch token budget);
    each sample keeps its own attention segment and its own 3D positions (from ``get_rope_index`` on the
    sample alone, so they restart at 0). ``min_rows``: add empty rows up to this count (the interleaved
    pipeline schedule needs at least as many micro-batches as stages)."""
    too_long = [s.length for s in samples if s.length > row_length]
    if too_long:
        raise ValueError(f"{len(too_long)} sample(s) are longer than the micro-batch budget of {row_length} tokens "
                         f"(longest {max(too_long)}): raise it to at least max prompt + max new tokens")
    bins = first_fit([s.length for s in samples], row_length)
    bins += [[] for _ in range(max(0, min_rows - len(bins)))]
    placements: list[Optional[Placement]] = [None] * len(samples)
    microbatches = []
    for row, members in enumerate(bins):
        tokens = torch.full((1, row_length), pad_id, dtype=torch.long)
        labels = torch.full((1, row_length), pad_id, dtype=torch.long)
        segment_ids = torch.zeros((1, row_length), dtype=torch.long)
        positions = torch.zeros((3, 1, row_length), dtype=torch.long)
        action_mask = torch.zeros((1, row_length), dtype=torch.float32)
        pixels, grids = [], []
        cursor = 0
        for segment, index in enumerate(members, start=1):
            sample = samples[index]
            ids = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long)
            end = cursor + len(ids)
            tokens[0, cursor:end] = ids
            labels[0, cursor:end - 1] = ids[1:]
            segment_ids[0, cursor:end] = segment
            first_action = cursor + len(sample.prompt_ids) - 1
            action_mask[0, first_action:end - 1] = 1.0
            positions[:, 0, cursor:end] = get_rope_index(
                ids[None], sample.image_grid_thw, image_token_id=cfg.image_token_id,
                spatial_merge_size=cfg.vision.spatial_merge_size,
            )[0][:, 0]
            if sample.pixel_values is not None:
                pixels.append(sample.pixel_values)
                grids.append(sample.image_grid_thw)
            placements[index] = Placement(row, cursor)
            cursor = end
        microbatches.append({
            "tokens": tokens, "labels": labels, "segment_ids": segment_ids, "position_ids": positions,
            "action_mask": action_mask,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_grid_thw": torch.cat(grids) if grids else None,
        })
    return PackedBatch(microbatches, placements, samples)


def split_into_minibatches(num_samples: int, parts: int) -> list[list[int]]:
    """Sample indices of ``parts`` contiguous, near-equal mini-batches (one optimizer step each)."""
    if not 1 <= parts <= max(num_samples, 1):
        raise ValueError(f"cannot split {num_samples} samples into {parts} mini-batches")
    bounds = [round(k * num_samples / parts) for k in range(parts + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(parts)]


@torch.no_grad()
def token_log_probs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel ``log p(label)`` and the entropy of the next-token distribution, ``[b, s]`` each, from
    this TP rank's logits ``[b, s, V/tp]`` (a collective over the TP group; no full-vocabulary tensor)."""
    logits = logits.float()
    group = parallel_state.get_tensor_model_parallel_group()
    maximum = logits.max(dim=-1).values
    dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - maximum[..., None]
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
    dist.all_reduce(sums, group=group)
    normaliser, weighted = sums
    entropy = normaliser.log() - weighted / normaliser
    log_probs = -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    return log_probs, entropy
