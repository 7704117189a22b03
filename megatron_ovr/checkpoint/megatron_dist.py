"""Qwen2.5-VL megatron checkpoints without building the model: which sharded keys the model's
``sharded_state_dict()`` saves and loads, and streaming reads and writes of them.

The layout comes from the one mapping table (``qwen2_5_vl_mappings``), which names every megatron
parameter; megatron-core 0.16 then fixes how a parameter becomes a sharded key:
- a transformer-layer parameter ``....layers.<i>.<rest>`` is one global tensor ``....layers.<rest>`` with a
  leading layer axis ``[num_layers, *shape]`` (pipeline and virtual stages only change which rank holds
  which layer: the key is the same at every PP/VP layout);
- TP splits are fragments of the same global tensor (megatron reshards on load); the global tensor is the
  table's ``hf_to_megatron`` layout of the full weight (QKV grouped per query group; ``linear_fc1`` =
  [gate; up], which is how megatron's SwiGLU factory lays out its TP fragments). The writer stores the
  fragments a model at one chosen TP saves (``tp_fragments``), so a load at that TP reads exactly its own
  bytes and any other layout stitches them, as it does for a training checkpoint;
- every ``linear_qkv/linear_proj/linear_fc1/linear_fc2`` module also saves an (empty) ``_extra_state``
  object, one per layer, which a load requests.
``tests/tools/test_megatron_layout.py`` checks all of this against the model's own sharded state dict at
TP1, TP2 x PP2 and PP2 x VP2 (tied embeddings), for the policy and the critic (torch layer spec; the TE
spec's fused norm names come from the table, its layout is not checked on CPU).

``ModelTensor`` is one sharded key; a *source* is any ``f(model_tensor, layer) -> full megatron tensor``
(an HF directory, a megatron checkpoint, an average of several): ``write_megatron_checkpoint`` streams one
into a new checkpoint, ``hf_tensors`` streams one out under HF names.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.mapping.params import QKV, GatedMLP, ParamMapping
from megatron_ovr.mapping.qwen2_5_vl import qwen2_5_vl_mappings

from .dist_format import DistReader, DistWriter, is_dist_checkpoint, object_key

LATEST = "latest"  # the same names as megatron_ovr.training.checkpointing (kept import-free of megatron)
OUTPUT_LAYER = "language_model.output_layer.weight"
TE_NORM_KEY = "language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"
_LAYERS = re.compile(r"^(?P<stack>.*\.layers)\.\*\.(?P<rest>.*)$")
_EXTRA_STATE_MODULES = re.compile(r"\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight$")

Source = Callable[["ModelTensor", Optional[int]], torch.Tensor]


def iteration_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


@dataclass(frozen=True)
class ModelTensor:
    """One sharded key of the model: ``num_layers`` is set for a stacked transformer-layer key."""

    entry: ParamMapping
    key: str
    shape: tuple[int, ...]  # the full (unsharded) megatron tensor of one layer
    num_layers: Optional[int] = None

    @property
    def layers(self) -> Sequence[Optional[int]]:
        return range(self.num_layers) if self.num_layers is not None else [None]

    @property
    def global_shape(self) -> tuple[int, ...]:
        return (self.num_layers, *self.shape) if self.num_layers is not None else self.shape

    def offsets(self, layer: Optional[int]) -> tuple[int, ...]:
        return (layer, *[0] * len(self.shape)) if layer is not None else (0,) * len(self.shape)

    def chunk_shape(self) -> tuple[int, ...]:
        return (1, *self.shape) if self.num_layers is not None else self.shape

    def hf_names(self, layer: Optional[int]) -> list[str]:
        return [n.replace("*", str(layer)) for n in self.entry.hf] if layer is not None else list(self.entry.hf)

    def nbytes(self, dtype: torch.dtype) -> int:
        return torch.Size(self.global_shape).numel() * torch.empty((), dtype=dtype).element_size()


def megatron_shape(cfg: Qwen25VLConfig, name: str) -> tuple[int, ...]:
    """The full megatron shape of table parameter ``name`` (``*`` for the layer index), from the config alone
    (so a checkpoint whose tensors disagree with its config fails naming the tensor)."""
    v, t = cfg.vision, cfg.text
    merged = v.hidden_size * v.merge_unit
    fixed = {
        "vision.patch_embed.weight": (v.hidden_size, v.patch_dim),
        "vision.merger_norm.weight": (v.hidden_size,),
        "vision.merger.encoder.linear_fc1.weight": (merged, merged),
        "vision.merger.encoder.linear_fc1.bias": (merged,),
        "vision.merger.encoder.linear_fc2.weight": (t.hidden_size, merged),
        "vision.merger.encoder.linear_fc2.bias": (t.hidden_size,),
        "language_model.embedding.word_embeddings.weight": (t.vocab_size, t.hidden_size),
        "language_model.decoder.final_layernorm.weight": (t.hidden_size,),
    }
    if name in fixed:
        return fixed[name]
    if name.startswith("vision.decoder.layers.*."):
        width, ffn, q, kv = v.hidden_size, v.intermediate_size, v.num_heads * v.head_dim, v.num_heads * v.head_dim
    elif name.startswith("language_model.decoder.layers.*."):
        width, ffn = t.hidden_size, t.intermediate_size
        q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    else:
        raise KeyError(f"no shape rule for megatron parameter {name!r}")
    module, kind = name.rsplit(".", 2)[-2:]
    rules = {
        ("linear_qkv", "weight"): (q + 2 * kv, width), ("linear_qkv", "bias"): (q + 2 * kv,),
        ("linear_proj", "weight"): (width, q), ("linear_proj", "bias"): (width,),
        ("linear_fc1", "weight"): (2 * ffn, width), ("linear_fc1", "bias"): (2 * ffn,),
        ("linear_fc2", "weight"): (width, ffn), ("linear_fc2", "bias"): (width,),
    }
    if (module, kind) in rules:
        return rules[(module, kind)]
    if "norm" in name:
        return (width,)
    raise KeyError(f"no shape rule for megatron parameter {name!r}")


def output_layer_shape(cfg: Qwen25VLConfig, head: str) -> tuple[int, ...]:
    return (1, cfg.text.hidden_size) if head == "value" else (cfg.text.vocab_size, cfg.text.hidden_size)


def model_tensors(cfg: Qwen25VLConfig, backend: str = "torch", head: str = "lm") -> list[ModelTensor]:
    """Every sharded tensor key of the model (policy: ``head="lm"``, critic: ``"value"``), in table order."""
    tensors = []
    for entry in qwen2_5_vl_mappings(cfg, backend, head):
        if not entry.export:
            continue  # a tied output layer is saved under the embedding's key, as a non-main replica
        if entry.megatron == OUTPUT_LAYER:
            shape = output_layer_shape(cfg, head)
        else:
            shape = megatron_shape(cfg, entry.megatron)
        match = _LAYERS.match(entry.megatron)
        if match:
            count = cfg.vision.depth if entry.megatron.startswith("vision.") else cfg.text.num_layers
            tensors.append(ModelTensor(entry, f"{match['stack']}.{match['rest']}", shape, count))
        else:
            tensors.append(ModelTensor(entry, entry.megatron, shape))
    return tensors


def extra_state_keys(tensors: Sequence[ModelTensor]) -> list[str]:
    """The unique keys of the ``_extra_state`` objects the model saves (one per linear module and layer)."""
    keys = []
    for t in tensors:
        if not _EXTRA_STATE_MODULES.search(t.key):
            continue
        key = t.key[: -len(".weight")] + "._extra_state"
        if t.num_layers is None:
            keys.append(object_key(key, (0,), (1,)))
        else:
            keys.extend(object_key(key, (i,), (t.num_layers,)) for i in range(t.num_layers))
    return keys


# ----------------------------------------------------------------------------------------------- reading


def resolve_iteration(path: str | os.PathLike) -> Path:
    """A checkpoint root (``latest`` pointer) or one ``iter_NNNNNNN`` directory -> the iteration directory."""
    path = Path(path)
    if is_dist_checkpoint(path):
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"{path} is neither a megatron checkpoint root (no '{LATEST}' pointer) nor an "
                                "iteration directory (no metadata.json and .metadata)")
    step = int(pointer.read_text().strip())
    directory = iteration_dir(path, step)
    if not is_dist_checkpoint(directory):
        raise FileNotFoundError(f"{pointer} names iteration {step}, but {directory} is missing or incomplete")
    return directory


def list_iterations(root: str | os.PathLike) -> list[Path]:
    """The complete iteration directories under a checkpoint root, oldest first (``.partial`` ones skipped)."""
    found = []
    for d in Path(root).glob("iter_*"):
        match = re.fullmatch(r"iter_(\d+)", d.name)
        if match and is_dist_checkpoint(d):
            found.append((int(match.group(1)), d))
    return [d for _, d in sorted(found)]


class MegatronCheckpoint:
    """A megatron checkpoint read tensor by tensor: a converted one, or an SFT/PPO training checkpoint (its
    optimizer and RNG state are never read), at whatever layout it was saved. The model kind is detected
    from the keys: the layer spec (TE's fused norm names or torch's) and the head (a ``[1, hidden]``
    output layer is a critic's value head)."""

    def __init__(self, path: str | os.PathLike):
        self.directory = resolve_iteration(path)
        self.reader = DistReader(self.directory)
        self.extra: dict[str, Any] = self.reader.common().get("extra") or {}
        if "model_config" not in self.extra:
            raise KeyError(f"checkpoint {self.directory} does not record its model config ('model_config')")
        self.config = Qwen25VLConfig.from_hf_config(self.extra["model_config"])
        stored = self.reader.tensors()
        self.backend = "te" if TE_NORM_KEY in stored else "torch"
        output = stored.get(OUTPUT_LAYER)
        self.head = "value" if output is not None and output.shape[0] == 1 else "lm"
        self.tensors = model_tensors(self.config, self.backend, self.head)
        for t in self.tensors:
            if t.key not in stored:
                raise KeyError(f"checkpoint {self.directory} has no tensor {t.key!r} (is it a Qwen2.5-VL model "
                               "checkpoint of the recorded config?)")
            if tuple(stored[t.key].shape) != t.global_shape:
                raise ValueError(f"checkpoint {self.directory}: {t.key} has shape {tuple(stored[t.key].shape)}, "
                                 f"its recorded config needs {t.global_shape} (config mismatch)")
        self.dtype = stored[self.tensors[0].key].dtype

    def dtype_of(self, tensor: ModelTensor) -> torch.dtype:
        return self.reader.info(tensor.key).dtype

    def get(self, tensor: ModelTensor, layer: Optional[int]) -> torch.Tensor:
        """One layer's full megatron tensor (or the whole tensor of a plain key)."""
        out = self.reader.read(tensor.key, tensor.offsets(layer), tensor.chunk_shape())
        return out[0] if layer is not None else out

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "MegatronCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hf_tensors(tensors: Sequence[ModelTensor], source: Source, *, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every exported HF tensor, one megatron tensor at a time."""
    for t in tensors:
        for layer in t.layers:
            full = source(t, layer)
            yield from zip(t.hf_names(layer), t.entry.megatron_to_hf(full))
            if progress is not None:
                progress.update(full.numel())
            del full


def hf_plan(tensors: Sequence[ModelTensor], dtype_of: Callable[[ModelTensor], torch.dtype]):
    """``(hf_name, shape, dtype)`` of every tensor ``hf_tensors`` yields, in order."""
    plan = []
    for t in tensors:
        dtype = dtype_of(t)
        # Run the table's format change on an uninitialised tensor: its pages are never touched (reshapes and
        # splits are views), and unlike the meta device this needs no torch._dynamo import (2 s).
        shapes = [tuple(x.shape) for x in t.entry.megatron_to_hf(torch.empty(t.shape, dtype=dtype))]
        for layer in t.layers:
            plan.extend((n, shape, dtype) for n, shape in zip(t.hf_names(layer), shapes))
    return plan


# ----------------------------------------------------------------------------------------------- writing


def _prepare_out(out: Path) -> None:
    if (out / LATEST).exists():
        raise FileExistsError(f"{out} already holds a megatron checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")


def write_megatron_checkpoint(
    out: str | os.PathLike,
    cfg: Qwen25VLConfig,
    tensors: Sequence[ModelTensor],
    source: Source,
    *,
    extra: dict[str, Any],
    dtype: Optional[torch.dtype] = None,
    tp: int = 1,
    fsync: bool = False,
    progress=None,
) -> Path:
    """Writes a model-only checkpoint root ``out`` (``iter_0000000`` + ``latest``) that the trainer
    (``model.megatron_dir``), ``checkpointing.load_checkpoint`` and the reverse converter read at any
    TP/PP/VP layout. Tensors come from ``source`` one layer at a time and go straight to disk; ``dtype``
    casts them (default: as the source gives them). ``tp`` stores each TP-split weight as the fragments a
    TP=``tp`` model saves (``tp_fragments``), so a load at that TP reads exactly its own bytes; any other
    layout still loads (megatron stitches fragments). The root is assembled in a temp directory next to
    ``out`` and renamed when complete (after an fsync of the data with ``fsync``). Returns ``out``."""
    out = Path(out)
    _prepare_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = None
    try:
        writer = DistWriter(iteration_dir(tmp, 0))
        for t in tensors:
            for layer in t.layers:
                full = source(t, layer)
                if tuple(full.shape) != t.shape:
                    raise ValueError(f"{t.entry.megatron} (layer {layer}) from {t.hf_names(layer)}: shape "
                                     f"{tuple(full.shape)}, the config needs {t.shape}: does config.json match "
                                     "the weights?")
                if dtype is not None:
                    full = full.to(dtype)
                chunk = full.reshape(t.chunk_shape())
                for axis_offset, piece in tp_fragments(t, chunk, tp):
                    offsets = list(t.offsets(layer))
                    if axis_offset:
                        offsets[t.entry.tp_dim + (t.num_layers is not None)] = axis_offset
                    writer.add_tensor(t.key, piece, t.global_shape, offsets)
                del chunk
                if progress is not None:
                    progress.update(full.numel())
                del full
        for key in extra_state_keys(tensors):
            writer.add_object(key, None)
        writer.finish({"extra": extra}, fsync=fsync)
        (tmp / LATEST).write_text("0\n")
        tmp.chmod(0o777 & ~_umask())
        _prepare_out(out)  # nobody wrote it meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tp_fragments(tensor: ModelTensor, chunk: torch.Tensor, tp: int) -> list[tuple[int, torch.Tensor]]:
    """``(offset along the TP axis, piece)`` of one stored chunk as a TP=``tp`` model saves it: ``tp`` even
    pieces along the entry's TP dimension (QKV groups stay whole: the table checks ``tp`` divides them), and
    ``2 * tp`` for a fused gate/up ``linear_fc1``, even at TP1 (megatron's SwiGLU factory saves gate_r at
    fragment r and up_r at fragment tp + r, and loads them as two reads). Replicated tensors stay whole."""
    dim = tensor.entry.tp_dim
    parts = 2 * tp if isinstance(tensor.entry, GatedMLP) else tp
    if parts == 1 or dim is None:
        return [(0, chunk)]
    dim += tensor.num_layers is not None  # the stacked layer axis comes first
    if isinstance(tensor.entry, QKV) and tensor.entry.num_groups % tp:
        raise ValueError(f"{tensor.entry.megatron}: {tensor.entry.num_groups} query groups do not split into {tp}")
    if chunk.shape[dim] % parts:
        raise ValueError(f"{tensor.key}: dimension {dim} of size {chunk.shape[dim]} does not split into {parts} "
                         f"TP fragments")
    size = chunk.shape[dim] // parts
    return [(i * size, piece) for i, piece in enumerate(chunk.split(size, dim=dim))]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
