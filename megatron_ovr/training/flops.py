"""Model FLOPs for MFU: counted explicitly from the config (matmuls only; norms, activations and softmax
are ignored, as in the usual MFU convention).

Language model, per token and decoder layer, forward: QKV ``2 h (n_q + 2 n_kv) d``, attention output
``2 h h``, SwiGLU ``2 * 3 h f``, and attention scores plus weighted values ``2 * 2 s h`` with ``s`` the
sequence length (the full square, though causal masking skips half: the convention Megatron and PaLM
report). The LM head adds ``2 h V`` per token it runs at (all of them, or the loss's tokens under a head
mask). Every token of a row counts for the rest, image tokens included (they run through the decoder like
text).

Vision tower, per image (``t x h x w`` patches, ViT width ``c``, SwiGLU width ``g``), forward: the patch
embedding ``2 P c`` per patch (``P`` = flattened patch width); per block and patch QKV ``2 c 3c``,
projection ``2 c c``, SwiGLU ``2 * 3 c g``; attention ``2 * 2 c`` per (query, key) pair the block lets
attend — a window block pairs the patches of each window, a full-attention block those of each frame (the
ViT is not causal, so this count is exact); the merger ``2 (4c)(4c) + 2 (4c) H`` per merged token (``H``
the LM width, four patches per merged token with the 2x2 merge).

Training = 3 x forward (backward is twice the forward), for both towers (everything trained).
"""

from __future__ import annotations

from typing import Iterable, Optional

from megatron_ovr.config import Qwen25VLConfig, TextConfig, VisionConfig

# Dense BF16 tensor-core peaks (TFLOP/s) by device-name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def lm_head_training_flops_per_token(text: TextConfig) -> float:
    return 3.0 * 2 * text.hidden_size * text.vocab_size


def lm_training_flops_per_token(text: TextConfig, seq_length: int) -> float:
    """Decoder and LM head, per token."""
    h, d, f = text.hidden_size, text.head_dim, text.intermediate_size
    qkv = 2 * h * (text.num_attention_heads + 2 * text.num_key_value_heads) * d
    out = 2 * h * h
    mlp = 2 * 3 * h * f
    attention = 2 * 2 * seq_length * h
    return 3.0 * text.num_layers * (qkv + out + mlp + attention) + lm_head_training_flops_per_token(text)


def lm_training_flops(text: TextConfig, seq_length: int, tokens: int, head_tokens: int) -> float:
    """``tokens`` through the decoder, the LM head at ``head_tokens`` of them."""
    head = lm_head_training_flops_per_token(text)
    return tokens * (lm_training_flops_per_token(text, seq_length) - head) + head_tokens * head


def _window_sides(length: int, window: int) -> list[int]:
    """Sides of the windows tiling ``length`` merged tokens from the start (the last one partial)."""
    return [window] * (length // window) + ([length % window] if length % window else [])


def vision_training_flops(vision: VisionConfig, lm_hidden_size: int, image_grids: Iterable[Iterable[int]]) -> float:
    """Training FLOPs of the vision tower (patch embedding, blocks, merger) over these images, each
    ``(t, h, w)`` in patches (``image_grid_thw`` rows)."""
    c, g, m = vision.hidden_size, vision.intermediate_size, vision.spatial_merge_size
    window = vision.window_size // m // vision.patch_size  # window side in merged tokens
    full_blocks = len(vision.fullatt_block_indexes)
    window_blocks = vision.depth - full_blocks
    matmuls_per_patch = 2 * vision.patch_dim * c + vision.depth * (2 * c * 3 * c + 2 * c * c + 2 * 3 * c * g)
    merger_per_token = 2 * (vision.merge_unit * c) ** 2 + 2 * vision.merge_unit * c * lm_hidden_size
    forward = 0.0
    for t, h, w in image_grids:
        patches = t * h * w
        full_pairs = t * (h * w) ** 2
        window_pairs = t * sum((rows * cols * vision.merge_unit) ** 2
                               for rows in _window_sides(h // m, window) for cols in _window_sides(w // m, window))
        attention = 2 * 2 * c * (full_blocks * full_pairs + window_blocks * window_pairs)
        forward += patches * matmuls_per_patch + attention + patches // vision.merge_unit * merger_per_token
    return 3.0 * forward


def qwen2_5_vl_training_flops(
    cfg: Qwen25VLConfig, rows: int, seq_length: int, image_grids: Iterable[Iterable[int]] = ()
) -> float:
    """Training FLOPs of one pass over ``rows`` rows of ``seq_length`` tokens holding these images."""
    language = rows * seq_length * lm_training_flops_per_token(cfg.text, seq_length)
    return language + vision_training_flops(cfg.vision, cfg.text.hidden_size, image_grids)


def peak_flops(device_name: str) -> Optional[float]:
    """Peak BF16 FLOP/s of a GPU by name, or None when unknown (then MFU is not reported)."""
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return tflops * 1e12
    return None
