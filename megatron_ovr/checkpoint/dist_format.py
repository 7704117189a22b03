"""Streaming reader and writer of megatron-core ``torch_dist`` checkpoint directories, without a model,
without megatron and without a process group.

A ``torch_dist`` directory (what ``megatron.core.dist_checkpointing.save`` writes) is a PyTorch DCP
checkpoint plus two megatron files:
- ``__R_K.distcp``: concatenated ``torch.save`` blobs, one per stored chunk of a tensor or per object;
- ``.metadata``: a pickled ``torch.distributed.checkpoint.metadata.Metadata``: for each sharded key its
  global size, dtype and stored chunks (offsets, sizes), and where each chunk's blob lies (file, offset,
  length); objects (megatron ``ShardedObject``) are keyed by their unique key (``key/shard_<off>_<shape>``);
- ``common.pt``: the non-sharded state (``torch.save`` of a dict); ``metadata.json``: the backend names.

Contract:
- ``DistWriter(directory)`` appends one chunk at a time (``add_tensor``) straight to the ``.distcp`` file, so
  memory holds the chunk being written and nothing else; ``finish(common)`` writes the metadata files.
  Chunks of one key must tile its global tensor (checked); megatron reshards on load, so a chunk may be
  larger than any model shard that reads it (one full tensor serves every TP rank).
- ``DistReader(directory)`` reads the metadata once; ``read(key, offsets, sizes)`` returns any region of a
  global tensor (default: all of it), assembled from the stored chunks it overlaps, loading only those.
  Any saving layout (TP/PP/VP/DP, distributed optimizer) reads the same; keys not asked for (optimizer
  state, RNG) are never touched.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"
DATA_FILE = "__0_0.distcp"
# What megatron's ``save_config`` writes for the torch_dist backend.
BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                  "common_backend_version": 1}
DCP_VERSION = "1.0.0"


def is_dist_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / METADATA_FILE).is_file()


def object_key(key: str, offsets: Sequence[int], shape: Sequence[int]) -> str:
    """megatron's ``ShardedObject.unique_key``."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.save`` writes a tensor's whole storage: a view into a larger one gets its own copy."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _save_without_crc(tensor: torch.Tensor, file) -> None:
    """``torch.save`` without the zip records' CRC32: nothing checks it (``torch.load`` and megatron's
    loader ignore it) and computing it is a large share of the writer's CPU time."""
    get, set_ = (getattr(torch.serialization, n, None) for n in ("get_crc32_options", "set_crc32_options"))
    if get is None or set_ is None:
        torch.save(tensor, file)
        return
    previous = get()
    set_(False)
    try:
        torch.save(tensor, file)
    finally:
        set_(previous)


class DistWriter:
    """Writes one ``torch_dist`` checkpoint directory (see the module docstring); ``directory`` must not exist
    or be empty. Not atomic by itself: callers write into a temporary directory and rename it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if any(self.directory.iterdir()):
            raise FileExistsError(f"{self.directory} is not empty")
        self._file = open(self.directory / DATA_FILE, "wb")
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self.bytes_written = 0

    def _append(self, write) -> tuple[int, int]:
        offset = self._file.tell()
        write(self._file)
        length = self._file.tell() - offset
        self.bytes_written += length
        return offset, length

    def add_tensor(self, key: str, chunk: torch.Tensor, global_shape: Sequence[int],
                   offsets: Optional[Sequence[int]] = None) -> None:
        """Stores ``chunk`` as the region of global tensor ``key`` that starts at ``offsets`` (default: the
        origin). ``chunk`` has as many dimensions as the global tensor (megatron's stacked-layer keys have
        a leading layer axis: pass ``layer_weight[None]`` at offset ``(layer, 0, ...)``)."""
        global_shape = torch.Size(global_shape)
        offsets = torch.Size(offsets if offsets is not None else [0] * len(global_shape))
        if chunk.dim() != len(global_shape) or len(offsets) != len(global_shape):
            raise ValueError(f"{key}: chunk {tuple(chunk.shape)} at {tuple(offsets)} does not match the global "
                             f"shape {tuple(global_shape)}")
        if any(o + s > g for o, s, g in zip(offsets, chunk.shape, global_shape)):
            raise ValueError(f"{key}: chunk {tuple(chunk.shape)} at {tuple(offsets)} exceeds {tuple(global_shape)}")
        meta = self._tensors.get(key)
        properties = TensorProperties(dtype=chunk.dtype)
        if meta is None:
            meta = self._tensors[key] = TensorStorageMetadata(properties, global_shape, [])
        elif meta.size != global_shape or meta.properties.dtype != chunk.dtype:
            raise ValueError(f"{key}: chunks disagree on global shape/dtype ({tuple(meta.size)} "
                             f"{meta.properties.dtype} vs {tuple(global_shape)} {chunk.dtype})")
        chunk = _compact(chunk)
        offset, length = self._append(lambda f: _save_without_crc(chunk, f))
        meta.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=chunk.shape))
        self._storage[MetadataIndex(key, offsets)] = _StorageInfo(DATA_FILE, offset, length)

    def add_object(self, unique_key: str, data: Any) -> None:
        """Stores a megatron ``ShardedObject`` (serialised as megatron does: a one-element list)."""
        if unique_key in self._objects:
            raise ValueError(f"object {unique_key!r} is given twice")
        buffer = io.BytesIO()
        torch.save([data], buffer)
        offset, length = self._append(lambda f: f.write(buffer.getbuffer()))
        self._objects[unique_key] = BytesStorageMetadata()
        self._storage[MetadataIndex(unique_key)] = _StorageInfo(DATA_FILE, offset, length)

    def finish(self, common: dict[str, Any], *, fsync: bool = False) -> None:
        """Checks that every key's chunks tile its global tensor, then writes ``.metadata``, ``common.pt``
        and ``metadata.json``. ``fsync`` flushes the data to disk first (megatron's training saves do; a
        conversion, like ``cp`` and the HF writer, leaves write-back to the OS: a crashed process cannot
        corrupt it, only a power loss right after it can)."""
        for key, meta in self._tensors.items():
            _check_tiling(key, meta)
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        metadata = Metadata(
            state_dict_metadata={**self._tensors, **self._objects},
            storage_data=self._storage,
            storage_meta=StorageMeta(checkpoint_id=str(self.directory), save_id=str(uuid.uuid4())),
            version=DCP_VERSION,
        )
        with open(self.directory / METADATA_FILE, "wb") as f:
            pickle.dump(metadata, f)
        torch.save(common, self.directory / COMMON_FILE)
        (self.directory / CONFIG_FILE).write_text(json.dumps(BACKEND_CONFIG))

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def _check_tiling(key: str, meta: TensorStorageMetadata) -> None:
    """Chunks must not overlap and must cover the tensor (sum of volumes + pairwise disjointness)."""
    volume = sum(torch.Size(c.sizes).numel() for c in meta.chunks)
    if volume != meta.size.numel():
        raise ValueError(f"{key}: stored chunks cover {volume} of {meta.size.numel()} elements")
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)
    for (o1, s1), (o2, s2) in zip(boxes, boxes[1:]):
        if all(a < b + t and b < a + s for a, s, b, t in zip(o1, s1, o2, s2)):
            raise ValueError(f"{key}: stored chunks at {o1} and {o2} overlap")


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open file (``torch.load`` needs seeks)."""

    def __init__(self, file, offset: int, length: int):
        super().__init__()
        self._file, self._offset, self._length, self._pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._file.seek(self._offset + self._pos)
        read = self._file.readinto(memoryview(buffer)[:count])
        self._pos += read
        return read


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: torch.Size
    dtype: torch.dtype


