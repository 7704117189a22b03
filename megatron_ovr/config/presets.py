"""Named model sizes: the real Qwen2.5-VL hyperparameters, plus ``tiny`` for tests and the CPU demo.

Each preset is a plain function returning a fresh config, registered in ``PRESETS``.
"""

from __future__ import annotations

from typing import Callable

from .model import Qwen25VLConfig, TextConfig, VisionConfig

# The 3B/7B towers use a 3420-wide SwiGLU, the 32B/72B towers 3456 (public config.json files).
_VIT_SMALL_FFN = 3420
_VIT_LARGE_FFN = 3456


def _vit(out_hidden_size: int, intermediate_size: int) -> VisionConfig:
    return VisionConfig(out_hidden_size=out_hidden_size, intermediate_size=intermediate_size)


def tiny() -> Qwen25VLConfig:
    """Runs in HF, in megatron-core and in vLLM-CPU (head_dim >= 32), on 2 CPU cores in seconds.

    Keeps the real vocabulary so the real Qwen tokenizer and special token ids apply; 4 heads over 2 KV
    groups so grouped-query attention is exercised and TP=2 divides every width.
    """
    return Qwen25VLConfig(
        vision=VisionConfig(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                            window_size=56, fullatt_block_indexes=(1,)),
        text=TextConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256, vocab_size=151936, mrope_section=(4, 6, 6)),
    )


def qwen2_5_vl_3b() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=_vit(2048, _VIT_SMALL_FFN),
        text=TextConfig(num_layers=36, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
                        intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    )


def qwen2_5_vl_7b() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=_vit(3584, _VIT_SMALL_FFN),
        text=TextConfig(num_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944, vocab_size=152064),
    )


def qwen2_5_vl_32b() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=_vit(5120, _VIT_LARGE_FFN),
        text=TextConfig(num_layers=64, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=27648, vocab_size=152064),
    )


def qwen2_5_vl_72b() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=_vit(8192, _VIT_LARGE_FFN),
        text=TextConfig(num_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=29568, vocab_size=152064),
    )


PRESETS: dict[str, Callable[[], Qwen25VLConfig]] = {
    "tiny": tiny,
    "3b": qwen2_5_vl_3b,
    "7b": qwen2_5_vl_7b,
    "32b": qwen2_5_vl_32b,
    "72b": qwen2_5_vl_72b,
}


def get_preset(name: str) -> Qwen25VLConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
