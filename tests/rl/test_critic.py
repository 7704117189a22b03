"""The PPO critic: the LM trunk plus a scalar value head in the place of the output layer. Started from a
policy checkpoint (HF or megatron) it keeps the trunk exactly and draws a fresh head; its own checkpoints
restore the head; the head's init follows ORZ (nn.Linear's default, U(-1/sqrt(h), 1/sqrt(h)))."""

import pytest
import torch

from megatron_ovr.config import ParallelConfig
from megatron_ovr.config.sft import ModelSection, OptimizerSection
from megatron_ovr.rl.experience import Sample, pack_samples
from megatron_ovr.training.core import OUTPUT_LAYER_KEY, ModelTrainer, build_model
from megatron_ovr.training.losses import masked_token_loss


def parameters(chunks) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in chunks[0].named_parameters()}


def test_critic_from_policy_checkpoints_keeps_the_trunk_and_draws_a_fresh_head(single_rank_megatron, tiny_hf_dir, tmp_path):
    section = ModelSection(hf_dir=str(tiny_hf_dir), freeze_vision=False, freeze_merger=False)
    actor = ModelTrainer(section, ParallelConfig(), OptimizerSection(), total_steps=1, seed=3)
    from_hf = parameters(actor.chunks)
    # One real step first: the megatron checkpoint then holds weights that differ from the HF ones.
    (batch,) = pack_samples([Sample(list(range(100, 110)), [7, 8, 9])], 16, actor.model_cfg, pad_id=0).microbatches
    actor.train_step([{**batch, "loss_mask": batch["action_mask"]}], masked_token_loss, ("loss_mask",))
    actor.save(str(tmp_path / "actor"), 1, {})
    trained = parameters(actor.chunks)

    for source, policy in ((section, from_hf), (ModelSection(megatron_dir=str(tmp_path / "actor")), trained)):
        _, critic = build_model(source, ParallelConfig(), head="value", seed=3)
        values = parameters(critic)
        assert set(values) == set(policy)
        head = values[OUTPUT_LAYER_KEY]
        assert head.shape == (1, actor.model_cfg.text.hidden_size)
        bound = actor.model_cfg.text.hidden_size ** -0.5
        assert head.abs().max() <= bound and head.std() > bound / 3  # spread over U(-b, b), not collapsed
        for name, value in values.items():
            if name != OUTPUT_LAYER_KEY:
                assert torch.equal(value, policy[name]), name
        # Same seed, same head: every TP rank and every restart draw it identically.
        assert torch.equal(head, parameters(build_model(source, ParallelConfig(), head="value", seed=3)[1])[OUTPUT_LAYER_KEY])


def test_a_critic_checkpoint_restores_its_head_and_cannot_start_a_policy(single_rank_megatron, tiny_hf_dir, tmp_path):
    critic = ModelTrainer(ModelSection(hf_dir=str(tiny_hf_dir)), ParallelConfig(), OptimizerSection(), total_steps=1,
                          head="value", seed=5)
    (batch,) = pack_samples([Sample(list(range(100, 110)), [7, 8, 9])], 16, critic.model_cfg, pad_id=0).microbatches
    batch = {**batch, "returns": torch.ones(1, 16), "loss_mask": batch["action_mask"]}

    def value_loss(local, values):  # a step towards 1.0 moves the head away from its fresh draw
        return masked_token_loss(local, (values.float() - local["returns"]) ** 2)

    critic.train_step([batch], value_loss, ("loss_mask", "returns"))
    critic.save(str(tmp_path / "critic"), 1, {})
    _, restored = build_model(ModelSection(megatron_dir=str(tmp_path / "critic")), ParallelConfig(), head="value", seed=0)
    trained_head = parameters(critic.chunks)[OUTPUT_LAYER_KEY]
    fresh_head = parameters(build_model(ModelSection(hf_dir=str(tiny_hf_dir)), ParallelConfig(), head="value", seed=0)[1])
    assert not torch.equal(trained_head, fresh_head[OUTPUT_LAYER_KEY])
    assert torch.equal(parameters(restored)[OUTPUT_LAYER_KEY], trained_head)
    with pytest.raises(ValueError, match="critic checkpoint: it cannot start a policy"):
        build_model(ModelSection(megatron_dir=str(tmp_path / "critic")), ParallelConfig())


def test_the_value_model_returns_one_value_per_token(single_rank_megatron, tiny_hf_dir):
    _, critic = build_model(ModelSection(hf_dir=str(tiny_hf_dir)), ParallelConfig(), head="value", seed=0)
    tokens = torch.randint(0, 1000, (2, 8))
    positions = torch.arange(8).expand(3, 2, 8)
    values = critic[0](tokens, positions, torch.ones(2, 8, dtype=torch.long))
    assert values.shape == (2, 8) and torch.isfinite(values).all()
    with pytest.raises(ValueError, match="takes no labels"):
        critic[0](tokens, positions, None, labels=tokens)
