"""GPU only: the Transformer Engine spec matches the torch-native spec (bf16), so TE and FP8 runs share
one verified model. Skipped without CUDA and TE; results of GPU sessions go to benchmarks/results/."""

import pytest
import torch

from megatron_ovr import platform
from megatron_ovr.config import ParallelConfig, get_preset
from megatron_ovr.mapping import load_hf_weights
from megatron_ovr.models.qwen2_5_vl import reference
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not platform.HAVE_TE, reason="needs Transformer Engine (pip install 'megatron-ovr[gpu]')"),
]


def test_te_spec_matches_torch_spec_in_bf16(single_rank_megatron):
    cfg = get_preset("tiny")
    weights = reference.hf_state_dict(reference.build_hf_model(cfg, seed=0))
    batch = reference.sample_batch(cfg, [[5, (1, 8, 12), 9], [20]], seed=4)
    logits = {}
    for backend in ("torch", "te"):
        [model] = build_model_chunks(cfg, ParallelConfig(), dtype=torch.bfloat16, backend=backend)
        load_hf_weights([model], cfg, weights.__getitem__)
        with torch.no_grad():
            logits[backend] = model.eval()(
                batch.input_ids.cuda(), batch.position_ids.cuda(), batch.segment_ids.cuda(),
                batch.pixel_values.cuda(), batch.image_grid_thw,
            ).float()
    valid = batch.attention_mask.bool().cuda()
    scale = logits["torch"][valid].abs().max()
    diff = (logits["te"][valid] - logits["torch"][valid]).abs().max()
    assert diff <= 0.02 * scale, f"TE vs torch spec: max |diff| {diff:.4f} (logit scale {scale:.2f})"
