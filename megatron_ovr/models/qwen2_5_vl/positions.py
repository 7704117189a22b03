"""Position bookkeeping for Qwen2.5-VL: ViT patch positions, window layout and 3D M-RoPE indices.

Contract
--------
Pure tensor functions of the image grids (and, for the language model, of the token ids). They
import neither Megatron nor transformers, hold no state and allocate their outputs on the device
of their inputs. Every integer output is a ``torch.long`` tensor.

The results are defined to match Hugging Face ``transformers`` (5.19) Qwen2.5-VL exactly:

* :func:`vision_patch_positions` equals ``vision_utils.get_vision_position_ids`` (the (row, col)
  fed to the ViT 2D rotary embedding).
* :func:`vision_window_layout` equals ``vision_utils.get_vision_window_index`` together with
  ``get_vision_attention_seqlens``, with the ``cu_seqlens`` boundaries expressed as one segment
  id per patch (what packed / masked attention kernels consume).
* :func:`get_rope_index` equals ``Qwen2_5_VLModel.get_rope_index`` for image inputs (no video),
  with stricter validation of image-token counts against the grids.

Conventions shared by all functions:

* ``grid_thw`` is ``[num_images, 3]`` holding ``(t, h, w)`` in ViT patches; ``h`` and ``w`` must
  be multiples of ``spatial_merge_size`` (``m``). An image yields ``t*h*w`` patches and
  ``t*h*w/m**2`` merged tokens (= language-model image tokens).
* Patches are in the order of the processor's ``pixel_values``: image by image, frame by frame,
  and inside a frame in ``m x m`` blocks (blocks row-major, patches row-major inside a block), so
  that every ``m**2`` consecutive patches form one merged token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "VisionWindowLayout",
    "get_rope_index",
    "vision_patch_positions",
    "vision_window_layout",
]


def _validated_grid(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """Return ``grid_thw`` as a long ``[num_images, 3]`` tensor after checking it is usable."""
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    grid = torch.as_tensor(grid_thw).long()
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"grid_thw must have shape [num_images, 3], got {tuple(grid.shape)}")
    if grid.numel() and bool((grid <= 0).any()):
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    if grid.numel() and bool((grid[:, 1:] % spatial_merge_size != 0).any()):
        raise ValueError(
            f"grid_thw heights and widths must be multiples of spatial_merge_size={spatial_merge_size}, "
            f"got {grid.tolist()}"
        )
    return grid


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``[n] -> [n]``: sum of the elements strictly before each position."""
    return torch.cumsum(x, dim=0) - x


