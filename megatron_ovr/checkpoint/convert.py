"""Model-free, single-process checkpoint conversions: HF -> megatron, megatron -> HF, and the uniform
average of several checkpoints. They stream one tensor (one transformer layer's weight) at a time through
the one mapping table and never import megatron-core, build a model or start a process group; the output
directory appears only when complete. See ``megatron_dist`` for the layout and the tools for the CLIs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_ovr.mapping.qwen2_5_vl import check_hf_names

from .hf import HFCheckpoint, write_hf_checkpoint
from .megatron_dist import (
    MegatronCheckpoint,
    ModelTensor,
    Source,
    hf_plan,
    hf_tensors,
    list_iterations,
    model_tensors,
    write_megatron_checkpoint,
)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr counting parameters (a no-op object when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=not enabled, file=sys.stderr,
                mininterval=1.0)


def _numel(tensors: Sequence[ModelTensor]) -> int:
    return sum(torch.Size(t.global_shape).numel() for t in tensors)


class HFSource:
    """An HF directory as a source of megatron tensors: the same interface as ``MegatronCheckpoint``
    (``config``, ``head``, ``backend``, ``tensors``, ``extra``, ``get``, ``dtype_of``, ``close``)."""

    def __init__(self, path: str | os.PathLike, backend: str = "torch"):
        self.hf = HFCheckpoint(path)
        self.backend = backend
        check_hf_names(self.hf.config, self.hf.names(), backend, self.hf.head)
        self.config, self.head = self.hf.config, self.hf.head
        self.tensors = model_tensors(self.config, backend, self.head)
        self.extra = {"source_hf_dir": str(Path(path).resolve())}

    def get(self, tensor: ModelTensor, layer: Optional[int]) -> torch.Tensor:
        return tensor.entry.hf_to_megatron([self.hf.get(n) for n in tensor.hf_names(layer)])

    def dtype_of(self, tensor: ModelTensor) -> torch.dtype:
        return self.hf.dtype(tensor.hf_names(tensor.layers[0])[0])

    def close(self) -> None:
        pass

    def __enter__(self) -> "HFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hf_to_megatron(hf_dir: str | os.PathLike, out: str | os.PathLike, *, backend: str = "torch",
                   dtype: Optional[torch.dtype] = None, tp: int = 1, extra: Optional[dict] = None,
                   fsync: bool = False, progress: bool = True) -> Path:
    """Converts an HF directory (policy, or critic with ``value_head.safetensors``) into a megatron checkpoint
    root; ``dtype`` None keeps each tensor's stored dtype; ``tp`` picks the stored TP fragments (any layout
    loads)."""
    source = HFSource(hf_dir, backend)
    cfg = source.config
    record = {"step": 0, "model_config": cfg.to_hf_config(), "head": source.head, **source.extra, **(extra or {})}
    with progress_bar(_numel(source.tensors), "HF -> megatron", progress) as bar:
        return write_megatron_checkpoint(out, cfg, source.tensors, source.get, extra=record, dtype=dtype, tp=tp,
                                         fsync=fsync, progress=bar)


def megatron_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                   max_shard_bytes: int = 5 * 2**30, tokenizer_dir: Optional[str | os.PathLike] = None,
                   progress: bool = True) -> Path:
    """Converts a megatron checkpoint (root or iteration directory; converted or training) into an HF
    directory; ``dtype`` None keeps the stored dtype. Tokenizer files come from ``tokenizer_dir`` or the HF
    directory the checkpoint was converted from (when it still exists)."""
    with MegatronCheckpoint(ckpt) as source:
        return _write_hf(out, source.config, source.tensors, source.get, source.dtype_of, dtype=dtype,
                         max_shard_bytes=max_shard_bytes, auxiliary=tokenizer_dir or source.extra.get("source_hf_dir"),
                         progress=progress, desc="megatron -> HF")


def _write_hf(out, cfg, tensors, source: Source, dtype_of, *, dtype, max_shard_bytes, auxiliary, progress,
              desc) -> Path:
    written_dtype = (lambda t: dtype) if dtype is not None else dtype_of
    plan = hf_plan(tensors, written_dtype)
    if auxiliary is not None and not Path(auxiliary).is_dir():
        auxiliary = None
    with progress_bar(_numel(tensors), desc, progress) as bar:
        return write_hf_checkpoint(out, cfg, hf_tensors(tensors, source, progress=bar), plan=plan, dtype=dtype,
                                   max_shard_bytes=max_shard_bytes, auxiliary_from=auxiliary)


def open_checkpoint(path: str | os.PathLike):
    """A megatron checkpoint (root or iteration directory) or an HF directory (``config.json``)."""
    return HFSource(path) if (Path(path) / "config.json").is_file() else MegatronCheckpoint(path)


def select_checkpoints(paths: Sequence[str] = (), root: Optional[str] = None, last: Optional[int] = None) -> list[Path]:
    """``paths`` as given, or the ``last`` newest complete iterations under ``root``."""
    if root is not None:
        found = list_iterations(root)
        if last is None or last < 1:
            raise ValueError("--ckpt-root needs --last N (N >= 1)")
        if len(found) < last:
            raise ValueError(f"{root} holds {len(found)} complete iteration(s), fewer than --last {last}")
        return found[-last:]
    if not paths:
        raise ValueError("give checkpoints to average (--ckpt DIR ...) or --ckpt-root ROOT --last N")
    return [Path(p) for p in paths]


def average(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, hf_out: bool = False,
            dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30,
            tokenizer_dir: Optional[str | os.PathLike] = None, progress: bool = True) -> Path:
    """Writes the uniform average of the model weights of ``paths`` (megatron checkpoints or HF directories of
    one config and kind), accumulated in float32 one tensor at a time, as a megatron checkpoint root (or an
    HF directory with ``hf_out``). The output dtype is each tensor's dtype in the first input (or ``dtype``)."""
    if len(paths) < 1:
        raise ValueError("nothing to average")
    inputs = []
    try:
        for path in paths:
            inputs.append(open_checkpoint(path))
        first = inputs[0]
        for path, other in zip(paths[1:], inputs[1:]):
            if other.config != first.config:
                raise ValueError(f"{path} has another model config than {paths[0]}: only checkpoints of one model "
                                 "can be averaged")
            if (other.head, other.backend) != (first.head, first.backend):
                raise ValueError(f"{path} is a {other.head}/{other.backend} checkpoint, {paths[0]} a "
                                 f"{first.head}/{first.backend} one: they cannot be averaged")
        tensors = first.tensors
        out_dtype = (lambda t: dtype) if dtype is not None else first.dtype_of

        def mean(tensor: ModelTensor, layer: Optional[int]) -> torch.Tensor:
            total = inputs[0].get(tensor, layer).to(torch.float32)
            for other in inputs[1:]:
                total += other.get(tensor, layer).to(torch.float32)
            return total.div_(len(inputs)).to(out_dtype(tensor))

        sources = [str(Path(p).resolve()) for p in paths]
        if hf_out:
            auxiliary = tokenizer_dir or first.extra.get("source_hf_dir")
            return _write_hf(out, first.config, tensors, mean, out_dtype, dtype=None, max_shard_bytes=max_shard_bytes,
                             auxiliary=auxiliary, progress=progress, desc=f"average of {len(inputs)} -> HF")
        extra = {"step": 0, "model_config": first.config.to_hf_config(), "head": first.head, "averaged_from": sources}
        source_hf = first.extra.get("source_hf_dir")
        if source_hf:
            extra["source_hf_dir"] = source_hf
        with progress_bar(_numel(tensors), f"average of {len(inputs)} -> megatron", progress) as bar:
            return write_megatron_checkpoint(out, first.config, tensors, mean, extra=extra, progress=bar)
    finally:
        for ckpt in inputs:
            ckpt.close()


def is_secondary_rank() -> bool:
    """True on ranks other than 0 when a tool is launched under torchrun: these tools are single-process,
    so rank 0 does the work and the others have nothing to do (older instructions used torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
