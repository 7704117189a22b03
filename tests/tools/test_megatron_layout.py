"""The model-free megatron checkpoint writer against the real model, at TP1, TP2 x PP2, PP2 x VP2 (tied
embeddings, a checkpoint written with TP2 fragments) and a TP2 critic:
- its sharded keys, global shapes and objects are those of ``model.sharded_state_dict()``; written for the
  model's TP, its chunks are exactly the model's shards (offsets and shapes), else they cover them;
- its TP fragments are the table's ``shard()`` of the full tensor;
- ``checkpointing.load_checkpoint`` (the trainer's path) loads it at that layout, bit for bit;
- a training checkpoint that layout saves (distributed optimizer state included) converts back to HF bit
  for bit with the model-free reader.
"""

import dataclasses
import json
from functools import lru_cache

import pytest
import torch
from launch import REPO, torchrun

from megatron_ovr.checkpoint import HFCheckpoint, write_hf_checkpoint
from megatron_ovr.checkpoint.dist_format import DistReader
from megatron_ovr.checkpoint.megatron_dist import model_tensors, resolve_iteration, tp_fragments
from megatron_ovr.config import get_preset
from megatron_ovr.models.qwen2_5_vl import reference
from tools import convert_hf_to_megatron, convert_megatron_to_hf

WORKER = REPO / "tests" / "tools" / "megatron_layout_worker.py"

# name: (processes, worker layout flags, checkpoint kind, save a training checkpoint, --tp of the conversion)
LAYOUTS = {
    "tp1": (1, [], "policy", True, 1),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"], "policy", True, 2),
    "pp2_vp2_tied": (2, ["--pp", "2", "--vp", "2"], "tied4", False, 2),
    "critic_tp2": (2, ["--tp", "2", "--head", "value"], "critic", True, 2),
}


def hf_dir_of(kind: str, root):
    """A tiny HF directory: the policy, a 4-layer tied-embedding policy, or a critic (no lm_head, a value head)."""
    cfg = get_preset("tiny")
    if kind == "tied4":
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=4, tie_word_embeddings=True))
    state = reference.hf_state_dict(reference.build_hf_model(cfg, seed=1))
    if kind == "tied4":
        state.pop("lm_head.weight", None)
    if kind == "critic":
        state.pop("lm_head.weight")
        state["value_head.weight"] = torch.randn(1, cfg.text.hidden_size, generator=torch.Generator().manual_seed(2))
    return write_hf_checkpoint(root / f"hf_{kind}", cfg, state.items())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")

    hf_of = lru_cache(maxsize=None)(lambda kind: hf_dir_of(kind, root))

    @lru_cache(maxsize=None)
    def hf_and_megatron(kind: str, tp: int):
        hf = hf_of(kind)
        out = root / f"mcore_{kind}_tp{tp}"
        convert_hf_to_megatron.main(["--hf-dir", str(hf), "--out", str(out), "--tp", str(tp), "--no-progress"])
        return hf, out

    @lru_cache(maxsize=None)
    def at(layout: str):
        nproc, flags, kind, save, tp = LAYOUTS[layout]
        model_tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
        hf, megatron = hf_and_megatron(kind, tp)
        out = root / f"run_{layout}"
        out.mkdir()
        training = root / f"train_{layout}"
        torchrun(WORKER, nproc, "--ckpt", str(megatron), "--hf-dir", str(hf), "--out", str(out), *flags,
                 *(["--save-training", str(training)] if save else []))
        layout_entries = [e for r in range(nproc) for e in json.loads((out / f"ssd_rank{r}.json").read_text())]
        return dict(hf=hf, megatron=megatron, out=out, training=training if save else None, entries=layout_entries,
                    same_tp=tp == model_tp)

    return at


