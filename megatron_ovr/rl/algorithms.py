"""PPO math as small pure functions over tensors (the OVR recipe, DESIGN.md §4).

Shapes: ``B`` sequences by ``T`` response positions. A ``mask`` ([B, T], bool or float) marks the response
tokens that take part in the loss; rows are right-padded and may also have holes (e.g. tool or image tokens
spliced into a response). A masked-out position is a step that does not exist: GAE jumps over it and never
writes to it. Every scalar of the algorithm (``gamma``, ``lam``, ``clip_ratio``, ...) is an explicit
argument, never a config object, and nothing here calls ``.item()`` on a loss path.

The loss functions return PER-TOKEN terms and never reduce: the caller owns normalisation (masking, summing
over tokens and dividing by the global token count, as Megatron's per-token loss path does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "PolicyLossTerms", "ValueLossTerms", "compute_gae", "explained_variance", "final_token_rewards",
    "masked_mean", "masked_whiten", "policy_loss", "rollout_stats", "value_loss",
]


def final_token_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Place each sequence's scalar reward on its last response token.

    Args:
        scores: [B] one reward per sequence (the rule reward of the whole response).
        mask: [B, T] response-token mask.
    Returns:
        [B, T] in ``scores``' dtype: ``scores[b]`` at the last position of row ``b`` whose mask is set, zeros
        elsewhere. A row with no response token gets no reward at all.
    """
    valid = mask.bool()
    # The last set position is the first set one of the flipped row; argmax returns the first maximum.
    last = valid.shape[1] - 1 - valid.flip(1).int().argmax(dim=1)
    rewards = torch.zeros(valid.shape, dtype=scores.dtype, device=scores.device)
    rewards.scatter_(1, last.unsqueeze(1), scores.unsqueeze(1))
    return rewards * valid.any(dim=1, keepdim=True)


@torch.no_grad()
def compute_gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Token-level generalised advantage estimation over the valid steps of each row.

    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``, where "next" is the
    next VALID step of the same row (masked positions are skipped, their rewards ignored) and ``V`` after
    the last valid step is 0 (a finished response is terminal). With the paper's ``gamma = lam = 1`` and a
    reward R on the last token this is ``A_t = R - V_t``.

    Args:
        token_rewards: [B, T] per-token rewards (see :func:`final_token_rewards`).
        values: [B, T] critic values of the rollout (constants: no gradient flows through GAE).
        mask: [B, T] response-token mask.
        gamma: discount factor.
        lam: GAE lambda.
    Returns:
        ``(advantages, returns)``, both [B, T] in ``values``' dtype, ``returns = advantages + values``, both
        exactly zero at masked positions.
    """
    valid = mask.bool()
    rewards = token_rewards.to(values.dtype)
    advantages = torch.zeros_like(values)
    # Carried from the next valid step to the left; a masked step passes them through unchanged.
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        step_valid = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(step_valid, advantage, 0.0)
        next_value = torch.where(step_valid, values[:, t], next_value)
        next_advantage = torch.where(step_valid, advantage, next_advantage)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def masked_mean(x: Tensor, mask: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set, as a 0-dim tensor (NaN if there are none).

    With ``group`` the sum and the count are all-reduced over it first, so every rank gets the mean of the
    global batch. Autograd still works: the result's gradient with respect to this rank's ``x`` is that of
    the global mean (``mask / global_count``); other ranks' contributions enter as constants.
    """
    valid = mask.to(x.dtype)
    local_sum = (x * valid).sum()
    local_count = valid.sum()
    if group is None:
        return local_sum / local_count
    global_stats = torch.stack([local_sum.detach(), local_count])
    dist.all_reduce(global_stats, op=dist.ReduceOp.SUM, group=group)
    global_sum = local_sum + (global_stats[0] - local_sum.detach())
    return global_sum / global_stats[1]


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, group: dist.ProcessGroup | None = None) -> Tensor:
    """Batch-level normalisation: ``(x - mean) / sqrt(var + eps)`` over the masked entries, 0 elsewhere.

    The mean and the (population, ``unbiased=False``) variance are taken over ALL masked entries of the
    batch, over every rank of ``group`` when it is given, so data-parallel ranks normalise identically to
    one rank holding the whole batch. The variance is computed in a second pass around the mean, which
    stays exact when the mean is large compared with the spread.
    """
    valid = mask.bool()
    mean = masked_mean(x, valid, group)
    variance = masked_mean((x - mean) ** 2, valid, group)
    # where(), not a product with the mask: masked entries stay 0 even when the statistics are NaN.
    return torch.where(valid, (x - mean) * torch.rsqrt(variance + eps), 0.0)


