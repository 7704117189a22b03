"""The HF ``transformers`` reference model and sample batches, for parity checks (tests and
``tools/compare_hf_megatron.py``). transformers is imported lazily: training never needs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.mapping.qwen2_5_vl import canonical_hf_name

from .positions import get_rope_index


def build_hf_model(cfg: Qwen25VLConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised HF ``Qwen2_5_VLForConditionalGeneration`` of this config (eval mode)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    hf_config = Qwen2_5_VLConfig(**cfg.to_hf_config())
    model = Qwen2_5_VLForConditionalGeneration(hf_config).to(dtype).eval()
    # HF initialises norms to ones and biases to zeros: randomise them so parity tests see every weight.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under on-disk checkpoint names."""
    return {canonical_hf_name(k): v for k, v in model.state_dict().items()}


def hf_named_parameters(model):
    """``named_parameters`` under on-disk checkpoint names."""
    return [(canonical_hf_name(k), p) for k, p in model.named_parameters()]


@dataclass
class SampleBatch:
    """One batch in both models' terms. ``attention_mask`` is HF's 0/1 padding mask; ``segment_ids`` is
    ours (0 marks padding, 1 the sample)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]

    @property
    def segment_ids(self) -> torch.Tensor:
        return self.attention_mask.long()

    def select_rows(self, start: int, stop: int, cfg: Qwen25VLConfig) -> "SampleBatch":
        """Rows [start, stop) with their own images (a micro-batch)."""
        rows = slice(start, stop)
        pixel_values = grid = None
        if self.image_grid_thw is not None:
            # Images are stored in row order; walk them until each row's image tokens are accounted for.
            tokens = (self.image_grid_thw.prod(-1) // cfg.vision.merge_unit).tolist()
            patches = self.image_grid_thw.prod(-1).tolist()
            per_row = (self.input_ids == cfg.image_token_id).sum(-1).tolist()
            first_image, first_patch = 0, 0
            for row_tokens in per_row[:start]:
                while row_tokens > 0:
                    row_tokens -= tokens[first_image]
                    first_patch += patches[first_image]
                    first_image += 1
            last_image, last_patch = first_image, first_patch
            for row_tokens in per_row[rows]:
                while row_tokens > 0:
                    row_tokens -= tokens[last_image]
                    last_patch += patches[last_image]
                    last_image += 1
            if last_image > first_image:
                grid = self.image_grid_thw[first_image:last_image]
                pixel_values = self.pixel_values[first_patch:last_patch]
        return SampleBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[:, rows], pixel_values, grid)


def sample_batch(
    cfg: Qwen25VLConfig,
    rows: Sequence[Sequence],
    *,
    pad_to: Optional[int] = None,
    seed: int = 0,
) -> SampleBatch:
    """Builds a right-padded batch. Each row is a list of items: an int n (n random text tokens) or a
    (t, h, w) patch grid (an image: vision_start, t*h*w/merge^2 image pads, vision_end)."""
    gen = torch.Generator().manual_seed(seed)
    unit = cfg.vision.merge_unit
    # Text tokens stay below every special id, so random text never forges an image slot.
    text_vocab = min(cfg.bos_token_id, cfg.eos_token_id, cfg.image_token_id, cfg.video_token_id,
                     cfg.vision_start_token_id, cfg.vision_end_token_id)
    ids_rows, grids = [], []
    for row in rows:
        ids: list[int] = []
        for item in row:
            if isinstance(item, int):
                ids += torch.randint(0, text_vocab, (item,), generator=gen).tolist()
            else:
                t, h, w = item
                grids.append([t, h, w])
                ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // unit) + [cfg.vision_end_token_id]
        ids_rows.append(ids)
    length = max(pad_to or 0, max(len(r) for r in ids_rows))
    input_ids = torch.full((len(rows), length), cfg.bos_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(ids_rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    pixel_values = None
    if grid is not None:
        num_patches = int(grid.prod(-1).sum())
        pixel_values = torch.randn(num_patches, cfg.vision.patch_dim, generator=gen)
    position_ids, _ = get_rope_index(
        input_ids, grid, image_token_id=cfg.image_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
        attention_mask=attention_mask,
    )
    return SampleBatch(input_ids, attention_mask, position_ids, pixel_values, grid)


@torch.no_grad()
def hf_logits(model, batch: SampleBatch) -> torch.Tensor:
    """HF logits [b, s, V] with our 3D positions passed explicitly (HF falls back to 1D positions
    without ``mm_token_type_ids``)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
    )
    return out.logits
