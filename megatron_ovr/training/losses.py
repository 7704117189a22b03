"""Loss functions handed to megatron's schedules through ``ModelTrainer.train_step``. They return
``(sum, token count, report)`` so the schedule runs in per-token mode (``calculate_per_token_loss``):
gradients are divided by the number of loss tokens over all micro-batches and data/context-parallel ranks,
whatever the packing."""

from __future__ import annotations

import torch


def masked_token_loss(per_token: dict[str, torch.Tensor], per_token_loss: torch.Tensor):
    """``per_token["loss_mask"]``, per_token_loss: [b, s_local] (this rank's context-parallel chunks).
    Returns (loss sum, token count, {"loss": [sum, count]})."""
    mask = per_token["loss_mask"].to(per_token_loss.dtype)
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return total, count, {"loss": torch.stack([total.detach(), count.detach().float()])}
