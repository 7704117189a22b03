"""Qwen2.5-VL on megatron-core: the model, its layer specs, 3D positions, and the HF reference for parity."""

from .model import Qwen25VLModel, Qwen25VisionModel, build_model_chunks
from .positions import get_rope_index, vision_patch_positions, vision_window_layout

__all__ = [
    "Qwen25VLModel",
    "Qwen25VisionModel",
    "build_model_chunks",
    "get_rope_index",
    "vision_patch_positions",
    "vision_window_layout",
]
