"""tools/average_checkpoints.py: the average of megatron checkpoints is the exact elementwise mean (float32
accumulation, the first input's dtype), as a megatron checkpoint or directly as HF; ``--ckpt-root --last N``
picks the newest complete iterations; mismatched inputs are refused."""

import json
import shutil

import pytest
import torch

from megatron_ovr.checkpoint import HFCheckpoint
from megatron_ovr.checkpoint.megatron_dist import MegatronCheckpoint, resolve_iteration
from tools import average_checkpoints, convert_hf_to_megatron
from tools.make_tiny_checkpoint import make_checkpoint


def average(*args) -> None:
    average_checkpoints.main([*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three tiny megatron checkpoints with different weights (seeds 0, 1, 2) and their HF sources."""
    root = tmp_path_factory.mktemp("avg")
    hf, megatron = [], []
    for seed in range(3):
        hf.append(make_checkpoint(root / f"hf{seed}", "tiny", seed=seed))
        convert_hf_to_megatron.main(["--hf-dir", str(hf[-1]), "--out", str(root / f"m{seed}"), "--no-progress"])
        megatron.append(root / f"m{seed}")
    return hf, megatron


def mean(tensors, dtype):
    total = tensors[0].to(torch.float32)
    for t in tensors[1:]:
        total = total + t.to(torch.float32)
    return (total / len(tensors)).to(dtype)


def test_average_of_two_is_the_elementwise_mean(checkpoints, tmp_path):
    hf, megatron = checkpoints
    average("--ckpt", megatron[0], megatron[1], "--out", tmp_path / "avg")
    inputs = [MegatronCheckpoint(m) for m in megatron[:2]]
    with MegatronCheckpoint(tmp_path / "avg") as averaged:
        assert averaged.extra["averaged_from"] == [str(m.resolve()) for m in megatron[:2]]
        for tensor in averaged.tensors:
            for layer in tensor.layers:
                expected = mean([c.get(tensor, layer) for c in inputs], torch.float32)
                assert torch.equal(averaged.get(tensor, layer), expected), (tensor.key, layer)
    # The table's format changes only move elements, so the HF view of the average is the HF mean.
    average("--ckpt", megatron[0], megatron[1], "--hf-out", tmp_path / "avg_hf")
    sources = [HFCheckpoint(h) for h in hf[:2]]
    result = HFCheckpoint(tmp_path / "avg_hf")
    assert sorted(result.names()) == sorted(sources[0].names())
    for name in result.names():
        assert torch.equal(result.get(name), mean([s.get(name) for s in sources], torch.float32)), name
    # HF directories average the same way.
    average("--ckpt", hf[0], hf[1], "--hf-out", tmp_path / "avg_of_hf")
    from_hf = HFCheckpoint(tmp_path / "avg_of_hf")
    for name in result.names():
        assert torch.equal(from_hf.get(name), result.get(name)), name


def test_bfloat16_average_accumulates_in_float32(checkpoints, tmp_path):
    hf, _ = checkpoints
    bf16 = []
    for i, h in enumerate(hf):
        convert_hf_to_megatron.main(["--hf-dir", str(h), "--out", str(tmp_path / f"b{i}"), "--dtype", "bfloat16",
                                     "--no-progress"])
        bf16.append(tmp_path / f"b{i}")
    average("--ckpt", *bf16, "--out", tmp_path / "avg")
    inputs = [MegatronCheckpoint(b) for b in bf16]
    with MegatronCheckpoint(tmp_path / "avg") as averaged:
        tensor = next(t for t in averaged.tensors if t.num_layers)
        assert averaged.dtype_of(tensor) == torch.bfloat16
        expected = mean([c.get(tensor, 1) for c in inputs], torch.bfloat16)
        assert torch.equal(averaged.get(tensor, 1), expected)


def test_ckpt_root_last_picks_newest_complete_iterations(checkpoints, tmp_path):
    _, megatron = checkpoints
    root = tmp_path / "run"
    root.mkdir()
    for step, source in zip((100, 200, 300), megatron):
        shutil.copytree(resolve_iteration(source), root / f"iter_{step:07d}")
    shutil.copytree(resolve_iteration(megatron[0]), root / "iter_0000400.partial")  # a save that never finished
    (root / "latest").write_text("300\n")
    average("--ckpt-root", root, "--last", "2", "--out", tmp_path / "avg")
    with MegatronCheckpoint(tmp_path / "avg") as averaged:
        assert averaged.extra["averaged_from"] == [str(root / "iter_0000200"), str(root / "iter_0000300")]
    with pytest.raises(ValueError, match="fewer than --last 4"):
        average("--ckpt-root", root, "--last", "4", "--out", tmp_path / "avg4")
    assert not (tmp_path / "avg4").exists()


def test_mismatched_inputs_are_refused(checkpoints, tmp_path):
    _, megatron = checkpoints
    other = tmp_path / "other"
    shutil.copytree(megatron[1], other)
    common_file = resolve_iteration(other) / "common.pt"
    common = torch.load(common_file, weights_only=False)
    common["extra"]["model_config"]["vision_config"]["window_size"] = 112  # same shapes, another model
    torch.save(common, common_file)
    with pytest.raises(ValueError, match="another model config"):
        average("--ckpt", megatron[0], other, "--out", tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    assert json.loads((megatron[0] / "latest").read_text()) == 0
