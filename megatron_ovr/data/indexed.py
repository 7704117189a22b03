"""The compact tokenised SFT format, memory-mapped by the trainer.

Contract
--------
``write_indexed(prefix, samples, vocab_size=..., pad_id=...)`` writes four files:

* ``prefix.bin``      int32 ``[num_tokens]``: every sample's token ids, concatenated.
* ``prefix.mask``     uint8 ``[num_tokens]``: the loss masks (1 = assistant token), aligned with ``.bin``.
* ``prefix.idx.npy``  int64 ``[num_samples + 1]``: sample ``i`` is ``[offsets[i], offsets[i + 1])``.
* ``prefix.idx.json`` the header: format name, version, tokenizer vocab size and pad id, counts.

The data files are written under temporary names and moved into place before the header, so a
crashed write never leaves a header that describes missing data. :class:`IndexedDataset` memory-maps
``.bin`` and ``.mask`` (nothing is read until a sample is indexed) and checks every file's size against
the header and offsets, failing with a message that names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .chat import TokenizedSample

__all__ = ["FORMAT", "VERSION", "IndexedDataset", "write_indexed"]

FORMAT = "megatron_ovr.sft_indexed"
VERSION = 1
_SUFFIXES = {"tokens": ".bin", "mask": ".mask", "offsets": ".idx.npy", "header": ".idx.json"}


def _paths(prefix: str | Path) -> dict[str, Path]:
    return {kind: Path(f"{prefix}{suffix}") for kind, suffix in _SUFFIXES.items()}


def _checked(i: int, sample: TokenizedSample, vocab_size: int) -> TokenizedSample:
    tokens, mask = sample.token_ids, sample.loss_mask
    if tokens.ndim != 1 or tokens.size == 0 or mask.shape != tokens.shape:
        raise ValueError(f"sample {i}: needs 1-D non-empty token ids and a loss mask of the same shape, "
                         f"got {tokens.shape} and {mask.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"sample {i}: token ids must lie in [0, vocab_size={vocab_size}), "
                         f"got [{tokens.min()}, {tokens.max()}]")
    return sample


def write_indexed(
    prefix: str | Path, samples: Iterable[TokenizedSample], *, vocab_size: int, pad_id: int
) -> dict:
    """Streams ``samples`` to the indexed files at ``prefix`` (see module docstring); returns the header."""
    if not 0 <= pad_id < vocab_size <= np.iinfo(np.int32).max:
        raise ValueError(f"pad_id={pad_id}, vocab_size={vocab_size}: need 0 <= pad_id < vocab_size < 2**31")
    paths = _paths(prefix)
    paths["header"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {kind: path.with_name(path.name + ".tmp") for kind, path in paths.items()}
    offsets, num_loss_tokens = [0], 0
    try:
        with tmp["tokens"].open("wb") as tokens_file, tmp["mask"].open("wb") as mask_file:
            for i, sample in enumerate(samples):
                sample = _checked(i, sample, vocab_size)
                tokens_file.write(sample.token_ids.astype(np.int32, copy=False).tobytes())
                mask_file.write(sample.loss_mask.astype(np.uint8, copy=False).tobytes())
                offsets.append(offsets[-1] + sample.token_ids.size)
                num_loss_tokens += int(np.count_nonzero(sample.loss_mask))
        with tmp["offsets"].open("wb") as f:
            np.save(f, np.asarray(offsets, dtype=np.int64))
        header = {
            "format": FORMAT,
            "version": VERSION,
            "vocab_size": int(vocab_size),
            "pad_id": int(pad_id),
            "num_samples": len(offsets) - 1,
            "num_tokens": offsets[-1],
            "num_loss_tokens": num_loss_tokens,
        }
        tmp["header"].write_text(json.dumps(header, indent=2) + "\n")
        for kind in ("tokens", "mask", "offsets", "header"):
            os.replace(tmp[kind], paths[kind])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return header


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    # np.memmap cannot map an empty file.
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


class IndexedDataset:
    """Read-only view of the files at ``prefix``: ``dataset[i] -> (token_ids, loss_mask)``.

    ``token_ids`` is an int32 ``[n_i]`` view and ``loss_mask`` a bool ``[n_i]`` view of the memory maps.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        paths = _paths(prefix)
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: {self.prefix} is not a complete indexed dataset "
                    f"(write one with tools/preprocess_sft.py)"
                )
        header = json.loads(paths["header"].read_text())
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{paths['header']}: expected format {FORMAT!r} version {VERSION}, "
                             f"got {header.get('format')!r} version {header.get('version')}")
        self.header = header
        num_samples, num_tokens = header["num_samples"], header["num_tokens"]
        offsets = np.load(paths["offsets"])
        if offsets.shape != (num_samples + 1,) or offsets[0] != 0 or offsets[-1] != num_tokens \
                or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"{paths['offsets']}: offsets do not describe {num_samples} non-empty samples of "
                             f"{num_tokens} tokens (truncated or from another write?)")
        for kind, itemsize in (("tokens", 4), ("mask", 1)):
            size = paths[kind].stat().st_size
            if size != num_tokens * itemsize:
                raise ValueError(f"{paths[kind]} has {size} bytes but the index needs {num_tokens * itemsize} "
                                 f"({num_tokens} tokens): the file is truncated or from another write")
        self.offsets = offsets
        self.lengths = np.diff(offsets)
        self._tokens = _memmap(paths["tokens"], np.dtype(np.int32), num_tokens)
        self._mask = _memmap(paths["mask"], np.dtype(np.uint8), num_tokens)

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def pad_id(self) -> int:
        return self.header["pad_id"]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.prefix}")
        i = i % len(self)
        start, end = self.offsets[i], self.offsets[i + 1]
        return self._tokens[start:end], self._mask[start:end].view(np.bool_)
