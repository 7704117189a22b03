"""Checkpoint formats: streaming HF safetensors directories (``hf``), megatron ``torch_dist`` directories read
and written without a model (``dist_format``, ``megatron_dist``), and the conversions between them
(``convert``). Nothing here imports megatron-core."""

from .hf import HFCheckpoint, write_hf_checkpoint

__all__ = ["HFCheckpoint", "write_hf_checkpoint"]
