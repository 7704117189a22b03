"""The compact tokenised SFT format, memory-mapped by the trainer.

Contract
--------
``write_indexed(prefix, samples, vocab_size=..., pad_id=...)`` writes four files:

* ``prefix.bin``      int32 ``[num_tokens]``: every sample's token ids, concatenated.
* ``prefix.mask``     uint8 ``[num_tokens]``: the loss masks (1 = assistant token), aligned with ``.bin``.
* ``prefix.idx.npy``  int64 ``[num_samples + 1]``: sample ``i`` is ``[offsets[i], offsets[i + 1])``.
* ``prefix.idx.json`` the header: format name, version, tokenizer vocab size and pad id, counts.

and, when some sample holds images (multimodal SFT), two more:

* ``prefix.pixels``     float32 ``[num_patches, patch_dim]``: every image's processed patches (the image
  processor's ``pixel_values``), concatenated in sample order.
* ``prefix.vision.npz`` ``image_offsets`` int64 ``[num_samples + 1]`` (sample ``i`` owns images
  ``[image_offsets[i], image_offsets[i + 1])``), ``image_grid_thw`` int64 ``[num_images, 3]`` (image ``j``
  owns ``t*h*w`` patch rows, in order) and ``image_end`` int64 ``[num_samples]`` (tokens up to and including
  the sample's last image token, 0 without images: a row must hold that many for its images to be whole).

Patches are stored processed rather than as encoded images so that training reads exactly what the
rollout engine's processor produced, with no decoding or resizing in the loader; the price is disk (a
448x448 image is 1024 patches of 1176 floats, 4.8 MB).

The data files are written under temporary names and moved into place before the header, so a
crashed write never leaves a header that describes missing data. :class:`IndexedDataset` memory-maps
``.bin``, ``.mask`` and ``.pixels`` (nothing is read until a sample is indexed) and checks every file's size
against the header and offsets, failing with a message that names the file. Version 1 (text only) datasets
still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np

from megatron_ovr.config import Qwen25VLConfig

__all__ = ["FORMAT", "VERSION", "IndexedDataset", "SFTSample", "write_indexed"]

FORMAT = "megatron_ovr.sft_indexed"
VERSION = 2
_READABLE_VERSIONS = (1, 2)
_SUFFIXES = {"tokens": ".bin", "mask": ".mask", "offsets": ".idx.npy", "header": ".idx.json",
             "pixels": ".pixels", "vision": ".vision.npz"}
_TEXT_KINDS = ("tokens", "mask", "offsets", "header")


class SFTSample(NamedTuple):
    """One training conversation as stored: tokens, loss mask and, for multimodal samples, its images."""

    token_ids: np.ndarray
    """int ``[n]``."""
    loss_mask: np.ndarray
    """bool ``[n]``: True on assistant tokens."""
    pixel_values: Optional[np.ndarray] = None
    """float32 ``[patches, patch_dim]``: the image processor's output for the sample's images, or None."""
    image_grid_thw: Optional[np.ndarray] = None
    """int64 ``[images, 3]``, or None."""


def _paths(prefix: str | Path) -> dict[str, Path]:
    return {kind: Path(f"{prefix}{suffix}") for kind, suffix in _SUFFIXES.items()}


def _checked(i: int, sample: SFTSample, vocab_size: int) -> SFTSample:
    tokens, mask = sample.token_ids, sample.loss_mask
    if tokens.ndim != 1 or tokens.size == 0 or mask.shape != tokens.shape:
        raise ValueError(f"sample {i}: needs 1-D non-empty token ids and a loss mask of the same shape, "
                         f"got {tokens.shape} and {mask.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"sample {i}: token ids must lie in [0, vocab_size={vocab_size}), "
                         f"got [{tokens.min()}, {tokens.max()}]")
    pixels, grids = sample.pixel_values, sample.image_grid_thw
    if (pixels is None) != (grids is None):
        raise ValueError(f"sample {i}: pixel_values and image_grid_thw come together")
    if grids is not None and (grids.ndim != 2 or grids.shape[1] != 3 or pixels.ndim != 2
                              or pixels.shape[0] != int(np.prod(grids, axis=1).sum())):
        raise ValueError(f"sample {i}: pixel_values {pixels.shape} do not hold the t*h*w patches of the "
                         f"image grids {grids.tolist()}")
    return sample


_IMAGE_TOKEN_ID = Qwen25VLConfig().image_token_id


def _image_end(sample: SFTSample) -> int:
    """Tokens up to and including the sample's last image placeholder (0 without images)."""
    where = np.flatnonzero(sample.token_ids == _IMAGE_TOKEN_ID) if sample.image_grid_thw is not None else []
    return int(where[-1]) + 1 if len(where) else 0


