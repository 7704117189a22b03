"""Megatron's optimizer (optionally the distributed one) and its LR / weight-decay scheduler."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ovr.config.sft import OptimizerSection


def build_optimizer(model, section: OptimizerSection, train_steps: int, dtype: torch.dtype):
    """(optimizer, scheduler) for the DDP-wrapped model chunks; the LR warms up linearly over
    ``warmup_steps``, then follows ``decay_style`` down to ``min_lr`` at ``train_steps``."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=section.lr,
        min_lr=section.min_lr,
        weight_decay=section.weight_decay,
        adam_beta1=section.adam_beta1,
        adam_beta2=section.adam_beta2,
        adam_eps=section.adam_eps,
        clip_grad=section.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=section.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, list(model))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if section.warmup_steps > 0 else section.lr,
        max_lr=section.lr,
        min_lr=section.min_lr,
        lr_warmup_steps=section.warmup_steps,
        lr_decay_steps=train_steps,
        lr_decay_style=section.decay_style,
        start_wd=section.weight_decay,
        end_wd=section.weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
