"""Test-only model configs."""

import dataclasses

from megatron_ovr.config import get_preset


def layout_config():
    """The tiny preset with 4 decoder layers (so PP=2 x virtual 2 has a layer per chunk) and a 4k
    vocabulary (the real 152k one makes every multi-process run move ~300 MB of embedding tensors)."""
    cfg = get_preset("tiny")
    return dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, num_layers=4, vocab_size=4096),
        image_token_id=4001,
        video_token_id=4002,
        vision_start_token_id=4003,
        vision_end_token_id=4004,
        bos_token_id=4005,
        eos_token_id=4006,
    )