def write_indexed(prefix: str | Path, samples: Iterable[SFTSample], *, vocab_size: int, pad_id: int) -> dict:
    """Streams ``samples`` (``SFTSample``, or anything with ``token_ids`` and ``loss_mask`` such as a text-only
    ``TokenizedSample``) to the indexed files at ``prefix`` (see module docstring); returns the header."""
    if not 0 <= pad_id < vocab_size <= np.iinfo(np.int32).max:
        raise ValueError(f"pad_id={pad_id}, vocab_size={vocab_size}: need 0 <= pad_id < vocab_size < 2**31")
    paths = _paths(prefix)
    paths["header"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {kind: path.with_name(path.name + ".tmp") for kind, path in paths.items()}
    offsets, num_loss_tokens = [0], 0
    image_offsets, grids, image_end, patch_dim = [0], [], [], None
    try:
        with tmp["tokens"].open("wb") as tokens_file, tmp["mask"].open("wb") as mask_file, \
                tmp["pixels"].open("wb") as pixels_file:
            for i, sample in enumerate(samples):
                sample = _checked(i, SFTSample(sample.token_ids, sample.loss_mask,
                                               getattr(sample, "pixel_values", None),
                                               getattr(sample, "image_grid_thw", None)), vocab_size)
                tokens_file.write(sample.token_ids.astype(np.int32, copy=False).tobytes())
                mask_file.write(sample.loss_mask.astype(np.uint8, copy=False).tobytes())
                offsets.append(offsets[-1] + sample.token_ids.size)
                num_loss_tokens += int(np.count_nonzero(sample.loss_mask))
                image_end.append(_image_end(sample))
                if sample.image_grid_thw is None:
                    image_offsets.append(image_offsets[-1])
                    continue
                if patch_dim not in (None, sample.pixel_values.shape[1]):
                    raise ValueError(f"sample {i}: patch size {sample.pixel_values.shape[1]} differs from the "
                                     f"earlier samples' {patch_dim} (another image processor?)")
                patch_dim = sample.pixel_values.shape[1]
                pixels_file.write(np.ascontiguousarray(sample.pixel_values, dtype=np.float32).tobytes())
                grids.append(np.asarray(sample.image_grid_thw, dtype=np.int64))
                image_offsets.append(image_offsets[-1] + len(sample.image_grid_thw))
        with tmp["offsets"].open("wb") as f:
            np.save(f, np.asarray(offsets, dtype=np.int64))
        grid_array = np.concatenate(grids) if grids else np.zeros((0, 3), dtype=np.int64)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "vocab_size": int(vocab_size),
            "pad_id": int(pad_id),
            "num_samples": len(offsets) - 1,
            "num_tokens": offsets[-1],
            "num_loss_tokens": num_loss_tokens,
            "num_images": len(grid_array),
            "num_patches": int(np.prod(grid_array, axis=1).sum()),
            "patch_dim": patch_dim or 0,
        }
        kinds = list(_TEXT_KINDS)
        if grids:
            with tmp["vision"].open("wb") as f:
                np.savez(f, image_offsets=np.asarray(image_offsets, dtype=np.int64), image_grid_thw=grid_array,
                         image_end=np.asarray(image_end, dtype=np.int64))
            kinds[-1:-1] = ["pixels", "vision"]
        tmp["header"].write_text(json.dumps(header, indent=2) + "\n")
        for kind in kinds:
            os.replace(tmp[kind], paths[kind])
        if not grids:  # a text-only rewrite must not leave an earlier write's images behind
            paths["pixels"].unlink(missing_ok=True)
            paths["vision"].unlink(missing_ok=True)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return header


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    # np.memmap cannot map an empty file.
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


