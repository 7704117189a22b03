"""GPU only: a bf16 training run (bf16 weights and activations, megatron's fp32 main weights, gradients and
Adam state) tracks the fp32 run of the same model on the same batch, step for step.

Tolerance: bf16 keeps 8 significant bits, so each matmul's output is off by up to ~0.4% relative; the loss
averages ~150 tokens' cross-entropies of ~12 nats, and those errors largely cancel. On 2 CPU cores the
same runs (torch 2.13, fp32 vs bf16) differed by at most 1.2e-4 relative per step while the loss fell by
1.36 nats; the bound below, 2e-3 relative (0.024 nats), leaves a 15x margin for GPU kernels (cuBLAS split-K
reductions, flash attention) and still fails when a dtype slips (bf16 main weights lose small Adam updates)
or a cast is missing.
"""

import pytest
import torch

from megatron_ovr import platform
from megatron_ovr.checkpoint import write_hf_checkpoint
from megatron_ovr.config import ParallelConfig, Qwen25VLConfig, get_preset
from megatron_ovr.config.sft import ModelSection, OptimizerSection
from megatron_ovr.models.qwen2_5_vl import reference
from megatron_ovr.training.core import ModelTrainer
from megatron_ovr.training.losses import masked_token_loss

pytestmark = pytest.mark.gpu

STEPS = 6
LEARNING_RATE = 1e-3  # large enough that six Adam steps move the loss by far more than the tolerance
RELATIVE_TOLERANCE = 2e-3
MIN_LOSS_DROP = 0.5  # nats over the run: 20x the tolerance, so tracking is not trivially met by a flat loss


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = get_preset("tiny")
    model = reference.build_hf_model(cfg, seed=0)
    return write_hf_checkpoint(tmp_path_factory.mktemp("mixed-precision") / "hf", cfg,
                               reference.hf_state_dict(model).items())


def microbatch(cfg: Qwen25VLConfig) -> dict:
    """A text row and an image row (padded), loss on every next text token, on the device."""
    batch = reference.sample_batch(cfg, [[(1, 8, 12), 60], [90]], seed=1)
    labels = torch.full_like(batch.input_ids, cfg.bos_token_id)
    labels[:, :-1] = batch.input_ids[:, 1:]
    visual = torch.tensor([cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id])
    loss_mask = batch.attention_mask.roll(-1, dims=1).bool() & ~torch.isin(labels, visual)
    loss_mask[:, -1] = False
    device = platform.default_device()
    return {
        "tokens": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
        "segment_ids": batch.segment_ids.to(device), "labels": labels.to(device),
        "loss_mask": loss_mask.float().to(device),
        "pixel_values": batch.pixel_values.to(device), "image_grid_thw": batch.image_grid_thw,
    }


def train_losses(hf_dir, dtype: str) -> list[float]:
    section = ModelSection(hf_dir=str(hf_dir), dtype=dtype, freeze_vision=False, freeze_merger=False)
    optimizer = OptimizerSection(lr=LEARNING_RATE, warmup_steps=0, decay_style="constant")
    trainer = ModelTrainer(section, ParallelConfig(), optimizer, total_steps=STEPS)
    batch = microbatch(trainer.model_cfg)
    losses = []
    for _ in range(STEPS):
        result = trainer.train_step([batch], masked_token_loss, loss_keys=("loss_mask",))
        assert result.finite, f"{dtype}: non-finite loss or gradient"
        losses.append(result.loss)
    return losses


def test_bf16_training_tracks_fp32(single_rank_megatron, hf_dir):
    fp32 = train_losses(hf_dir, "float32")
    bf16 = train_losses(hf_dir, "bfloat16")
    assert fp32[0] - fp32[-1] > MIN_LOSS_DROP, f"fp32 did not train: {fp32}"
    for step, (reference_loss, loss) in enumerate(zip(fp32, bf16)):
        relative = abs(loss - reference_loss) / reference_loss
        assert relative <= RELATIVE_TOLERANCE, f"step {step}: bf16 {loss:.5f} vs fp32 {reference_loss:.5f} ({relative:.2e})\nfp32 {fp32}\nbf16 {bf16}"
