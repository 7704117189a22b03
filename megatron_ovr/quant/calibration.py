r"""Calibration data for quantisation: our own dataset files -> model inputs for HF Qwen2.5-VL.

Contract
--------
:func:`load_calibration_samples` reads any mix of

- evaluation-layout prompt files (``.jsonl`` / ``.json`` / ``.parquet`` that
  :func:`megatron_ovr.eval.benchmarks.load_benchmark` reads: question, optional choices and images), turned
  into the exact prompt the engine sees at evaluation and PPO time (:func:`~megatron_ovr.data.prompts.build_prompt`);
- SFT conversation files (``.jsonl`` / ``.parquet`` with a ``messages`` column, as
  :mod:`megatron_ovr.data.sources` reads them), rendered whole with the chat template, assistant reply
  included, so long reasoning text is part of the calibration. Image paths are relative to the file's folder;
  malformed lines are skipped and counted as in SFT preprocessing.

A file is a conversation file when its first record has ``messages``. When more samples are found than
asked for, an evenly spread, seeded subset is kept (text and image samples stay mixed as in the files).
No sample at all is an error naming the files.

:func:`build_inputs` tokenises one sample the way vLLM's processor does: every
``<|vision_start|><|image_pad|><|vision_end|>`` gets as many image pads as the image's merged patches
(transformers' Qwen2-VL image processor with the model directory's ``preprocessor_config.json``), and the
3D M-RoPE positions are passed explicitly (HF falls back to 1D positions for image prompts otherwise).
Samples longer than ``max_tokens`` are cut; a cut that would split an image drops the sample (counted).
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from megatron_ovr.data.chat import IMAGE_PAD, VISION_END, VISION_START, count_images, render_conversation
from megatron_ovr.data.prompts import build_prompt

__all__ = ["CalibrationSample", "ModelInputs", "InputBuilder", "load_calibration_samples", "synthetic_calibration_files"]

logger = logging.getLogger(__name__)

IMAGE_SLOT = VISION_START + IMAGE_PAD + VISION_END


@dataclass(frozen=True)
class CalibrationSample:
    """Chat-formatted text with one ``<|image_pad|>`` per image, and its images (paths or encoded bytes)."""

    text: str
    images: tuple[Any, ...]
    source: str

    def load_images(self) -> list:
        from PIL import Image

        out = []
        for image in self.images:
            try:
                opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
                out.append(opened.convert("RGB"))
            except OSError as err:
                raise ValueError(f"{self.source}: image {image if not isinstance(image, bytes) else '<bytes>'} "
                                 f"cannot be decoded: {err}") from err
        return out


def _first_record(path: Path) -> Optional[dict]:
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError:
                        return None
                    return obj if isinstance(obj, dict) else None
        return None
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
        return {name: None for name in pq.ParquetFile(path).schema_arrow.names}
    return None


def _conversation_samples(path: Path) -> list[CalibrationSample]:
    from megatron_ovr.data.sources import ConversationReader

    reader = ConversationReader([path])
    samples = []
    for conv in reader:
        images = tuple(path.parent / p if not Path(p).is_absolute() else Path(p) for p in conv.images)
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            logger.warning("%s:%d: skipping a calibration sample whose image(s) do not exist: %s", conv.source,
                           conv.line, ", ".join(missing))
            continue
        text = render_conversation(conv.messages, image_token_counts=[1] * count_images(conv.messages))
        samples.append(CalibrationSample(text=text, images=images, source=f"{conv.source}:{conv.line}"))
    if reader.malformed:
        logger.warning("%s: %d malformed conversation(s) skipped", path, len(reader.malformed))
    return samples


def _prompt_samples(path: Path) -> list[CalibrationSample]:
    from megatron_ovr.eval.benchmarks import load_benchmark

    return [CalibrationSample(text=build_prompt(item.question, len(item.images), item.choices),
                              images=tuple(item.images), source=item.source)
            for item in load_benchmark(path)]


def load_calibration_samples(paths: Sequence[str | Path], num_samples: int, *, seed: int = 0) -> list[CalibrationSample]:
    """At most ``num_samples`` samples from ``paths`` (see the module docstring)."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if not paths:
        raise ValueError("no calibration files given: pass --calib FILE (evaluation-layout prompts or SFT "
                         "conversations, e.g. tools/make_synthetic_data.py's rl_train/prompts.jsonl)")
    samples: list[CalibrationSample] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        first = _first_record(path)
        kind = "conversations" if first is not None and "messages" in first else "prompts"
        if first is None and path.suffix == ".jsonl":
            found = []  # no record at all (the benchmark reader would call that a malformed file)
        else:
            found = _conversation_samples(path) if kind == "conversations" else _prompt_samples(path)
        logger.info("calibration: %d %s from %s", len(found), kind, path)
        samples.extend(found)
    if not samples:
        raise ValueError(f"empty calibration set: no usable sample in {', '.join(map(str, paths))} "
                         "(quantisation needs activations to calibrate on)")
    if len(samples) > num_samples:
        keep = sorted(random.Random(seed).sample(range(len(samples)), num_samples))
        samples = [samples[i] for i in keep]
    return samples


