"""Streaming reader and writer of HF Qwen2.5-VL checkpoint directories (``config.json`` + safetensors).

Contract:
- ``HFCheckpoint(path)`` opens a directory holding ``config.json`` and either ``model.safetensors`` or
  sharded ``model-0000i-of-0000n.safetensors`` files listed in ``model.safetensors.index.json``. Opening
  reads only the config and the safetensors headers; ``get(name)`` reads one tensor. ``names()`` are the
  canonical on-disk names (``visual.*``, ``model.*``, ``lm_head.*``); ``get`` also accepts transformers'
  in-memory names. Every failure names the offending file or tensor.
- A PPO critic is stored as the policy's layout without ``lm_head.weight``, plus ``value_head.safetensors``
  holding ``value_head.weight`` ``[1, hidden]`` (no bias). The separate file keeps the main index loadable
  by transformers and vLLM as a plain model (no unknown key); ``HFCheckpoint`` lists the value head with
  the other names and ``head`` says which kind a directory is.
- ``write_hf_checkpoint(out_dir, cfg, tensors)`` streams ``(name, tensor)`` pairs into shards of at most
  ``max_shard_bytes`` (a larger single tensor gets a shard of its own) and writes the index, ``config.json``
  and ``generation_config.json``. Without a ``plan`` it holds one shard in memory; with a ``plan`` (every
  tensor's name, shape and dtype, in stream order) the shard headers are known up front and each tensor
  goes straight to its file, so memory holds one tensor. ``value_head.weight`` goes to its own file.
  Everything is written into a temp directory next to ``out_dir`` that is renamed at the end, so a failure
  never leaves a partial ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.mapping.qwen2_5_vl import VALUE_HEAD_HF_NAME, canonical_hf_name, check_hf_names

# Tokenizer and processor files a served or evaluated checkpoint needs next to the weights.
AUXILIARY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
VALUE_HEAD_FILE = "value_head.safetensors"
"""A critic's value head, next to the trunk's shards (see the module docstring)."""


def _read_header_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or corrupt?)") from e


class HFCheckpoint:
    """A lazily read HF checkpoint directory; see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.path} does not exist")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"HF checkpoint {self.path} has no config.json")
        self.config = Qwen25VLConfig.from_hf_config(json.loads(config_file.read_text()))
        # canonical name -> (file, the key stored in that file)
        self._where: dict[str, tuple[Path, str]] = {}
        index_file = self.path / INDEX_FILE
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            shard_keys = {}
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise FileNotFoundError(f"{index_file} names shard {shard}, which does not exist in {self.path}")
                # Headers only: a truncated shard or a stale index fails here, not halfway through a load.
                shard_keys[shard] = set(_read_header_keys(self.path / shard))
            for key, shard in weight_map.items():
                if key not in shard_keys[shard]:
                    raise KeyError(f"{index_file} puts tensor {key!r} in {shard}, which does not hold it")
            stored = [(self.path / shard, key) for key, shard in weight_map.items()]
        elif (self.path / SINGLE_FILE).is_file():
            stored = [(self.path / SINGLE_FILE, key) for key in _read_header_keys(self.path / SINGLE_FILE)]
        else:
            raise FileNotFoundError(f"HF checkpoint {self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        if (self.path / VALUE_HEAD_FILE).is_file():
            stored += [(self.path / VALUE_HEAD_FILE, key) for key in _read_header_keys(self.path / VALUE_HEAD_FILE)]
        for file, key in stored:
            self._where[canonical_hf_name(key)] = (file, key)

    def names(self) -> list[str]:
        return list(self._where)

    @property
    def head(self) -> str:
        """"value" for a critic checkpoint (it has ``value_head.weight``), else "lm"."""
        return "value" if VALUE_HEAD_HF_NAME in self._where else "lm"

    def load_into(self, model_chunks) -> None:
        """Checks that the tensor names are exactly the config's, then loads this rank's shards into the
        megatron model chunks, one tensor at a time. A critic (``head="value"``) loads a critic checkpoint
        whole, or the trunk of a policy checkpoint (its freshly initialised head is kept)."""
        from megatron_ovr.mapping.stream import load_hf_weights  # needs megatron-core

        model_head = getattr(model_chunks[0], "head", "lm")
        stored_head = "value" if VALUE_HEAD_HF_NAME in self._where else "lm"
        if model_head == "lm" and stored_head == "value":
            raise ValueError(f"{self.path} is a critic checkpoint (it has {VALUE_HEAD_HF_NAME}, no LM head): "
                             "it cannot start a policy")
        check_hf_names(self.config, self.names(), head=stored_head)
        keep = (VALUE_HEAD_HF_NAME,) if model_head != stored_head else ()
        load_hf_weights(model_chunks, self.config, self.get, keep=keep)

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's stored dtype, from the safetensors header (no data read)."""
        file, key = self._locate(name)
        with safe_open(file, framework="pt") as f:
            return _TORCH_DTYPES[f.get_slice(key).get_dtype()]

    def _locate(self, name: str) -> tuple[Path, str]:
        canonical = canonical_hf_name(name)
        if canonical not in self._where:
            raise KeyError(f"tensor {name!r} is not in HF checkpoint {self.path}")
        return self._where[canonical]

    def get(self, name: str) -> torch.Tensor:
        canonical = canonical_hf_name(name)
        if canonical not in self._where:
            raise KeyError(f"tensor {name!r} is not in HF checkpoint {self.path}")
        file, key = self._where[canonical]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read tensor {key!r} from {file}: {e} (truncated or corrupt?)") from e


def _prepare(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    tensor = tensor.detach().to("cpu", dtype).contiguous()
    # safetensors refuses tensors that share storage (e.g. gate and up chunks of one fused tensor): a view
    # into a larger storage gets its own copy.
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def apply_umask(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only entries (0700 / 0600); a checkpoint gets the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


# safetensors' names for torch dtypes (its header format).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}

PlanItem = tuple[str, Sequence[int], torch.dtype]
"""One tensor of a streamed checkpoint: ``(name, shape, dtype as written)``."""


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _assign_shards(items: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Groups names in order into shards of at most ``max_shard_bytes`` (an oversized tensor alone)."""
    shards: list[list[str]] = []
    size = 0
    for name, nbytes in items:
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_planned_shard(path: Path, names: Sequence[str], plan: dict[str, PlanItem],
                         stream: Iterator[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype]) -> None:
    """Writes one safetensors file whose header is known up front, pulling its tensors from ``stream`` in
    order and writing each one's bytes straight to disk."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        _, shape, tensor_dtype = plan[name]
        end = offset + _nbytes(shape, tensor_dtype)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor_dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for expected in names:
            name, tensor = next(stream, (None, None))
            if name is None:
                raise ValueError(f"the tensor stream ended before {expected!r} (it must follow the plan)")
            name = canonical_hf_name(name)
            _, shape, tensor_dtype = plan[expected]
            if name != expected:
                raise ValueError(f"the tensor stream gave {name!r} where the plan has {expected!r}")
            tensor = tensor.detach().to("cpu", dtype).contiguous()  # bytes go straight out: a view needs no copy
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != tensor_dtype:
                raise ValueError(f"{name}: streamed {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} "
                                 f"{tensor_dtype}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    cfg: Qwen25VLConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = 2**30,
    dtype: Optional[torch.dtype] = None,
    auxiliary_from: Optional[str | os.PathLike] = None,
    plan: Optional[Sequence[PlanItem]] = None,
) -> Path:
    """Writes a sharded HF checkpoint (on-disk tensor names) into ``out_dir``, which must not exist or be
    empty. ``auxiliary_from``: a directory whose tokenizer/processor files (``AUXILIARY_FILES``) are copied
    along (its generation config replaces the default one). ``plan``: every tensor's ``(name, shape, dtype
    as written)`` in stream order, for one-tensor-at-a-time writing (see the module docstring); the stream
    must then follow it exactly. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        value_head: dict[str, torch.Tensor] = {}
        stream = iter(tensors)
        if plan is not None:
            shard_of, total_bytes, float_dtypes = _write_planned(tmp, plan, stream, dtype, max_shard_bytes, value_head)
        else:
            shard_of, total_bytes, float_dtypes = _write_buffered(tmp, stream, dtype, max_shard_bytes, value_head)
        if value_head:
            save_file(value_head, str(tmp / VALUE_HEAD_FILE), metadata={"format": "pt"})
            float_dtypes.update(t.dtype for t in value_head.values())
        index = {"metadata": {"total_size": total_bytes}, "weight_map": shard_of}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf_config = cfg.to_hf_config()
        if len(float_dtypes) == 1:  # the config states the dtype the weights are stored in
            hf_config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        # Qwen ends generation at <|im_end|> and at <|endoftext|> (which is also its bos and pad token).
        generation = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.bos_token_id,
                      "eos_token_id": [cfg.eos_token_id, cfg.bos_token_id]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if auxiliary_from is not None:
            for file_name in AUXILIARY_FILES:
                if (Path(auxiliary_from) / file_name).is_file():
                    shutil.copyfile(Path(auxiliary_from) / file_name, tmp / file_name)
        apply_umask(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); a rename cannot replace it portably
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _shard_name(i: int, count: int) -> str:
    return f"model-{i:05d}-of-{count:05d}.safetensors"


def _write_planned(tmp: Path, plan: Sequence[PlanItem], stream, dtype, max_shard_bytes: int,
                   value_head: dict) -> tuple[dict[str, str], int, set]:
    by_name: dict[str, PlanItem] = {}
    for name, shape, tensor_dtype in plan:
        name = canonical_hf_name(name)
        if name in by_name:
            raise ValueError(f"tensor {name!r} is given twice")
        by_name[name] = (name, tuple(shape), tensor_dtype)
    order = list(by_name)
    if VALUE_HEAD_HF_NAME in by_name and order[-1] != VALUE_HEAD_HF_NAME:
        raise ValueError(f"{VALUE_HEAD_HF_NAME} must come last in the plan")
    trunk = [n for n in order if n != VALUE_HEAD_HF_NAME]
    if not trunk:
        raise ValueError("no tensors to write")
    shards = _assign_shards([(n, _nbytes(*by_name[n][1:])) for n in trunk], max_shard_bytes)
    shard_of: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file_name = _shard_name(i, len(shards))
        _write_planned_shard(tmp / file_name, names, by_name, stream, dtype)
        shard_of.update(dict.fromkeys(names, file_name))
    if VALUE_HEAD_HF_NAME in by_name:
        name, tensor = next(stream, (None, None))
        if name is None or canonical_hf_name(name) != VALUE_HEAD_HF_NAME:
            raise ValueError(f"the tensor stream gave {name!r} where the plan has {VALUE_HEAD_HF_NAME!r}")
        value_head[VALUE_HEAD_HF_NAME] = _prepare(tensor, dtype)
    if next(stream, None) is not None:
        raise ValueError("the tensor stream has more tensors than the plan")
    total = sum(_nbytes(*by_name[n][1:]) for n in trunk)
    floats = {by_name[n][2] for n in trunk if by_name[n][2].is_floating_point}
    return shard_of, total, floats


def _write_buffered(tmp: Path, stream, dtype, max_shard_bytes: int,
                    value_head: dict) -> tuple[dict[str, str], int, set]:
    shard_index: dict[str, int] = {}  # name -> number of the shard (from 1) that holds it
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = written = 0
    float_dtypes: set[torch.dtype] = set()

    def flush() -> None:
        nonlocal shard, shard_bytes, written
        written += 1
        save_file(shard, str(tmp / f"shard-{written}.safetensors"), metadata={"format": "pt"})
        shard_index.update(dict.fromkeys(shard, written))
        shard, shard_bytes = {}, 0

    for name, tensor in stream:
        name = canonical_hf_name(name)
        if name in shard_index or name in shard or name in value_head:
            raise ValueError(f"tensor {name!r} is given twice")
        tensor = _prepare(tensor, dtype)
        if name == VALUE_HEAD_HF_NAME:
            value_head[name] = tensor
            continue
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
        if tensor.is_floating_point():
            float_dtypes.add(tensor.dtype)
    if not shard:
        raise ValueError("no tensors to write")
    flush()
    # The shard count is known only now: give the files their final ``-of-`` names.
    final = {i: _shard_name(i, written) for i in range(1, written + 1)}
    for i, file_name in final.items():
        (tmp / f"shard-{i}.safetensors").rename(tmp / file_name)
    return {n: final[i] for n, i in shard_index.items()}, total_bytes, float_dtypes
