"""The model-free converters (one process, no model, no torchrun): HF -> megatron -> HF is bit-exact, the
re-export gives identical transformers logits, dtypes are kept (or cast with --dtype), the critic travels
as ``value_head.safetensors``, and bad input fails clearly without leaving a half-written output.
Loading the converted checkpoint into the real model at TP/PP/VP layouts: ``test_megatron_layout.py``."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO, torchrun
from safetensors.torch import load_file

from megatron_ovr.checkpoint import HFCheckpoint, write_hf_checkpoint
from megatron_ovr.checkpoint import convert as convert_module
from megatron_ovr.checkpoint.dist_format import DistReader
from megatron_ovr.checkpoint.hf import INDEX_FILE, VALUE_HEAD_FILE
from megatron_ovr.checkpoint.megatron_dist import MegatronCheckpoint, resolve_iteration
from megatron_ovr.models.qwen2_5_vl import reference
from tools import convert_hf_to_megatron, convert_megatron_to_hf
from tools.make_tiny_checkpoint import make_checkpoint

TO_MEGATRON = REPO / "tools" / "convert_hf_to_megatron.py"
TO_HF = REPO / "tools" / "convert_megatron_to_hf.py"


def to_megatron(*args: str) -> None:
    convert_hf_to_megatron.main([*map(str, args), "--no-progress"])


def to_hf(*args: str) -> None:
    convert_megatron_to_hf.main([*map(str, args), "--no-progress"])


def assert_same_tensors(a_dir, b_dir, dtype=None):
    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    assert sorted(b.names()) == sorted(a.names())
    for name in a.names():
        expected = a.get(name) if dtype is None else a.get(name).to(dtype)
        assert torch.equal(b.get(name), expected), name


def no_leftovers(parent) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny HF checkpoint (with a tokenizer file beside it) converted for TP2 x PP2."""
    root = tmp_path_factory.mktemp("conv")
    hf_dir = make_checkpoint(root / "hf", "tiny", seed=0)
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 32768}\n')
    to_megatron("--hf-dir", hf_dir, "--out", root / "megatron", "--tp", "2", "--pp", "2", "--fsync")
    return hf_dir, root / "megatron"


