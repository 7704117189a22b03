"""PPO math (megatron_ovr.rl.algorithms) on CPU: GAE against a plain per-sequence loop, hand-computed PPO and
value losses with their gradients, whitening (also over a real 2-rank gloo group), metrics edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ovr.rl.algorithms import (
    compute_gae, explained_variance, final_token_rewards, masked_mean, masked_whiten, policy_loss, rollout_stats,
    value_loss,
)

# Rows: padded tail, a hole in the middle, holes and padding together, a single token, nothing at all.
MASK = torch.tensor([
    [1, 1, 1, 1, 0, 0, 0],
    [1, 1, 0, 0, 1, 1, 1],
    [0, 1, 1, 0, 1, 0, 0],
    [1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
], dtype=torch.bool)


def random_mask(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """Right-padded rows of random length with random holes; some rows end up empty or a single token."""
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    padded = torch.arange(length) < lengths[:, None]
    holes = torch.rand(batch, length, generator=generator) < 0.25
    return padded & ~holes


def reference_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Textbook GAE, one sequence at a time, on the compacted list of its valid steps."""
    advantages = torch.zeros_like(values)
    for row in range(values.shape[0]):
        steps = mask[row].nonzero().flatten().tolist()
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[row, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            running = delta + gamma * lam * running
            advantages[row, t] = running
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------------------------- rewards
def test_final_token_rewards_lands_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    rewards = final_token_rewards(scores, MASK)
    expected = torch.zeros(5, 7)
    expected[0, 3], expected[1, 6], expected[2, 4], expected[3, 0] = 1.0, 2.0, 3.0, 4.0
    torch.testing.assert_close(rewards, expected, rtol=0, atol=0)  # the empty row gets nothing
    torch.testing.assert_close(final_token_rewards(scores, MASK.float()), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 1.0), (1.0, 0.0), (0.5, 0.7)])
def test_gae_matches_per_sequence_loop(gamma, lam):
    generator = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    mask = random_mask(generator, batch=16, length=20)
    values = torch.randn(16, 20, generator=generator, dtype=torch.float64)
    rewards = torch.randn(16, 20, generator=generator, dtype=torch.float64) * mask  # dense rewards, not just final

    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)

    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)


def test_gae_ignores_whatever_sits_at_masked_positions():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    rewards = final_token_rewards(torch.randn(5, generator=generator, dtype=torch.float64), MASK)
    junk = torch.randn(5, 7, generator=generator, dtype=torch.float64) * 100 * ~MASK

    clean = compute_gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    dirty = compute_gae(rewards + junk, values + junk, MASK, gamma=0.9, lam=0.8)

    for clean_part, dirty_part in zip(clean, dirty):
        torch.testing.assert_close(dirty_part, clean_part, rtol=0, atol=0)
        assert torch.all(dirty_part[~MASK] == 0)


def test_gae_with_gamma_lambda_one_is_final_reward_minus_value():
    generator = torch.Generator().manual_seed(1)
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    values = torch.rand(5, 7, generator=generator, dtype=torch.float64)

    advantages, returns = compute_gae(final_token_rewards(scores, MASK), values, MASK)

    closed_form = (scores[:, None] - values) * MASK
    torch.testing.assert_close(advantages, closed_form, rtol=0, atol=1e-15)
    torch.testing.assert_close(returns, scores[:, None] * MASK, rtol=0, atol=1e-15)  # every valid step returns R


def test_gae_does_not_track_gradients():
    values = torch.randn(2, 4, requires_grad=True)
    advantages, returns = compute_gae(torch.ones(2, 4), values, torch.ones(2, 4))
    assert not advantages.requires_grad and not returns.requires_grad


