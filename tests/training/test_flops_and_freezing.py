"""The MFU FLOP count matches the model's own matmul shapes, and the freeze flags freeze exactly their
parameter groups."""

import pytest

from megatron_ovr.config import ParallelConfig, get_preset
from megatron_ovr.config.sft import ModelSection
from megatron_ovr.training.flops import lm_training_flops, lm_training_flops_per_token, peak_flops
from megatron_ovr.training.core import build_model


def test_flops_count_the_models_matmuls(single_rank_megatron):
    cfg = get_preset("tiny")
    _, [model] = build_model(ModelSection(preset="tiny"), ParallelConfig())
    lm = model.language_model
    # Every 2-D weight of the decoder and the output layer is one matmul per token: 2 FLOPs per weight.
    matmul_weights = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and not n.startswith("embedding"))
    seq = 512
    attention = cfg.text.num_layers * 2 * 2 * seq * cfg.text.hidden_size
    assert lm_training_flops_per_token(cfg.text, seq) == 3 * (2 * matmul_weights + attention)


def test_head_flops_count_only_the_tokens_the_head_ran_at():
    text = get_preset("tiny").text
    per_token, head = lm_training_flops_per_token(text, 512), 3 * 2 * text.hidden_size * text.vocab_size
    assert lm_training_flops(text, 512, tokens=100, head_tokens=100) == 100 * per_token
    assert lm_training_flops(text, 512, tokens=100, head_tokens=30) == 100 * per_token - 70 * head


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None


@pytest.mark.parametrize("flags", [
    dict(freeze_vision=True, freeze_merger=True, freeze_language=False),
    dict(freeze_vision=True, freeze_merger=False, freeze_language=False),
    dict(freeze_vision=False, freeze_merger=False, freeze_language=True),
])
def test_freeze_flags(single_rank_megatron, flags):
    _, [model] = build_model(ModelSection(preset="tiny", **flags), ParallelConfig())
    for name, param in model.named_parameters():
        if name.startswith("vision.merger"):
            frozen = flags["freeze_merger"]
        elif name.startswith("vision."):
            frozen = flags["freeze_vision"]
        else:
            frozen = flags["freeze_language"]
        assert param.requires_grad == (not frozen), name


def test_recompute_flag_reaches_the_decoder(single_rank_megatron):
    _, [model] = build_model(ModelSection(preset="tiny", recompute=True), ParallelConfig())
    config = model.language_model.decoder.config
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "uniform", 1)