class IndexedDataset:
    """Read-only view of the files at ``prefix``: ``dataset[i] -> SFTSample``.

    ``token_ids`` is an int32 ``[n_i]`` view and ``loss_mask`` a bool ``[n_i]`` view of the memory maps;
    a multimodal sample's ``pixel_values`` is a float32 view of ``.pixels`` and ``image_grid_thw`` its
    ``[images, 3]`` grids. ``image_end[i]`` is the row length the sample's images need (0 without images).
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        paths = _paths(prefix)
        for kind in _TEXT_KINDS:
            if not paths[kind].is_file():
                raise FileNotFoundError(
                    f"{paths[kind]} is missing: {self.prefix} is not a complete indexed dataset "
                    f"(write one with tools/preprocess_sft.py)"
                )
        header = json.loads(paths["header"].read_text())
        if header.get("format") != FORMAT or header.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"{paths['header']}: expected format {FORMAT!r} version {VERSION} (or an earlier "
                             f"one of {list(_READABLE_VERSIONS)}), got {header.get('format')!r} version "
                             f"{header.get('version')}")
        self.header = header
        num_samples, num_tokens = header["num_samples"], header["num_tokens"]
        offsets = np.load(paths["offsets"])
        if offsets.shape != (num_samples + 1,) or offsets[0] != 0 or offsets[-1] != num_tokens \
                or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"{paths['offsets']}: offsets do not describe {num_samples} non-empty samples of "
                             f"{num_tokens} tokens (truncated or from another write?)")
        for kind, itemsize in (("tokens", 4), ("mask", 1)):
            _check_size(paths[kind], num_tokens * itemsize, f"{num_tokens} tokens")
        self.offsets = offsets
        self.lengths = np.diff(offsets)
        self._tokens = _memmap(paths["tokens"], np.dtype(np.int32), num_tokens)
        self._mask = _memmap(paths["mask"], np.dtype(np.uint8), num_tokens)
        self.image_end = np.zeros(num_samples, dtype=np.int64)
        self._images = None
        if header.get("num_images", 0):
            self._images = self._load_images(paths, header)

    def _load_images(self, paths: dict[str, Path], header: dict) -> tuple[np.ndarray, ...]:
        for kind in ("pixels", "vision"):
            if not paths[kind].is_file():
                raise FileNotFoundError(f"{paths[kind]} is missing: the header of {self.prefix} lists "
                                        f"{header['num_images']} images")
        with np.load(paths["vision"]) as vision:
            image_offsets, grids, image_end = (vision[k] for k in ("image_offsets", "image_grid_thw", "image_end"))
        patches_per_image = np.prod(grids, axis=1) if grids.size else np.zeros(0, dtype=np.int64)
        if image_offsets.shape != (len(self) + 1,) or image_offsets[-1] != header["num_images"] \
                or grids.shape != (header["num_images"], 3) or image_end.shape != (len(self),) \
                or patches_per_image.sum() != header["num_patches"]:
            raise ValueError(f"{paths['vision']}: does not describe {header['num_images']} images of "
                             f"{header['num_patches']} patches over {len(self)} samples (from another write?)")
        num_patches, patch_dim = header["num_patches"], header["patch_dim"]
        _check_size(paths["pixels"], num_patches * patch_dim * 4, f"{num_patches} patches of {patch_dim} floats")
        self.image_end = image_end
        pixels = _memmap(paths["pixels"], np.dtype(np.float32), num_patches * patch_dim).reshape(-1, patch_dim)
        patch_offsets = np.concatenate([[0], np.cumsum(patches_per_image)])
        return image_offsets, grids, patch_offsets, pixels

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def pad_id(self) -> int:
        return self.header["pad_id"]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> SFTSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.prefix}")
        i = i % len(self)
        start, end = self.offsets[i], self.offsets[i + 1]
        tokens, mask = self._tokens[start:end], self._mask[start:end].view(np.bool_)
        if self._images is None:
            return SFTSample(tokens, mask)
        image_offsets, grids, patch_offsets, pixels = self._images
        first, last = image_offsets[i], image_offsets[i + 1]
        if first == last:
            return SFTSample(tokens, mask)
        return SFTSample(tokens, mask, pixels[patch_offsets[first] : patch_offsets[last]], grids[first:last])


def _check_size(path: Path, expected: int, what: str) -> None:
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path} has {size} bytes but the index needs {expected} ({what}): the file is "
                         f"truncated or from another write")
