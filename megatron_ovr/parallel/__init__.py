"""Parallelism that megatron-core provides only inside Transformer Engine: our torch-native core attention
with segment (packed/varlen/window) masks and context parallelism, and the matching sequence split."""
