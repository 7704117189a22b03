"""An exported quantised directory, run in transformers: its weights dequantised exactly (:mod:`.layouts`) and,
for FP8, its activations fake-quantised with the stored static input scales. Its logits equal the calibrated
fake-quant model's when the export (scales, packing, AWQ folding) is right; the quantiser checks that after
every export, and tests compare it with vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .layouts import dequantized_state_dict, fake_quant_fp8_input

__all__ = ["dequantized_model"]


def dequantized_model(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A transformers ``Qwen2_5_VLForConditionalGeneration`` holding the directory's dequantised weights (eval
    mode), with FP8 activation quantisation emulated by forward pre-hooks."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_ovr.mapping.qwen2_5_vl import canonical_hf_name

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    with torch.device(device):  # built where it runs, in its dtype (a 7B model would not fit twice on the host)
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**config), dtype=dtype).eval()
    tensors, input_scales = dequantized_state_dict(directory, dtype)
    by_disk_name = {canonical_hf_name(name): name for name in model.state_dict()}
    unknown = sorted(set(tensors) - set(by_disk_name))
    if unknown:
        raise KeyError(f"{directory}: tensors the model does not have: {unknown[:5]}")
    state = {by_disk_name[k]: v for k, v in tensors.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.get("tie_word_embeddings"))]
    if missing:
        raise KeyError(f"{directory}: tensors missing from the export: {missing[:5]}")
    modules = dict(model.named_modules())
    for name, scale in input_scales.items():
        module = modules[by_disk_name[f"{name}.weight"][: -len(".weight")]]
        module.register_forward_pre_hook(
            lambda _m, args, s=scale.to(device): (fake_quant_fp8_input(args[0], s), *args[1:]))
    return model
