"""Typed configuration: model hyperparameters and presets."""

from .parallel import ParallelConfig
from .model import Qwen25VLConfig, TextConfig, VisionConfig
from .presets import PRESETS, get_preset

__all__ = ["ParallelConfig", "Qwen25VLConfig", "TextConfig", "VisionConfig", "PRESETS", "get_preset"]
