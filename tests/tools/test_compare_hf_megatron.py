"""HF checkpoint reader/writer round trips and errors, and ``tools/compare_hf_megatron.py`` under torchrun:
it passes at TP=2 (image) and CP=2 (text), and fails (on every rank) when our weights are perturbed."""

import json
import re

import pytest
import torch
from launch import REPO, torchrun
from safetensors.torch import save_file

from megatron_ovr.checkpoint import HFCheckpoint, write_hf_checkpoint
from megatron_ovr.config import get_preset
from megatron_ovr.models.qwen2_5_vl import reference
from tools.make_tiny_checkpoint import make_checkpoint

TOOL = REPO / "tools" / "compare_hf_megatron.py"


@pytest.fixture(scope="module")
def reference_state():
    return reference.hf_state_dict(reference.build_hf_model(get_preset("tiny"), seed=0))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


def small_tensors():
    """A few small tensors under on-disk names (the reader does not need a complete model)."""
    gen = torch.Generator().manual_seed(0)
    return [(f"model.layers.{i}.mlp.down_proj.weight", torch.randn(64, 64, generator=gen)) for i in range(4)]


def test_tool_checkpoint_matches_reference_model(tiny_ckpt, reference_state):
    ckpt = HFCheckpoint(tiny_ckpt)
    assert ckpt.config == get_preset("tiny")
    assert sorted(ckpt.names()) == sorted(reference_state)
    for name, tensor in reference_state.items():
        assert torch.equal(ckpt.get(name), tensor), name
    # transformers' in-memory names reach the same tensors.
    assert torch.equal(ckpt.get("model.language_model.norm.weight"), reference_state["model.norm.weight"])
    assert torch.equal(ckpt.get("model.visual.merger.ln_q.weight"), reference_state["visual.merger.ln_q.weight"])


def test_sharded_round_trip(tmp_path, reference_state):
    max_bytes = 8 * 2**20  # the two 78 MB vocabulary matrices get a shard each, the rest shares
    out = write_hf_checkpoint(tmp_path / "sharded", get_preset("tiny"), reference_state.items(), max_shard_bytes=max_bytes)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in reference_state.values())
    assert sorted(index["weight_map"]) == sorted(reference_state)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, "model.safetensors.index.json", "config.json", "generation_config.json"])
    for shard in shards:
        held = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(held) == 1 or sum(reference_state[n].nbytes for n in held) <= max_bytes
    ckpt = HFCheckpoint(out)
    assert ckpt.config == get_preset("tiny")
    for name, tensor in reference_state.items():
        assert torch.equal(ckpt.get(name), tensor), name
    assert not list(tmp_path.glob(".sharded.tmp-*"))


def test_writer_canonicalises_names_views_and_dtype(tmp_path):
    fused = torch.randn(8, 4)
    gate, up = fused.chunk(2)  # views of one storage, as export_hf_weights yields them
    tensors = [("model.language_model.layers.0.mlp.gate_proj.weight", gate),
               ("model.language_model.layers.0.mlp.up_proj.weight", up),
               ("model.visual.merger.ln_q.weight", torch.randn(4, 2).t())]  # not contiguous
    out = write_hf_checkpoint(tmp_path / "out", get_preset("tiny"), tensors, dtype=torch.bfloat16)
    ckpt = HFCheckpoint(out)
    assert sorted(ckpt.names()) == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                    "visual.merger.ln_q.weight"]
    for name, tensor in tensors:
        assert torch.equal(ckpt.get(name), tensor.bfloat16()), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_reads_single_file_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny").to_hf_config()))
    save_file(dict(small_tensors()), str(tmp_path / "model.safetensors"))
    ckpt = HFCheckpoint(tmp_path)
    for name, tensor in small_tensors():
        assert torch.equal(ckpt.get(name), tensor)


def test_missing_directory_config_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCheckpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFCheckpoint(tmp_path)
    ckpt = HFCheckpoint(write_hf_checkpoint(tmp_path / "ok", get_preset("tiny"), small_tensors()))
    with pytest.raises(KeyError, match=r"model\.layers\.9\.mlp\.down_proj\.weight"):
        ckpt.get("model.layers.9.mlp.down_proj.weight")


def test_missing_shard_is_named(tmp_path):
    out = write_hf_checkpoint(tmp_path / "ck", get_preset("tiny"), small_tensors(), max_shard_bytes=20_000)
    (out / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
        HFCheckpoint(out)


def test_truncated_shard_is_named(tmp_path):
    out = write_hf_checkpoint(tmp_path / "ck", get_preset("tiny"), small_tensors(), max_shard_bytes=20_000)
    shard = out / "model-00003-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model-00003-of-00004.safetensors.*truncated or corrupt"):
        HFCheckpoint(out)


def test_failed_write_leaves_nothing(tmp_path):
    def broken_stream():
        yield from small_tensors()
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_hf_checkpoint(tmp_path / "ck", get_preset("tiny"), broken_stream(), max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_hf_checkpoint(tmp_path / "full", get_preset("tiny"), small_tensors())


def max_diff(stdout: str) -> float:
    return float(re.search(r"^PASS: max \|diff\| (\S+) <=", stdout, re.MULTILINE).group(1))


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tp", "2", "--sample", "image"], ["--cp", "2", "--sample", "text"]],
                         ids=["tp2-image", "cp2-text"])
def test_compare_tool_passes(tiny_ckpt, layout):
    proc = torchrun(TOOL, 2, "--hf-dir", str(tiny_ckpt), *layout)
    assert "megatron-ovr: device=" in proc.stdout
    assert max_diff(proc.stdout) <= 1e-4


@pytest.mark.distributed
def test_compare_tool_fails_on_every_rank_when_weights_differ(tiny_ckpt):
    # PP=2: rank 1 (the last stage) compares; rank 0 exiting 1 shows that the verdict reaches every rank.
    with pytest.raises(AssertionError) as failure:
        torchrun(TOOL, 2, "--hf-dir", str(tiny_ckpt), "--pp", "2", "--perturb-megatron", "1e-2")
    message = str(failure.value)
    assert "failed (1)" in message
    assert re.search(r"FAIL: max \|diff\| \S+ > atol 1\.0e-04", message)
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: 1 ", message)