def synthetic_calibration_files(out_dir: str | Path, num_samples: int, seed: int = 0) -> list[Path]:
    """The built-in synthetic prompts (3/4 with an image, 1/4 text; the PPO train split), for when no
    ``--calib`` file is given. Fine for the tiny model and smoke tests; a real model wants its own data."""
    from megatron_ovr.data.synthetic_visual import write_rl_prompts

    n_visual = max(1, (3 * num_samples) // 4)
    return [write_rl_prompts(out_dir, n_visual, max(1, num_samples - n_visual), seed, split="train")]


@dataclass
class ModelInputs:
    """Keyword arguments of the HF model's forward for one sample (batch of 1)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def has_images(self) -> bool:
        return self.image_grid_thw is not None

    def to(self, device, dtype: torch.dtype) -> dict:
        out = {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device), "use_cache": False}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values.to(device, dtype)
            out["image_grid_thw"] = self.image_grid_thw.to(device)
        return out


class InputBuilder:
    """Samples -> :class:`ModelInputs` for the model in ``model_dir`` (tokenizer, image processor, config)."""

    def __init__(self, model_dir: str | Path, max_tokens: int):
        from megatron_ovr.checkpoint import HFCheckpoint
        from megatron_ovr.data.tokenizer import load_tokenizer

        if max_tokens < 8:
            raise ValueError(f"max_tokens={max_tokens}: must be >= 8")
        self.model_dir = Path(model_dir)
        self.cfg = HFCheckpoint(model_dir).config
        self.tokenizer = load_tokenizer(model_dir)
        self.max_tokens = max_tokens
        self._images = None
        self.dropped = 0

    def _image_processor(self):
        if self._images is None:
            from megatron_ovr.rollout.model_dir import ImageProcessor

            if not (self.model_dir / "preprocessor_config.json").is_file():
                raise FileNotFoundError(f"{self.model_dir} has no preprocessor_config.json: image calibration "
                                        "samples need the image processor's config next to the weights")
            self._images = ImageProcessor(self.model_dir)
        return self._images

    def __call__(self, sample: CalibrationSample) -> Optional[ModelInputs]:
        """The inputs, or None when the sample must be dropped (too long to keep its images)."""
        from megatron_ovr.models.qwen2_5_vl.positions import get_rope_index

        text, pixel_values, grid = sample.text, None, None
        if sample.images:
            pixel_values, grid = self._image_processor()(sample.load_images())
            counts = (grid.prod(-1) // self.cfg.vision.merge_unit).tolist()
            pieces = text.split(IMAGE_SLOT)
            if len(pieces) != len(counts) + 1:
                raise ValueError(f"{sample.source}: {len(pieces) - 1} image slot(s) in the text for {len(counts)} image(s)")
            text = pieces[0] + "".join(VISION_START + IMAGE_PAD * n + VISION_END + rest
                                       for n, rest in zip(counts, pieces[1:]))
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        if ids.numel() > self.max_tokens:
            ids = ids[: self.max_tokens]
            if grid is not None and int((ids == self.cfg.image_token_id).sum()) != int(
                    (grid.prod(-1) // self.cfg.vision.merge_unit).sum()):
                self.dropped += 1
                return None
        ids = ids[None]
        positions, _ = get_rope_index(ids, grid, image_token_id=self.cfg.image_token_id,
                                      spatial_merge_size=self.cfg.vision.spatial_merge_size)
        return ModelInputs(input_ids=ids, position_ids=positions, pixel_values=pixel_values, image_grid_thw=grid)

    def build_all(self, samples: Iterable[CalibrationSample]) -> list[ModelInputs]:
        built = [self(s) for s in samples]
        kept = [b for b in built if b is not None]
        if self.dropped:
            logger.warning("calibration: %d sample(s) dropped: longer than %d tokens and cutting them would split "
                           "an image", self.dropped, self.max_tokens)
        if not kept:
            raise ValueError(f"empty calibration set: every sample was longer than max_tokens={self.max_tokens} "
                             "inside an image; raise --max-tokens")
        return kept
