"""Sample packing: which samples share a row, and the model inputs of a micro-batch of rows.

Contract
--------
* :func:`plan_packed_rows` shuffles the sample order with ``(seed, epoch)`` and packs greedily first-fit
  into rows of ``seq_length`` tokens; :func:`plan_unpacked_rows` puts one sample per row in the same
  shuffled order. Both are pure functions of their arguments. Every sample appears in exactly one row; a
  sample longer than ``seq_length`` counts as ``seq_length`` tokens (it is truncated by :func:`collate`)
  and the number of such samples is logged, never dropped silently.
* :func:`collate` turns rows of samples (``SFTSample``: tokens, loss mask, optional images) into the
  model's forward inputs (``models.qwen2_5_vl.model``): samples laid end to end, then padding; labels are
  next tokens within a sample; segment ids keep packed samples from attending to each other; positions
  restart at 0 per sample: ``t = h = w`` = the index for text, and ``get_rope_index`` on the sample alone
  for a sample with images (its 3D M-RoPE positions, exactly as if it were the only sequence). The images'
  patches and grids are concatenated in row-major token order, the order the model fills the image slots.
  Unpacked batches are rows of one sample through the same function.

A sample whose images do not fit in ``seq_length`` cannot be cut (half an image has no grid): ``collate``
raises ``ValueError``; ``SFTDataLoader`` checks every sample's ``image_end`` before training starts.
Video placeholder tokens are refused (no video input in SFT).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from megatron_ovr.config import Qwen25VLConfig

from .indexed import SFTSample

__all__ = ["collate", "plan_packed_rows", "plan_unpacked_rows"]

logger = logging.getLogger(__name__)

_MODEL_DEFAULTS = Qwen25VLConfig()


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


def _sample_positions(ids: np.ndarray, sample: SFTSample, where: str) -> np.ndarray:
    """``[3, n]`` positions of one sample on its own (see module docstring)."""
    grids = sample.image_grid_thw
    num_image_tokens = int(np.count_nonzero(ids == _MODEL_DEFAULTS.image_token_id))
    if np.any(ids == _MODEL_DEFAULTS.video_token_id):
        raise ValueError(f"{where}: video placeholder tokens found; SFT takes no video input")
    if grids is None:
        if num_image_tokens:
            raise ValueError(f"{where}: {num_image_tokens} image placeholder tokens but no images")
        return np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
    # Imported here: the models package imports megatron-core, which text-only data handling never needs.
    from megatron_ovr.models.qwen2_5_vl.positions import get_rope_index

    merge = _MODEL_DEFAULTS.vision.spatial_merge_size
    needed = int(np.prod(grids, axis=1).sum()) // merge**2
    if num_image_tokens != needed:
        raise ValueError(f"{where}: holds {num_image_tokens} of the {needed} image tokens of its image grids "
                         f"{np.asarray(grids).tolist()} (cut through an image by seq_length?)")
    positions, _ = get_rope_index(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None],
                                  torch.as_tensor(np.asarray(grids), dtype=torch.long),
                                  image_token_id=_MODEL_DEFAULTS.image_token_id, spatial_merge_size=merge)
    return positions[:, 0].numpy()


def collate(rows: Sequence[Sequence[SFTSample | tuple]], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch of ``b = len(rows)`` rows of ``s = seq_length`` tokens.

    Each row lists its samples (``SFTSample``, or a plain ``(token_ids [n], loss_mask [n] bool)`` pair for
    text); a text sample is cut to ``seq_length`` tokens, and a row's samples must fit in ``seq_length``
    together.

    Returns:
        tokens ``[b, s]`` int64: the samples end to end, then ``pad_id``.
        labels ``[b, s]`` int64: ``tokens[i + 1]`` where position ``i + 1`` is in the same sample, else ``pad_id``.
        loss_mask ``[b, s]`` float32: 1 where ``labels[i]`` is a real next token with loss-mask True.
        segment_ids ``[b, s]`` int64: ``1..k`` for the row's ``k`` samples, 0 for padding.
        position_ids ``[3, b, s]`` int64: per sample from 0 (see module docstring; 0 on padding).
        pixel_values ``[patches, patch_dim]`` float32 and image_grid_thw ``[images, 3]`` int64: the rows'
        images in order, or None when the micro-batch holds none.
    """
    shape = (len(rows), seq_length)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, pad_id, dtype=np.int64)
    loss_mask = np.zeros(shape, dtype=np.float32)
    segment_ids = np.zeros(shape, dtype=np.int64)
    positions = np.zeros((3, *shape), dtype=np.int64)
    pixels, grids = [], []
    for r, row in enumerate(rows):
        cursor = 0
        for segment, item in enumerate(row, start=1):
            sample = SFTSample(*item)
            ids, mask = sample.token_ids[:seq_length], sample.loss_mask[:seq_length]
            n = len(ids)
            if cursor + n > seq_length:
                raise ValueError(f"row {r}: its samples hold more than seq_length={seq_length} tokens")
            end = cursor + n
            positions[:, r, cursor:end] = _sample_positions(ids, sample, f"row {r}, sample {segment}")
            tokens[r, cursor:end] = ids
            labels[r, cursor : end - 1] = ids[1:]
            loss_mask[r, cursor : end - 1] = mask[1:]
            segment_ids[r, cursor:end] = segment
            if sample.image_grid_thw is not None:
                pixels.append(torch.from_numpy(np.array(sample.pixel_values, dtype=np.float32)))
                grids.append(torch.from_numpy(np.array(sample.image_grid_thw, dtype=np.int64)))
            cursor = end
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(positions),
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_grid_thw": torch.cat(grids) if grids else None,
    }
