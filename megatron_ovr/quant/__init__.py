"""Post-training quantisation (FP8, INT4-AWQ) of Qwen2.5-VL with NVIDIA Model Optimizer, exported as HF
directories that vLLM loads directly: ``quantize`` (calibration on our own data, export), ``layouts`` (the
on-disk formats, the AutoAWQ repack and exact dequantisation), ``calibration`` (dataset files -> model inputs),
``report`` (logit error, size, accuracy and throughput comparisons) and ``backend`` (the one modelopt import).
CLI: ``tools/quantize.py``; modelopt is imported only when a quantisation runs."""

from .quantize import FORMATS, INT4_LAYOUTS, VISION_MODES, QuantizeOptions, QuantizeResult, quantize_hf_dir, quantize_megatron_dir

__all__ = ["FORMATS", "INT4_LAYOUTS", "VISION_MODES", "QuantizeOptions", "QuantizeResult", "quantize_hf_dir",
           "quantize_megatron_dir"]
