"""The engine's model directory: what vLLM needs to build Qwen2.5-VL before the first weight sync.

The engine starts with dummy weights (no 15 GB checkpoint written just to be overwritten) from a directory
holding the HF config, the tokenizer files and the image processor's config; the trainer then streams the
actor's weights in. ``ImageProcessor`` reads the same image config, so the trainer's pixel values and patch
grids are those the engine computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_ovr.config import Qwen25VLConfig

# Qwen2.5-VL's preprocessor_config.json (CLIP normalisation); the pixel bounds are per run.
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def preprocessor_config(cfg: Qwen25VLConfig, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    v = cfg.vision
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": _IMAGE_MEAN, "image_std": _IMAGE_STD,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
    }


def write_engine_dir(
    out_dir: str | Path, cfg: Qwen25VLConfig, tokenizer_dir: str | Path, *, min_pixels: int, max_pixels: int
) -> Path:
    """Writes (or refreshes) config, generation config, tokenizer and image processor files in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.bos_token_id,
                  "eos_token_id": [cfg.eos_token_id, cfg.bos_token_id]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    copied = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    for name in copied:
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(cfg, min_pixels, max_pixels), indent=2) + "\n")
    return out_dir


class ImageProcessor:
    """Images -> (pixel_values ``[patches, patch_dim]``, image_grid_thw ``[images, 3]``), exactly as the
    engine's processor resizes and patches them (transformers' Qwen2-VL image processor, same config)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(str(model_dir))

    def __call__(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].long()
