"""Sample packing: which samples share a row, and the model inputs of a micro-batch of rows.

Contract
--------
* :func:`plan_packed_rows` shuffles the sample order with ``(seed, epoch)`` and packs greedily first-fit
  into rows of ``seq_length`` tokens; :func:`plan_unpacked_rows` puts one sample per row in the same
  shuffled order. Both are pure functions of their arguments. Every sample appears in exactly one row; a
  sample longer than ``seq_length`` counts as ``seq_length`` tokens (it is truncated by :func:`collate`)
  and the number of such samples is logged, never dropped silently.
* :func:`collate` turns rows of ``(token_ids, loss_mask)`` samples into the model's forward inputs
  (``models.qwen2_5_vl.model``): samples laid end to end, then padding; labels are next tokens within a
  sample; segment ids keep packed samples from attending to each other; positions restart at 0 per
  sample. Unpacked batches are rows of one sample through the same function.

Text-only: a sample holding image or video placeholder tokens raises ``NotImplementedError``. The cold
start is language-only and the indexed format stores no pixels; the multimodal path is to carry each
sample's ``image_grid_thw`` in the row and take its positions from ``get_rope_index``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from megatron_ovr.config import Qwen25VLConfig

__all__ = ["collate", "plan_packed_rows", "plan_unpacked_rows"]

logger = logging.getLogger(__name__)

_MODEL_DEFAULTS = Qwen25VLConfig()
_VISUAL_TOKEN_IDS = np.array([_MODEL_DEFAULTS.image_token_id, _MODEL_DEFAULTS.video_token_id])

Sample = tuple[np.ndarray, np.ndarray]


def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed}, epoch={epoch}: both must be >= 0")
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def _clipped_lengths(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if seq_length < 1 or lengths.ndim != 1 or (lengths.size and lengths.min() < 1):
        raise ValueError(f"need seq_length >= 1 and 1-D positive lengths, got seq_length={seq_length}, "
                         f"lengths of shape {lengths.shape} (min {lengths.min() if lengths.size else None})")
    too_long = int(np.count_nonzero(lengths > seq_length))
    if too_long:
        logger.warning("%d of %d samples are longer than seq_length=%d and will be truncated to it",
                       too_long, lengths.size, seq_length)
    return np.minimum(lengths, seq_length)


def first_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Positions of ``sizes`` grouped into bins of ``capacity``, each into the first bin with room.

    A max-tree over every bin's free space finds that bin in O(log n). Bins not opened yet are full of
    free space, so the leftmost bin with room is an open one or else the next one to open.
    """
    leaves = 1
    while leaves < len(sizes):
        leaves *= 2
    free = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for position, size in enumerate(sizes):
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        if node - leaves == len(bins):
            bins.append([])
        bins[node - leaves].append(position)
        free[node] -= size
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def plan_packed_rows(lengths: np.ndarray, seq_length: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Sample indices of each packed row (int64 arrays), for this ``(seed, epoch)``.

    Args:
        lengths: ``[num_samples]`` token count of every sample.
        seq_length: tokens per row.
    """
    clipped = _clipped_lengths(lengths, seq_length)
    order = _epoch_order(clipped.size, seed, epoch)
    return [order[positions] for positions in first_fit(clipped[order].tolist(), seq_length)]


def plan_unpacked_rows(lengths: np.ndarray, seq_length: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One sample per row, in the ``(seed, epoch)`` order (the same order packing starts from)."""
    clipped = _clipped_lengths(lengths, seq_length)
    return [np.array([i]) for i in _epoch_order(clipped.size, seed, epoch)]


def collate(rows: Sequence[Sequence[Sample]], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch of ``b = len(rows)`` rows of ``s = seq_length`` tokens.

    Each row lists its samples ``(token_ids [n], loss_mask [n] bool)``; a sample is cut to ``seq_length``
    tokens, and a row's samples must fit in ``seq_length`` together.

    Returns:
        tokens ``[b, s]`` int64: the samples end to end, then ``pad_id``.
        labels ``[b, s]`` int64: ``tokens[i + 1]`` where position ``i + 1`` is in the same sample, else ``pad_id``.
        loss_mask ``[b, s]`` float32: 1 where ``labels[i]`` is a real next token with loss-mask True.
        segment_ids ``[b, s]`` int64: ``1..k`` for the row's ``k`` samples, 0 for padding.
        position_ids ``[3, b, s]`` int64: ``t = h = w`` = index within the sample (0 on padding).
    """
    shape = (len(rows), seq_length)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, pad_id, dtype=np.int64)
    loss_mask = np.zeros(shape, dtype=np.float32)
    segment_ids = np.zeros(shape, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        cursor = 0
        for segment, (ids, mask) in enumerate(row, start=1):
            ids, mask = ids[:seq_length], mask[:seq_length]
            n = len(ids)
            if cursor + n > seq_length:
                raise ValueError(f"row {r}: its samples hold more than seq_length={seq_length} tokens")
            if np.isin(ids, _VISUAL_TOKEN_IDS).any():
                raise NotImplementedError(
                    f"row {r}, sample {segment}: image/video placeholder tokens found; collate is text-only "
                    f"(the multimodal path takes each sample's positions from get_rope_index with its image grids)"
                )
            end = cursor + n
            tokens[r, cursor:end] = ids
            labels[r, cursor : end - 1] = ids[1:]
            loss_mask[r, cursor : end - 1] = mask[1:]
            segment_ids[r, cursor:end] = segment
            positions[r, cursor:end] = np.arange(n)
            cursor = end
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(np.broadcast_to(positions, (3, *shape)).copy()),
    }
