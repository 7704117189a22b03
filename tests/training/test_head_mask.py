"""The output head at selected positions only (``head_mask``), as PPO runs the actor and the critic: the same
log-probabilities, entropies and values at those positions as the full head, zero elsewhere, and the same
optimizer step. The parallel layouts (SP gather, CP split, pipeline stages) are in
tests/models/test_parallel_layouts.py."""

import pytest
import torch

from megatron_ovr.config import ParallelConfig
from megatron_ovr.config.sft import ModelSection, OptimizerSection
from megatron_ovr.rl.driver import reduce_log_probs_and_entropy, reduce_values
from megatron_ovr.rl.experience import Sample, pack_samples
from megatron_ovr.training.core import ModelTrainer
from megatron_ovr.training.losses import masked_token_loss


def packed_rollouts(cfg):
    """Three samples over two rows (one row holds two), with padding at the end of each row."""
    samples = [Sample(list(range(100, 110)), [7, 8, 9]), Sample([200, 201, 202], [5, 6]),
               Sample(list(range(300, 312)), [11, 12, 13, 14])]
    return pack_samples(samples, 20, cfg, pad_id=cfg.bos_token_id)


@pytest.mark.parametrize("head", ["lm", "value"])
def test_forward_only_at_the_head_mask_equals_the_full_head(single_rank_megatron, tiny_hf_dir, head):
    trainer = ModelTrainer(ModelSection(hf_dir=str(tiny_hf_dir)), ParallelConfig(), OptimizerSection(),
                           total_steps=1, head=head, seed=0)
    packed = packed_rollouts(trainer.model_cfg)
    reduce, outputs = (reduce_log_probs_and_entropy, 2) if head == "lm" else (reduce_values, 1)
    full = trainer.forward_only(packed.microbatches, reduce, num_outputs=outputs)
    selected = trainer.forward_only(packed.microbatches, reduce, num_outputs=outputs, head_mask="action_mask")
    for batch, dense, sparse in zip(packed.microbatches, full, selected):
        mask = batch["action_mask"].bool()
        assert 0 < mask.sum() < mask.numel()
        torch.testing.assert_close(sparse[:, mask], dense[:, mask], rtol=1e-6, atol=1e-6)
        assert torch.equal(sparse[:, ~mask], torch.zeros_like(sparse[:, ~mask]))


@pytest.mark.parametrize("head", ["lm", "value"])
def test_a_step_at_the_head_mask_equals_the_full_heads_step(single_rank_megatron, tiny_hf_dir, head):
    def loss(local, output):  # per-token LM loss, or values pulled towards 1
        return masked_token_loss(local, output if head == "lm" else (output.float() - 1) ** 2)

    grads, metrics = [], []
    for head_mask in (None, "action_mask"):
        trainer = ModelTrainer(ModelSection(hf_dir=str(tiny_hf_dir)), ParallelConfig(), OptimizerSection(),
                               total_steps=1, head=head, seed=0)
        batches = [{**b, "loss_mask": b["action_mask"]} for b in packed_rollouts(trainer.model_cfg).microbatches]
        result = trainer.train_step(batches, loss, ("loss_mask",), head_mask=head_mask)
        loss_tokens = int(sum(b["loss_mask"].sum() for b in batches))
        assert result.head_tokens == (loss_tokens if head_mask else result.tokens) and loss_tokens < result.tokens
        metrics.append((result.loss, result.tokens, result.grad_norm))
        # Compared before Adam: its first update is about lr * sign(grad), which amplifies rounding in tiny grads.
        grads.append({name: p.main_grad.clone() for name, p in trainer.chunks[0].named_parameters() if p.requires_grad})
    (full_loss, full_tokens, full_norm), (loss_at_mask, tokens_at_mask, norm_at_mask) = metrics
    assert tokens_at_mask == full_tokens and full_norm > 0
    torch.testing.assert_close(loss_at_mask, full_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm_at_mask, full_norm, rtol=1e-5, atol=0)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("language_model.decoder") for n in grads[0])
    for name, full in grads[0].items():
        torch.testing.assert_close(grads[1][name], full, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
