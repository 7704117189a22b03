"""HF -> megatron (TP2 x PP2) -> HF is bit-exact for every tensor at several read layouts, the re-exported
directory loads in transformers with identical logits, tokenizer files travel along, and bad input fails
clearly before anything is written."""

import shutil

import pytest
import torch

from launch import REPO, torchrun
from megatron_ovr.checkpoint import HFCheckpoint
from megatron_ovr.models.qwen2_5_vl import reference
from tools import convert_hf_to_megatron
from tools.make_tiny_checkpoint import make_checkpoint

TO_MEGATRON = REPO / "tools" / "convert_hf_to_megatron.py"
TO_HF = REPO / "tools" / "convert_megatron_to_hf.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny HF checkpoint (with a tokenizer file beside it) converted at TP2 x PP2."""
    root = tmp_path_factory.mktemp("conv")
    hf_dir = make_checkpoint(root / "hf", "tiny", seed=0)
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 32768}\n')
    torchrun(TO_MEGATRON, 4, "--hf-dir", str(hf_dir), "--out", str(root / "megatron"), "--tp", "2", "--pp", "2",
             "--dtype", "float32")
    return hf_dir, root / "megatron"


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["--pp", "2"])], ids=["tp1_pp1", "tp1_pp2"])
def test_round_trip_is_bit_exact(converted, tmp_path, nproc, layout):
    hf_dir, megatron_dir = converted
    out = tmp_path / "hf_again"
    torchrun(TO_HF, nproc, "--ckpt", str(megatron_dir), "--out", str(out), "--dtype", "float32", *layout)
    original, again = HFCheckpoint(hf_dir), HFCheckpoint(out)
    assert sorted(again.names()) == sorted(original.names())
    for name in original.names():
        assert torch.equal(again.get(name), original.get(name)), name
    assert again.config == original.config
    assert (out / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()


@pytest.mark.distributed
def test_reexport_loads_in_transformers_with_identical_logits(converted, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir, megatron_dir = converted
    out = tmp_path / "hf_again"
    torchrun(TO_HF, 1, "--ckpt", str(megatron_dir), "--out", str(out), "--dtype", "float32")
    cfg = HFCheckpoint(hf_dir).config
    batch = reference.sample_batch(cfg, [[5, (1, 8, 8), 7]], seed=0)
    logits = [reference.hf_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval(), batch)
              for d in (hf_dir, out)]
    assert torch.equal(logits[0], logits[1])


def test_tp_that_does_not_divide_heads_fails_before_writing(converted, tmp_path):
    hf_dir, _ = converted
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide"):
        convert_hf_to_megatron.main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "out"), "--tp", "3"])
    assert not (tmp_path / "out").exists()


def test_existing_checkpoint_is_not_overwritten(converted, tmp_path):
    hf_dir, megatron_dir = converted
    target = tmp_path / "existing"
    shutil.copytree(megatron_dir, target)
    with pytest.raises(FileExistsError, match="already holds a megatron checkpoint"):
        convert_hf_to_megatron.main(["--hf-dir", str(hf_dir), "--out", str(target)])


def test_missing_shard_is_named(converted, tmp_path):
    hf_dir, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    shard = next(broken.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        convert_hf_to_megatron.main(["--hf-dir", str(broken), "--out", str(tmp_path / "out")])