def test_round_trip_is_bit_exact(converted, tmp_path):
    hf_dir, megatron_dir = converted
    for name, ckpt in (("root", megatron_dir), ("iteration", megatron_dir / "iter_0000000")):
        out = tmp_path / name
        to_hf("--ckpt", ckpt, "--out", out)
        assert_same_tensors(hf_dir, out)
        assert HFCheckpoint(out).config == HFCheckpoint(hf_dir).config
        assert (out / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    extra = MegatronCheckpoint(megatron_dir).extra
    assert extra["head"] == "lm" and "world_size" not in extra
    assert extra["intended_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 2, "virtual_pipeline": None}


def test_reexport_loads_in_transformers_with_identical_logits(converted, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir, megatron_dir = converted
    out = tmp_path / "hf_again"
    to_hf("--ckpt", megatron_dir, "--out", out)
    cfg = HFCheckpoint(hf_dir).config
    batch = reference.sample_batch(cfg, [[5, (1, 8, 8), 7]], seed=0)
    logits = [reference.hf_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval(), batch)
              for d in (hf_dir, out)]
    assert torch.equal(logits[0], logits[1])


def test_dtype_is_kept_unless_cast(converted, tmp_path):
    hf_dir, _ = converted
    to_megatron("--hf-dir", hf_dir, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    with MegatronCheckpoint(tmp_path / "bf16") as ckpt:
        assert {ckpt.dtype_of(t) for t in ckpt.tensors} == {torch.bfloat16}
    to_hf("--ckpt", tmp_path / "bf16", "--out", tmp_path / "hf_bf16", "--max-shard-gb", "0.05")  # kept: bfloat16
    assert_same_tensors(hf_dir, tmp_path / "hf_bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert len(set(json.loads((tmp_path / "hf_bf16" / INDEX_FILE).read_text())["weight_map"].values())) > 1
    to_megatron("--hf-dir", tmp_path / "hf_bf16", "--out", tmp_path / "bf16_again")  # a bf16 HF input stays bf16
    with MegatronCheckpoint(tmp_path / "bf16_again") as ckpt:
        assert {ckpt.dtype_of(t) for t in ckpt.tensors} == {torch.bfloat16}
    to_hf("--ckpt", tmp_path / "bf16_again", "--out", tmp_path / "hf_fp16", "--dtype", "float16")
    assert HFCheckpoint(tmp_path / "hf_fp16").get("model.norm.weight").dtype == torch.float16


def test_critic_exports_value_head_file(converted, tmp_path):
    hf_dir, _ = converted
    source = HFCheckpoint(hf_dir)
    value_head = torch.randn(1, source.config.text.hidden_size)
    tensors = [(n, source.get(n)) for n in source.names() if n != "lm_head.weight"]
    tensors.append(("value_head.weight", value_head))
    critic_hf = write_hf_checkpoint(tmp_path / "critic_hf", source.config, tensors)
    assert HFCheckpoint(critic_hf).head == "value"
    to_megatron("--hf-dir", critic_hf, "--out", tmp_path / "critic")
    with MegatronCheckpoint(tmp_path / "critic") as ckpt:
        assert ckpt.head == "value" and ckpt.extra["head"] == "value"
        head_shape = ckpt.reader.info("language_model.output_layer.weight").shape
        assert tuple(head_shape) == (1, source.config.text.hidden_size)
    out = tmp_path / "critic_again"
    to_hf("--ckpt", tmp_path / "critic", "--out", out)
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert "lm_head.weight" not in index and "value_head.weight" not in index
    assert torch.equal(load_file(out / VALUE_HEAD_FILE)["value_head.weight"], value_head)
    assert_same_tensors(critic_hf, out)
    help_text = subprocess.run([sys.executable, str(TO_HF), "--help"], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO).stdout
    assert VALUE_HEAD_FILE in help_text and "value_head.weight" in help_text


def test_progress_bar_and_torchrun_launch(converted, tmp_path):
    """Older instructions launch the tools under torchrun: rank 0 converts, the other ranks exit."""
    hf_dir, _ = converted
    proc = torchrun(TO_MEGATRON, 2, "--hf-dir", str(hf_dir), "--out", str(tmp_path / "m"), "--tp", "2")
    assert "HF -> megatron" in proc.stderr  # the progress bar
    to_hf("--ckpt", tmp_path / "m", "--out", tmp_path / "hf")
    assert_same_tensors(hf_dir, tmp_path / "hf")


def test_tp_that_does_not_divide_heads_fails_before_writing(converted, tmp_path):
    hf_dir, _ = converted
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide"):
        to_megatron("--hf-dir", hf_dir, "--out", tmp_path / "out", "--tp", "3")
    with pytest.raises(ValueError, match="does not divide the 2 LM layers"):
        to_megatron("--hf-dir", hf_dir, "--out", tmp_path / "out", "--pp", "2", "--vp", "2")
    assert not (tmp_path / "out").exists()


def test_existing_checkpoint_is_not_overwritten(converted, tmp_path):
    hf_dir, megatron_dir = converted
    target = tmp_path / "existing"
    shutil.copytree(megatron_dir, target)
    with pytest.raises(FileExistsError, match="already holds a megatron checkpoint"):
        to_megatron("--hf-dir", hf_dir, "--out", target)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        to_megatron("--hf-dir", hf_dir, "--out", tmp_path / "busy")


def copy_with_first_shard(hf_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the HF directory to damage, and its first weight shard."""
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    return broken, next(broken.glob("model-*.safetensors"))


def test_missing_shard_is_named(converted, tmp_path):
    broken, shard = copy_with_first_shard(converted[0], tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        to_megatron("--hf-dir", broken, "--out", tmp_path / "out")


def test_truncated_safetensors_is_named(converted, tmp_path):
    broken, shard = copy_with_first_shard(converted[0], tmp_path)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated or corrupt"):
        to_megatron("--hf-dir", broken, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_mismatch_is_named_and_nothing_is_left(converted, tmp_path):
    hf_dir, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 192  # the weights have 256
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"linear_fc1.*\(512, 128\).*\(384, 128\).*config"):
        to_megatron("--hf-dir", broken, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_failure_mid_stream_leaves_no_output(converted, tmp_path, monkeypatch):
    hf_dir, megatron_dir = converted
    calls = {"n": 0}
    original = convert_module.HFSource.get

    def failing(self, tensor, layer):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk went away")
        return original(self, tensor, layer)

    monkeypatch.setattr(convert_module.HFSource, "get", failing)
    with pytest.raises(OSError, match="disk went away"):
        to_megatron("--hf-dir", hf_dir, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)

    original_read = DistReader.read

    def failing_read(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk went away")
        return original_read(self, *args, **kwargs)

    monkeypatch.setattr(DistReader, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        to_hf("--ckpt", megatron_dir, "--out", tmp_path / "hf_out")
    assert not (tmp_path / "hf_out").exists() and no_leftovers(tmp_path)


def test_broken_megatron_checkpoints_are_named(converted, tmp_path):
    _, megatron_dir = converted
    with pytest.raises(FileNotFoundError, match="no 'latest' pointer"):
        to_hf("--ckpt", tmp_path, "--out", tmp_path / "out")

    truncated = tmp_path / "truncated"
    shutil.copytree(megatron_dir, truncated)
    data = next(resolve_iteration(truncated).glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        to_hf("--ckpt", truncated, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    missing = tmp_path / "missing"
    shutil.copytree(megatron_dir, missing)
    data = next(resolve_iteration(missing).glob("*.distcp"))
    data.unlink()
    with pytest.raises(FileNotFoundError, match=data.name):
        to_hf("--ckpt", missing, "--out", tmp_path / "out")

    mismatch = tmp_path / "mismatch"
    shutil.copytree(megatron_dir, mismatch)
    common_file = resolve_iteration(mismatch) / "common.pt"
    common = torch.load(common_file, weights_only=False)
    common["extra"]["model_config"]["text_config"]["intermediate_size"] = 192
    torch.save(common, common_file)
    with pytest.raises(ValueError, match="config mismatch"):
        to_hf("--ckpt", mismatch, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_written_metadata_is_plain_dcp(converted):
    """The .metadata pickle names only torch classes, so any reader (torch DCP, megatron) opens it."""
    _, megatron_dir = converted
    modules = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            modules.add(module)
            return super().find_class(module, name)

    with open(resolve_iteration(megatron_dir) / ".metadata", "rb") as f:
        metadata = Recorder(f).load()
    assert modules and all(m.startswith("torch") for m in modules), modules
    assert metadata.version == "1.0.0"
