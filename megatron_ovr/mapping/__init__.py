"""The one HF <-> Megatron name and shape table, and the streaming load / export built on it."""

from .qwen2_5_vl import canonical_hf_name, hf_in_memory_name, qwen2_5_vl_mappings
from .stream import export_hf_weights, load_hf_weights

__all__ = [
    "canonical_hf_name",
    "hf_in_memory_name",
    "qwen2_5_vl_mappings",
    "export_hf_weights",
    "load_hf_weights",
]