# ------------------------------------------------------------------------------------ means and whitening
def test_masked_mean_ignores_masked_entries_and_its_gradient_is_mask_over_count():
    x = torch.tensor([[1.0, 2.0, 1000.0], [3.0, -1000.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    mean = masked_mean(x, mask)
    assert mean.item() == 3.0
    mean.backward()
    torch.testing.assert_close(x.grad, mask / 4.0)


def test_masked_whiten_zero_mean_unit_std_over_masked_entries():
    generator = torch.Generator().manual_seed(2)
    mask = random_mask(generator, batch=32, length=24)
    x = 5.0 + 3.0 * torch.randn(32, 24, generator=generator, dtype=torch.float64)
    x = torch.where(mask, x, 1e6)  # junk where the mask is off must not leak into the statistics

    whitened = masked_whiten(x, mask)

    valid = whitened[mask]
    assert abs(valid.mean().item()) < 1e-12
    assert abs(valid.std(unbiased=False).item() - 1.0) < 1e-8  # population std; eps=1e-8 shifts it by ~1e-10
    assert torch.all(whitened[~mask] == 0)


def test_masked_whiten_of_an_empty_mask_is_all_zero_not_nan():
    whitened = masked_whiten(torch.randn(3, 4), torch.zeros(3, 4))
    assert torch.all(whitened == 0)


def _global_statistics_on_rank(rank: int, world_size: int, port: int, shards: list, out_dir: str) -> None:
    """One data-parallel rank: mean, whitening and the mean's gradient of its own shard over the group."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        x, mask = shards[rank]
        x = x.clone().requires_grad_(True)
        mean = masked_mean(x, mask, group=dist.group.WORLD)
        mean.backward()
        whitened = masked_whiten(x.detach(), mask, group=dist.group.WORLD)
        torch.save({"mean": mean.detach(), "whitened": whitened, "grad": x.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_masked_statistics_over_a_gloo_group_equal_the_concatenated_batch(tmp_path):
    from conftest import free_port

    generator = torch.Generator().manual_seed(3)
    # Unequal shards (rows and tokens per rank), as data-parallel ranks get after packing.
    masks = [random_mask(generator, 3, 10), random_mask(generator, 5, 10)]
    shards = [(torch.randn(m.shape, generator=generator, dtype=torch.float64) * 2 + 1, m) for m in masks]

    mp.spawn(_global_statistics_on_rank, args=(2, free_port(), shards, str(tmp_path)), nprocs=2, join=True)

    x = torch.cat([shard[0] for shard in shards])
    mask = torch.cat(masks)
    whole_mean = masked_mean(x, mask)
    whole_whitened = masked_whiten(x, mask)
    rows = 0
    for rank, (_, shard_mask) in enumerate(shards):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["mean"], whole_mean, rtol=1e-14, atol=0)
        shard_rows = slice(rows, rows + len(shard_mask))
        torch.testing.assert_close(result["whitened"], whole_whitened[shard_rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["grad"], shard_mask.double() / mask.sum(), rtol=1e-14, atol=0)
        rows += len(shard_mask)


# ------------------------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_clipped",
    [
        (1.1, 2.0, -2.2, 0.0),   # A > 0, ratio inside the clip range: plain surrogate
        (1.5, 2.0, -2.4, 1.0),   # A > 0, ratio above 1 + eps: capped at 1.2 * A
        (0.5, 2.0, -1.0, 0.0),   # A > 0, ratio below 1 - eps: min keeps the smaller unclipped term
        (0.5, -2.0, 1.6, 1.0),   # A < 0, ratio below 1 - eps: capped at 0.8 * A
        (1.5, -2.0, 3.0, 0.0),   # A < 0, ratio above 1 + eps: unclipped (pessimistic) term
        (0.9, -2.0, 1.8, 0.0),   # A < 0, inside the clip range
        (1.5, 0.0, 0.0, 0.0),    # no advantage, no loss
    ],
)
def test_policy_loss_hand_computed(ratio, advantage, expected_loss, expected_clipped):
    old_log_probs = torch.tensor([[-1.3]], dtype=torch.float64)
    log_probs = (old_log_probs + math.log(ratio)).requires_grad_(True)

    terms = policy_loss(log_probs, old_log_probs, torch.tensor([[advantage]], dtype=torch.float64), clip_ratio=0.2)
    terms.loss.sum().backward()

    assert terms.loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert terms.clipped.item() == expected_clipped
    # d/dlogp of -ratio * A is -ratio * A; the clipped branch is a constant, so no gradient at all.
    expected_gradient = 0.0 if expected_clipped else -ratio * advantage
    assert log_probs.grad.item() == pytest.approx(expected_gradient, abs=1e-12)
    assert terms.approx_kl.item() == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-12)


def test_policy_loss_is_per_token_and_its_metrics_are_detached():
    generator = torch.Generator().manual_seed(4)
    log_probs = torch.randn(3, 5, generator=generator).requires_grad_(True)
    old_log_probs = log_probs.detach() + 0.3 * torch.randn(3, 5, generator=generator)
    terms = policy_loss(log_probs, old_log_probs, torch.randn(3, 5, generator=generator))
    assert terms.loss.shape == terms.clipped.shape == terms.approx_kl.shape == (3, 5)
    assert terms.loss.requires_grad and not terms.clipped.requires_grad and not terms.approx_kl.requires_grad
    assert torch.all(terms.approx_kl >= 0)
    assert torch.all(policy_loss(old_log_probs, old_log_probs, torch.ones(3, 5)).approx_kl == 0)


# -------------------------------------------------------------------------------------------- value loss
def test_value_loss_without_clipping_is_half_squared_error():
    values = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    returns = torch.tensor([[0.0, 1.0, 0.5]])
    terms = value_loss(values, old_values=torch.full((1, 3), 99.0), returns=returns)
    torch.testing.assert_close(terms.loss, torch.tensor([[0.5, 4.5, 0.0]]))
    assert torch.all(terms.clipped == 0)
    terms.loss.sum().backward()
    torch.testing.assert_close(values.grad, values.detach() - returns)


@pytest.mark.parametrize(
    "value, old_value, target, expected_loss, expected_clipped",
    [
        (1.05, 1.0, 0.0, 0.5 * 1.05**2, 0.0),  # within the clip range: both errors are equal
        (1.5, 1.0, 2.0, 0.5 * 0.8**2, 1.0),    # moved towards the return past the range: clipped error is larger
        (1.5, 1.0, 0.0, 0.5 * 1.5**2, 0.0),    # moved away from the return: the unclipped error is larger
        (0.5, 1.0, 2.0, 0.5 * 1.5**2, 0.0),    # moved away downwards: unclipped again
    ],
)
def test_value_loss_with_clipping(value, old_value, target, expected_loss, expected_clipped):
    def scalar(x: float) -> torch.Tensor:
        return torch.tensor([[x]], dtype=torch.float64)

    values = scalar(value).requires_grad_(True)
    terms = value_loss(values, scalar(old_value), scalar(target), clip_range=0.2)
    terms.loss.sum().backward()
    assert terms.loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert terms.clipped.item() == expected_clipped
    expected_gradient = 0.0 if expected_clipped else value - target
    assert values.grad.item() == pytest.approx(expected_gradient, abs=1e-12)


# ------------------------------------------------------------------------------------------------ metrics
def test_explained_variance_cases():
    generator = torch.Generator().manual_seed(5)
    returns = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    constant = torch.full_like(returns, returns[mask].mean().item())
    assert explained_variance(constant, returns, mask) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(-returns, returns, mask) < 0  # worse than predicting a constant
    junk = torch.where(mask, returns, 1e6)
    assert explained_variance(junk, junk, mask) == pytest.approx(1.0)  # masked entries are ignored


def test_explained_variance_is_nan_without_return_variance_or_tokens():
    assert math.isnan(explained_variance(torch.randn(2, 3), torch.ones(2, 3), torch.ones(2, 3)))
    assert math.isnan(explained_variance(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3)))
    # Every reward 0, returns summed up by GAE in float32: only rounding noise varies (it once logged -4e15).
    values = torch.randn(2, 3)
    returns = 1e-8 * torch.randn(2, 3)
    assert returns.var() > 0 and math.isnan(explained_variance(values, returns, torch.ones(2, 3)))


def test_rollout_stats():
    stats = rollout_stats([10, 30, 20, 40], [False, True, False, True], [1.0, 0.0, 1.0, 0.0])
    assert stats == {
        "response_length/mean": 25.0, "response_length/max": 40.0, "response_length/min": 10.0,
        "truncation_rate": 0.5, "reward/mean": 0.5,
    }
    assert all(type(value) is float for value in stats.values())
    with pytest.raises(ValueError, match="3 lengths, 2 truncation flags"):
        rollout_stats([1, 2, 3], [False, False], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        rollout_stats([], [], [])
    split = rollout_stats([10, 30, 20, 40], [False] * 4, [1.0, 0.0, 1.0, 1.0], [True, True, False, True])
    assert split["reward/image"] == pytest.approx(2 / 3) and split["reward/text"] == 1.0
    assert "reward/text" not in rollout_stats([5, 6], [False, False], [1.0, 0.0], [True, True])
    with pytest.raises(ValueError, match="and 1 image flags"):
        rollout_stats([5, 6], [False, False], [1.0, 0.0], [True])
