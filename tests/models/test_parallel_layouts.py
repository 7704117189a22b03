"""Every parallel layout gives the single-process HF logits and gradients, and exports the HF weights
bit-exactly — real torchrun jobs on gloo, through megatron's schedules, DDP and finalize_model_grads. The PPO
critic (HF trunk + value head) likewise gives HF's values and gradients."""

from pathlib import Path

import pytest
import torch

from launch import torchrun
from megatron_ovr.mapping.qwen2_5_vl import VALUE_HEAD_HF_NAME
from megatron_ovr.models.qwen2_5_vl import reference
from parity_worker import parity_batch
from tiny_configs import layout_config

WORKER = Path(__file__).with_name("parity_worker.py")

# (name, processes, worker arguments)
LAYOUTS = [
    ("single", 1, []),
    ("tp2", 2, ["--tp", "2"]),
    ("pp2", 2, ["--pp", "2"]),
    ("tp2_pp2", 4, ["--tp", "2", "--pp", "2"]),
    ("tp2_sp", 2, ["--tp", "2", "--sp"]),
    ("cp2", 2, ["--cp", "2"]),
    ("tp2_sp_cp2", 4, ["--tp", "2", "--sp", "--cp", "2"]),
    ("pp2_vp2", 2, ["--pp", "2", "--vp", "2", "--microbatches", "2"]),
    ("dp2", 2, []),
    ("tp2_dp2", 4, ["--tp", "2"]),
    # The output head at the loss's tokens only (as PPO runs it): gathered over SP, split over CP, last stage.
    ("tp2_sp_cp2_head_mask", 4, ["--tp", "2", "--sp", "--cp", "2", "--head-mask"]),
    ("pp2_vp2_head_mask", 2, ["--pp", "2", "--vp", "2", "--microbatches", "2", "--head-mask"]),
]


def hf_inputs(batch) -> dict:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw, use_cache=False)


@pytest.fixture(scope="module")
def hf_reference():
    cfg = layout_config()
    model = reference.build_hf_model(cfg, seed=0)
    batch, labels = parity_batch(cfg)
    logits = model(**hf_inputs(batch)).logits
    mask = batch.attention_mask.float()
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    loss = (token_loss.view_as(mask) * mask).sum() / mask.sum()
    loss.backward()
    grads = {name: p.grad for name, p in reference.hf_named_parameters(model)}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads, weights=reference.hf_state_dict(model),
                valid=batch.attention_mask.bool())


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,args", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_hf(name, nproc, args, hf_reference, tmp_path):
    out = tmp_path / "result.pt"
    torchrun(WORKER, nproc, *args, "--out", str(out))
    ours, last = torch.load(out), torch.load(str(out) + ".last")
    valid = hf_reference["valid"]

    logit_diff = (last["logits"][valid] - hf_reference["logits"][valid]).abs().max().item()
    assert logit_diff <= 1e-4, f"{name}: max |logit diff| {logit_diff}"
    torch.testing.assert_close(last["loss"], hf_reference["loss"], rtol=1e-6, atol=1e-6)

    assert ours["weights"].keys() == hf_reference["weights"].keys()
    for key, expected in hf_reference["weights"].items():
        assert torch.equal(ours["weights"][key], expected), f"{name}: export of {key} is not bit-exact"

    assert ours["grads"].keys() == hf_reference["grads"].keys()
    for key, expected in hf_reference["grads"].items():
        torch.testing.assert_close(ours["grads"][key], expected, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{name} {key}: {m}")


# The critic's value head is replicated over TP: with sequence parallelism its gathered input must hand each
# rank its slice of the gradient, not a TP-sum of identical ones (which doubled the trunk's gradient at TP2).
CRITIC_LAYOUTS = [
    ("tp2_sp", 2, ["--tp", "2", "--sp"]),
    ("tp2_sp_cp2_head_mask", 4, ["--tp", "2", "--sp", "--cp", "2", "--head-mask"]),
]


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,args", CRITIC_LAYOUTS, ids=[layout[0] for layout in CRITIC_LAYOUTS])
def test_critic_layout_matches_the_hf_trunk_with_a_value_head(name, nproc, args, tmp_path):
    out = tmp_path / "result.pt"
    torchrun(WORKER, nproc, "--head", "value", *args, "--out", str(out))
    ours, last = torch.load(out), torch.load(str(out) + ".last")

    cfg = layout_config()
    model = reference.build_hf_model(cfg, seed=0)
    batch, _ = parity_batch(cfg)
    head = ours["weights"][VALUE_HEAD_HF_NAME].clone().requires_grad_()
    hidden = model.model(**hf_inputs(batch)).last_hidden_state  # after the final norm
    mask = batch.attention_mask.float()
    loss = ((hidden @ head[0]) * mask).sum() / mask.sum()
    loss.backward()
    torch.testing.assert_close(last["loss"], loss.detach(), rtol=1e-6, atol=1e-6)

    expected = {key: p.grad for key, p in reference.hf_named_parameters(model) if p.grad is not None}
    expected[VALUE_HEAD_HF_NAME] = head.grad
    assert ours["grads"].keys() == expected.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(ours["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{name} {key}: {m}")