def vision_patch_positions(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(row, col) of every ViT patch, in ``pixel_values`` order.

    Args:
        grid_thw: ``[num_images, 3]`` of ``(t, h, w)`` in patches.
        spatial_merge_size: ``m``; ``h`` and ``w`` must be multiples of it.

    Returns:
        LongTensor ``[num_patches, 2]`` with ``num_patches = sum(t*h*w)``; column 0 is the patch
        row, column 1 the patch column. Frames of an image repeat the same positions, since the
        ViT rotary embedding is 2D only (time is encoded by the LLM's M-RoPE, not here).
    """
    m = spatial_merge_size
    grid = _validated_grid(grid_thw, m)
    t, h, w = grid.unbind(-1)
    patches_per_image = t * h * w
    total = int(patches_per_image.sum())
    image = torch.repeat_interleave(torch.arange(grid.shape[0], device=grid.device), patches_per_image)
    local = torch.arange(total, device=grid.device) - _exclusive_cumsum(patches_per_image)[image]
    # All frames share positions, so only the index inside the frame matters.
    in_frame = local % (h * w)[image]
    blocks_per_row = (w // m)[image]
    in_col = in_frame % m
    in_row = (in_frame // m) % m
    block = in_frame // (m * m)
    row = (block // blocks_per_row) * m + in_row
    col = (block % blocks_per_row) * m + in_col
    return torch.stack([row, col], dim=-1)


@dataclass(frozen=True, eq=False)
class VisionWindowLayout:
    """Token permutation and attention segments of the Qwen2.5-VL window-attention ViT.

    ``N`` below is the number of merged tokens (``sum(t*h*w) / m**2``) and ``P = N * m**2`` the
    number of patches. The ViT runs on patches permuted by ``window_index`` (applied on the
    ``[N, m**2, hidden]`` view), so both segment-id tensors are indexed in that permuted order.

    Attributes:
        window_index: LongTensor ``[N]``; ``permuted = merged[window_index]`` makes every attention
            window contiguous.
        window_segment_ids: LongTensor ``[P]``; window id (0, 1, 2, ... without gaps, non-decreasing)
            of each permuted patch. Windowed blocks attend only within equal ids.
        image_segment_ids: LongTensor ``[P]``; id of the frame (counted over all images, without
            gaps, non-decreasing) of each permuted patch. Full-attention blocks attend only within
            equal ids; HF attends per frame, not per image, when ``t > 1``.
        reverse_index: LongTensor ``[N]``; inverse permutation, ``merged = permuted[reverse_index]``.
    """

    window_index: torch.Tensor
    window_segment_ids: torch.Tensor
    image_segment_ids: torch.Tensor
    reverse_index: torch.Tensor


def vision_window_layout(
    grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int
) -> VisionWindowLayout:
    """Window permutation and segment ids for the Qwen2.5-VL ViT.

    Windows are ``window_size // spatial_merge_size // patch_size`` merged tokens on a side
    (``window_size`` is in pixels). Per image and frame the windows tile the merged grid from the
    top-left corner, so those on the bottom/right border are partial when the side does not
    divide. Windows are ordered image, frame, window row, window column; tokens inside a window
    keep their row-major order.

    Args:
        grid_thw: ``[num_images, 3]`` of ``(t, h, w)`` in patches.
        spatial_merge_size: ``m``; ``h`` and ``w`` must be multiples of it.
        window_size: attention window side in pixels (112 for released checkpoints).
        patch_size: ViT patch side in pixels (14 for released checkpoints).

    Returns:
        :class:`VisionWindowLayout` (shapes documented there).
    """
    m = spatial_merge_size
    grid = _validated_grid(grid_thw, m)
    side = window_size // m // patch_size
    if side < 1:
        raise ValueError(
            f"window_size={window_size} is smaller than one merged token "
            f"(spatial_merge_size={m} x patch_size={patch_size})"
        )
    device = grid.device
    t, h, w = grid.unbind(-1)
    rows, cols = h // m, w // m
    tokens_per_frame = rows * cols
    tokens_per_image = t * tokens_per_frame
    total = int(tokens_per_image.sum())

    image = torch.repeat_interleave(torch.arange(grid.shape[0], device=device), tokens_per_image)
    local = torch.arange(total, device=device) - _exclusive_cumsum(tokens_per_image)[image]
    frame = local // tokens_per_frame[image]
    row = (local // cols[image]) % rows[image]
    col = local % cols[image]

    # Ceil division: border windows exist (partial) whenever a side does not divide.
    window_cols = (cols + side - 1) // side
    windows_per_frame = ((rows + side - 1) // side) * window_cols
    window_base = _exclusive_cumsum(t * windows_per_frame)
    # Every window of the ceil-divided grid holds at least its top-left token, so these ids are
    # gap-free, which lets them serve directly as segment ids.
    window_id = (
        window_base[image]
        + frame * windows_per_frame[image]
        + (row // side) * window_cols[image]
        + col // side
    )
    # Tokens are enumerated row-major within each frame, so a stable sort on the window id alone
    # keeps them row-major inside their window.
    window_index = torch.sort(window_id, stable=True).indices
    frame_id = _exclusive_cumsum(t)[image] + frame

    reverse_index = torch.empty_like(window_index)
    reverse_index[window_index] = torch.arange(total, device=device)
    merge_unit = m * m
    return VisionWindowLayout(
        window_index=window_index,
        window_segment_ids=window_id[window_index].repeat_interleave(merge_unit),
        image_segment_ids=frame_id[window_index].repeat_interleave(merge_unit),
        reverse_index=reverse_index,
    )


def _true_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[n]`` bool -> list of half-open ``(start, end)`` intervals where ``mask`` is True."""
    pad = mask.new_zeros(1, dtype=torch.long)
    edges = torch.diff(mask.long(), prepend=pad, append=pad)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D M-RoPE position ids (temporal, height, width) and rope deltas for an image+text batch.

    Rules, applied to each row's real tokens (``attention_mask == 1``) in order, with a running
    position ``p`` starting at 0:

    * a text token gets ``(p, p, p)`` and advances ``p`` by 1;
    * an image of grid ``(t, h, w)`` occupies ``t*(h/m)*(w/m)`` consecutive ``image_token_id``
      tokens enumerated frame, row, column (merged units); the token at ``(f, r, c)`` gets
      ``(p + f, p + r, p + c)`` and the image advances ``p`` by ``max(h, w) / m``. The frame count
      does not enter the advance (HF 5.19 rule), so for ``t > max(h, w)/m`` the temporal ids of
      late frames reach past the following text positions.

    Images are taken from ``image_grid_thw`` in order across the whole batch, row after row. A run
    of adjacent image tokens may hold several images; it is split by the grids' token counts.
    Padding positions (``attention_mask == 0``) are left at 0, as HF does.

    Args:
        input_ids: LongTensor ``[b, s]``.
        image_grid_thw: LongTensor ``[num_images, 3]`` of ``(t, h, w)`` in ViT patches, or None
            when the batch holds no image token.
        image_token_id: id of the image placeholder token.
        spatial_merge_size: ``m``.
        attention_mask: ``[b, s]`` of 0/1, or None when every token is real. Any padding side.

    Returns:
        ``(position_ids, rope_deltas)``: LongTensor ``[3, b, s]`` and LongTensor ``[b, 1]`` where
        ``rope_deltas[i] = max(position_ids of row i) + 1 - (number of real tokens in row i)``, the
        offset that continues row ``i`` with plain 1D positions during generation (0 for a row
        without real tokens).

    Raises:
        ValueError: if a row's image tokens cannot be split exactly into the next grids' token
            counts (message names the row, expected and found counts), if image tokens remain
            after all grids are used, or if grids remain unused after the last row.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    m = spatial_merge_size
    device = input_ids.device
    batch, seq = input_ids.shape
    grids: list[tuple[int, int, int]] = []
    if image_grid_thw is not None:
        grids = [tuple(g) for g in _validated_grid(image_grid_thw, m).tolist()]

    position_ids = torch.zeros(3, batch, seq, dtype=torch.long, device=device)
    rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    next_grid = 0
    for b in range(batch):
        keep = attention_mask[b].bool() if attention_mask is not None else None
        ids = input_ids[b] if keep is None else input_ids[b][keep]
        n = ids.numel()
        if n == 0:
            continue
        is_image = ids == image_token_id

        # Each text token advances the running position by 1; an image advances it once, by
        # max(h, w)/m, charged on its last token so that an exclusive cumsum yields every
        # token's start position (the image's own tokens all see the same start).
        advance = (~is_image).long()
        offsets = torch.zeros(3, n, dtype=torch.long, device=device)
        for start, end in _true_runs(is_image):
            cursor = start
            while cursor < end:
                if next_grid >= len(grids):
                    raise ValueError(
                        f"row {b}: image tokens at positions {cursor}..{end - 1} (of the real tokens) have no "
                        f"image_grid_thw entry left: expected {len(grids)} images in total, found more "
                        f"({int(is_image.sum())} image tokens in this row)"
                    )
                t, h, w = grids[next_grid]
                rows, cols = h // m, w // m
                count = t * rows * cols
                if cursor + count > end:
                    raise ValueError(
                        f"row {b}: image {next_grid} with grid (t={t}, h={h}, w={w}) expects {count} "
                        f"consecutive image tokens, found {end - cursor} (run of {end - start} image tokens "
                        f"starting at real-token position {start})"
                    )
                j = torch.arange(count, device=device)
                offsets[0, cursor : cursor + count] = j // (rows * cols)
                offsets[1, cursor : cursor + count] = (j // cols) % rows
                offsets[2, cursor : cursor + count] = j % cols
                advance[cursor + count - 1] = max(rows, cols)
                cursor += count
                next_grid += 1

        positions = _exclusive_cumsum(advance) + offsets
        if keep is None:
            position_ids[:, b] = positions
        else:
            position_ids[:, b, keep] = positions
        rope_deltas[b, 0] = positions.max() + 1 - n

    if next_grid != len(grids):
        raise ValueError(
            f"image_grid_thw has {len(grids)} entries but input_ids hold image tokens for {next_grid} images"
        )
    return position_ids, rope_deltas
