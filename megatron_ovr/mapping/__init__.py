"""The one HF <-> Megatron name and shape table, and the streaming load / export built on it.

The streaming functions (``stream``) need megatron-core; they are imported on first use, so the table
alone (``qwen2_5_vl``, ``params``) stays cheap to import for model-free tools (the checkpoint converters).
"""

from .qwen2_5_vl import canonical_hf_name, hf_in_memory_name, qwen2_5_vl_mappings

_STREAM = ("export_hf_weights", "load_hf_weights")

__all__ = [
    "canonical_hf_name",
    "hf_in_memory_name",
    "qwen2_5_vl_mappings",
    "export_hf_weights",
    "load_hf_weights",
]


def __getattr__(name: str):
    if name in _STREAM:
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