class DistReader:
    """Reads regions of the tensors of one ``torch_dist`` checkpoint directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not is_dist_checkpoint(self.directory):
            raise FileNotFoundError(f"{self.directory} is not a megatron torch_dist checkpoint directory "
                                    f"(no {CONFIG_FILE} and {METADATA_FILE})")
        backend = json.loads((self.directory / CONFIG_FILE).read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.directory}: sharded backend {backend!r} is not supported (only torch_dist)")
        try:
            with open(self.directory / METADATA_FILE, "rb") as f:
                self._metadata: Metadata = pickle.load(f)
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"cannot read {self.directory / METADATA_FILE}: {e} (truncated or corrupt?)") from e
        self._files: dict[str, Any] = {}

    def tensors(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(k, m.size, m.properties.dtype) for k, m in self._metadata.state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata)}

    def info(self, key: str) -> TensorInfo:
        meta = self._metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise KeyError(f"tensor {key!r} is not in megatron checkpoint {self.directory}")
        return TensorInfo(key, meta.size, meta.properties.dtype)

    def common(self) -> dict[str, Any]:
        # Our own checkpoints' common state holds plain Python objects, configs and scheduler state.
        return torch.load(self.directory / COMMON_FILE, map_location="cpu", weights_only=False)

    def _load_blob(self, index: MetadataIndex) -> Any:
        where: _StorageInfo = self._metadata.storage_data[index]
        if getattr(where, "transform_descriptors", None):
            raise ValueError(f"{self.directory}: {index.fqn} is stored with transforms {where.transform_descriptors}, "
                             "which this reader does not support")
        file = self._files.get(where.relative_path)
        if file is None:
            path = self.directory / where.relative_path
            if not path.is_file():
                raise FileNotFoundError(f"{path} (named in {self.directory / METADATA_FILE}) does not exist")
            file = self._files[where.relative_path] = open(path, "rb")
        try:
            return torch.load(io.BufferedReader(_FileSlice(file, where.offset, where.length), 1 << 20),
                              map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {index.fqn} from {file.name} at byte {where.offset}: {e} "
                             "(truncated or corrupt?)") from e

    def read(self, key: str, offsets: Optional[Sequence[int]] = None, sizes: Optional[Sequence[int]] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The region of global tensor ``key`` at ``offsets`` of extent ``sizes`` (default: all of it)."""
        meta = self._metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise KeyError(f"tensor {key!r} is not in megatron checkpoint {self.directory}")
        offsets = list(offsets) if offsets is not None else [0] * len(meta.size)
        sizes = list(sizes) if sizes is not None else list(meta.size)
        dtype = dtype or meta.properties.dtype
        out: Optional[torch.Tensor] = None
        covered = 0
        for chunk in meta.chunks:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            stored = self._load_blob(MetadataIndex(key, chunk.offsets))
            if list(chunk.offsets) == offsets and list(chunk.sizes) == sizes:
                return stored.to(dtype)  # the common case: a stored chunk is exactly the region asked for
            if out is None:
                out = torch.empty(sizes, dtype=dtype)
            source, target = stored, out
            for dim, (l, h) in enumerate(zip(lo, hi)):
                source = source.narrow(dim, l - chunk.offsets[dim], h - l)
                target = target.narrow(dim, l - offsets[dim], h - l)
            target.copy_(source)
            covered += source.numel()
            del stored
        if out is None or covered != out.numel():
            raise ValueError(f"{self.directory}: the stored chunks of {key} do not cover region {offsets} + {sizes}")
        return out

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> "DistReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