def _overlap(offset, shape, chunk_offset, chunk_shape) -> int:
    volume = 1
    for o, s, c, t in zip(offset, shape, chunk_offset, chunk_shape):
        volume *= max(0, min(o + s, c + t) - max(o, c))
    return volume


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_writer_layout_equals_model_sharded_state_dict(run, layout):
    result = run(layout)
    model_tensors = [e for e in result["entries"] if e["kind"] == "tensor"]
    model_objects = {e["key"] for e in result["entries"] if e["kind"] == "object"}
    assert all(e["kind"] in ("tensor", "object") for e in result["entries"]), "unexpected sharded entries"
    reader = DistReader(resolve_iteration(result["megatron"]))
    stored = reader.tensors()
    meta = reader._metadata.state_dict_metadata
    stored_objects = {k for k in meta if k not in stored}

    assert {e["key"] for e in model_tensors} == set(stored)
    assert model_objects == stored_objects
    for e in model_tensors:
        key = e["key"]
        assert tuple(e["global_shape"]) == tuple(stored[key].shape), key
        assert not e["flattened_range"], key
        shard_shape = [1] * e["prepend_axis_num"] + e["local_shape"]
        covered = sum(_overlap(e["global_offset"], shard_shape, c.offsets, c.sizes) for c in meta[key].chunks)
        assert covered == torch.Size(shard_shape).numel(), f"{key} shard at {e['global_offset']} is not covered"
    if result["same_tp"]:  # written for this TP: the stored chunks ARE the model's shards
        for key in stored:
            model = {(tuple(e["global_offset"]), tuple([1] * e["prepend_axis_num"] + e["local_shape"]))
                     for e in model_tensors if e["key"] == key}
            ours = {(tuple(c.offsets), tuple(c.sizes)) for c in meta[key].chunks}
            assert model == ours, key
    # The model's main replicas tile each global tensor (what a megatron save would write) ...
    for key, info in stored.items():
        main = [e for e in model_tensors if e["key"] == key and all(r == 0 for r in e["replica_id"])]
        volume = sum(torch.Size([1] * e["prepend_axis_num"] + e["local_shape"]).numel() for e in main)
        assert volume == info.shape.numel(), key
    # ... and so do our stored chunks (per layer; whole, or the TP fragments of the conversion's --tp).
    for key, info in stored.items():
        assert sum(torch.Size(c.sizes).numel() for c in meta[key].chunks) == info.shape.numel(), key
    reader.close()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_loads_model_free_checkpoint_bit_exact(run, layout):
    loaded = json.loads((run(layout)["out"] / "load.json").read_text())
    assert loaded["mismatched"] == []
    assert loaded["exported"] == loaded["expected"]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [name for name, spec in LAYOUTS.items() if spec[3]])
def test_training_checkpoint_converts_to_hf_bit_exact(run, layout, tmp_path):
    result = run(layout)
    reader = DistReader(resolve_iteration(result["training"]))
    assert any(k.startswith("optimizer.") for k in reader.tensors()), "the training checkpoint has optimizer state"
    reader.close()
    out = tmp_path / "hf"
    convert_megatron_to_hf.main(["--ckpt", str(result["training"]), "--out", str(out), "--no-progress"])
    original, again = HFCheckpoint(result["hf"]), HFCheckpoint(out)
    assert again.head == original.head
    assert sorted(again.names()) == sorted(original.names())
    for name in original.names():
        assert torch.equal(again.get(name), original.get(name)), name


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_fragments_are_the_tables_shards(tp):
    """Each TP rank's stored fragments, put together, are ``entry.shard(full, rank, tp)``."""
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(  # 4 KV groups and 4 ViT heads, so TP4 divides every split
        cfg, vision=dataclasses.replace(cfg.vision, num_heads=4),
        text=dataclasses.replace(cfg.text, num_attention_heads=8, num_key_value_heads=4, mrope_section=(2, 3, 3)))
    gen = torch.Generator().manual_seed(0)
    for tensor in model_tensors(cfg):
        full = torch.randn(tensor.shape, generator=gen)
        chunk = full.reshape(tensor.chunk_shape())
        pieces = tp_fragments(tensor, chunk, tp)
        if tensor.entry.tp_dim is None:
            assert len(pieces) == 1
            continue
        dim = tensor.entry.tp_dim + (tensor.num_layers is not None)
        per_rank = len(pieces) // tp  # 2 for gate/up: fragments r and tp + r
        for rank in range(tp):
            mine = torch.cat([pieces[rank + i * tp][1] for i in range(per_rank)], dim=dim)
            expected = tensor.entry.shard(full, rank, tp).reshape(mine.shape)
            assert torch.equal(mine, expected), (tensor.key, rank)
