"""Checkpoint formats: streaming HF safetensors directories (``hf``)."""

from .hf import HFCheckpoint, write_hf_checkpoint

__all__ = ["HFCheckpoint", "write_hf_checkpoint"]