@dataclass
class PolicyLossTerms:
    """Per-token PPO actor terms, all [B, T]; masking and reduction are the caller's."""

    loss: Tensor
    """Clipped surrogate ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``; carries the gradient."""
    clipped: Tensor
    """1.0 where the clipped term is the smaller one, so the token contributes no gradient (detached)."""
    approx_kl: Tensor
    """k3 estimator of KL(old || new): ``(ratio - 1) - log(ratio)``, >= 0, unbiased under samples of the
    old policy and lower-variance than k1 = ``-log(ratio)`` (detached: a metric, not a penalty)."""


def policy_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_ratio: float = 0.2
) -> PolicyLossTerms:
    """PPO clipped surrogate per token (no KL penalty, no entropy bonus: the OVR recipe has neither).

    Args:
        log_probs: [B, T] log-probabilities of the sampled tokens under the policy being trained.
        old_log_probs: [B, T] the same under the policy that generated the rollout (constants).
        advantages: [B, T] (normalised) advantages (constants).
        clip_ratio: epsilon of the ratio clip.
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped_objective = ratio * advantages
    clipped_objective = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
    loss = -torch.minimum(unclipped_objective, clipped_objective)
    clipped = (clipped_objective < unclipped_objective).to(log_probs.dtype).detach()
    log_ratio = log_ratio.detach()
    approx_kl = torch.expm1(log_ratio) - log_ratio
    return PolicyLossTerms(loss=loss, clipped=clipped, approx_kl=approx_kl)


@dataclass
class ValueLossTerms:
    """Per-token critic terms, all [B, T]; masking and reduction are the caller's."""

    loss: Tensor
    """``0.5 * (V - R)^2``, or with a clip range the larger of the clipped and unclipped squared errors."""
    clipped: Tensor
    """1.0 where the clipped error is the larger one, so the token contributes no gradient (detached)."""


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float | None = None) -> ValueLossTerms:
    """Critic regression to the GAE returns, optionally with PPO-style value clipping.

    Args:
        values: [B, T] current critic predictions (carry the gradient).
        old_values: [B, T] the critic's predictions at rollout time (constants).
        returns: [B, T] GAE returns (constants).
        clip_range: ``c`` of ``V_old + clip(V - V_old, -c, c)``; None turns clipping off.
    """
    squared_error = (values - returns) ** 2
    if clip_range is None:
        return ValueLossTerms(loss=0.5 * squared_error, clipped=torch.zeros_like(squared_error).detach())
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped_squared_error = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(squared_error, clipped_squared_error)
    clipped = (clipped_squared_error > squared_error).to(values.dtype).detach()
    return ValueLossTerms(loss=loss, clipped=clipped)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens (population variances, in float64).

    1 is a perfect critic, 0 one no better than a constant, negative one worse than a constant. NaN when
    ``Var[R] == 0`` (e.g. every response of the batch got the same reward with gamma = lam = 1) or there
    is no masked token: the ratio is undefined there, and a NaN in the log says so instead of a made-up value.
    """
    valid = mask.bool()
    returns64 = returns.double()[valid]
    residuals = returns64 - values.double()[valid]
    if not returns64.numel():
        return float("nan")
    # Returns computed in float32 (advantages + values) carry rounding noise of ~1e-7 of the values' scale:
    # below that, Var[R] is zero in all but rounding.
    noise = 1e-6 * float(torch.cat([returns64.abs(), values.double()[valid].abs()]).max())
    returns_variance = returns64.var(unbiased=False)
    if not returns_variance > noise**2:
        return float("nan")
    return float(1.0 - residuals.var(unbiased=False) / returns_variance)


def rollout_stats(
    response_lengths: Sequence[int], truncated: Sequence[bool], rewards: Sequence[float],
    with_image: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Per-iteration rollout metrics: response length mean/max/min, share of truncated responses, mean reward,
    and, given ``with_image`` (whether each response's prompt holds an image), the mean reward of image and of
    text-only prompts (``reward/image``, ``reward/text``; each only when such prompts were in the batch).

    All sequences have one entry per response; an empty rollout is a bug upstream and raises.
    """
    count = len(response_lengths)
    if count == 0 or len(truncated) != count or len(rewards) != count \
            or (with_image is not None and len(with_image) != count):
        raise ValueError(
            f"rollout_stats needs one length, truncation flag, reward (and image flag) per response, got "
            f"{count} lengths, {len(truncated)} truncation flags, {len(rewards)} rewards and "
            f"{None if with_image is None else len(with_image)} image flags"
        )
    stats = {
        "response_length/mean": sum(response_lengths) / count,
        "response_length/max": float(max(response_lengths)),
        "response_length/min": float(min(response_lengths)),
        "truncation_rate": sum(map(bool, truncated)) / count,
        "reward/mean": sum(rewards) / count,
    }
    for name, wanted in (("image", True), ("text", False)):
        group = [r for r, image in zip(rewards, with_image or ()) if bool(image) == wanted]
        if group:
            stats[f"reward/{name}"] = sum(group) / len(group)
    return stats
