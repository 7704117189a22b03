"""Model FLOPs for MFU: counted explicitly from the config (matmuls only; norms, activations and softmax
are ignored, as in the usual MFU convention).

Per token and decoder layer, forward: QKV ``2 h (n_q + 2 n_kv) d``, attention output ``2 h h``, SwiGLU
``2 * 3 h f``, and attention scores plus weighted values ``2 * 2 s h`` with ``s`` the sequence length
(the full square, though causal masking skips half: the convention Megatron and PaLM report). The LM head
adds ``2 h V``. Training = 3 x forward (backward is twice the forward).
"""

from __future__ import annotations

from typing import Optional

from megatron_ovr.config import TextConfig

# Dense BF16 tensor-core peaks (TFLOP/s) by device-name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def lm_training_flops_per_token(text: TextConfig, seq_length: int) -> float:
    h, d, f = text.hidden_size, text.head_dim, text.intermediate_size
    qkv = 2 * h * (text.num_attention_heads + 2 * text.num_key_value_heads) * d
    out = 2 * h * h
    mlp = 2 * 3 * h * f
    attention = 2 * 2 * seq_length * h
    forward = text.num_layers * (qkv + out + mlp + attention) + 2 * h * text.vocab_size
    return 3.0 * forward


def peak_flops(device_name: str) -> Optional[float]:
    """Peak BF16 FLOP/s of a GPU by name, or None when unknown (then MFU is not reported)."""
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return tflops * 1e12
    return None
