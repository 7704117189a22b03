"""Weight sync: the actor's weights, streamed out of megatron's TP/PP layout under HF names, into the engine.

``export_hf_weights`` (the one mapping table: TP gather, PP broadcast) yields full tensors; ``pack_buckets``
packs them into size-bounded flat byte buffers, each with a checksum and the layout of its tensors; the
receiving side (``WeightReceiver``) recomputes every bucket's checksum before it unpacks it, and at the end
checks the manifest: every expected HF tensor arrived exactly once. A bucket is what crosses a process
boundary in a disaggregated set-up (CUDA IPC, shared memory); colocated, it is handed over in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.mapping.qwen2_5_vl import expected_hf_names, qwen2_5_vl_mappings
from megatron_ovr.mapping.stream import export_hf_weights

from .engine import RolloutEngine

_ALIGN_BYTES = 16
_CHECKSUM_BLOCK_BYTES = 8 * 1024
_CHECKSUM_MODULUS = 65521  # block weights cycle with a prime period


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    """Byte offset in the bucket's buffer."""
    nbytes: int


@dataclass
class WeightBucket:
    index: int
    buffer: torch.Tensor
    """The tensors' bytes back to back (uint8, on the device they were exported on)."""
    slots: list[TensorSlot]
    checksum: int


def bucket_checksum(buffer: torch.Tensor) -> int:
    """A position-weighted sum of the buffer's 64-bit words, in integer arithmetic (exact, wrapping, independent
    of summation order), computed where the buffer lives: no copy to the host on GPU. Words are weighted by
    their place in a block and blocks by their index, so a swap of two words changes the sum, and the only
    index tensor is one block long."""
    padded = buffer
    if buffer.numel() % _CHECKSUM_BLOCK_BYTES:
        padded = torch.cat([buffer, buffer.new_zeros(_CHECKSUM_BLOCK_BYTES - buffer.numel() % _CHECKSUM_BLOCK_BYTES)])
    blocks = padded.view(torch.int64).reshape(-1, _CHECKSUM_BLOCK_BYTES // 8)
    in_block = torch.arange(1, blocks.shape[1] + 1, dtype=torch.int64, device=buffer.device)
    block_sums = (blocks * in_block).sum(dim=1) + blocks.sum(dim=1)
    block_weights = torch.arange(blocks.shape[0], dtype=torch.int64, device=buffer.device) % _CHECKSUM_MODULUS + 1
    return int((block_sums * block_weights).sum())


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Groups the stream into buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = index = 0

    def flush() -> WeightBucket:
        slots, parts, offset = [], [], 0
        for name, tensor in pending:
            slots.append(TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset, tensor.nbytes))
            # Every tensor starts on an aligned offset, so the receiver can view it in its own dtype.
            padding = -tensor.nbytes % _ALIGN_BYTES
            parts += [_as_bytes(tensor), torch.zeros(padding, dtype=torch.uint8, device=tensor.device)]
            offset += tensor.nbytes + padding
        buffer = torch.cat(parts)
        return WeightBucket(index, buffer, slots, bucket_checksum(buffer))

    for name, tensor in named_tensors:
        if pending and size + tensor.nbytes > bucket_bytes:
            yield flush()
            pending, size, index = [], 0, index + 1
        pending.append((name, tensor))
        size += tensor.nbytes
    if pending:
        yield flush()


class CorruptBucketError(RuntimeError):
    pass


class WeightReceiver:
    """The engine side of one sync: verifies each bucket, unpacks it into named tensors (views of the
    bucket's buffer), and checks at ``finish`` that every expected tensor arrived exactly once."""

    def __init__(self, expected_names: Sequence[str]):
        self.expected = set(expected_names)
        self.received: set[str] = set()

    def receive(self, bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
        checksum = bucket_checksum(bucket.buffer)
        if checksum != bucket.checksum:
            names = [s.name for s in bucket.slots]
            raise CorruptBucketError(
                f"weight bucket {bucket.index} ({bucket.buffer.numel()} bytes, tensors {names[:3]}"
                f"{' ...' if len(names) > 3 else ''}) arrived with checksum {checksum}, sent as {bucket.checksum}"
            )
        tensors = []
        for slot in bucket.slots:
            if slot.name in self.received:
                raise KeyError(f"weight sync sent {slot.name!r} twice")
            if slot.name not in self.expected:
                raise KeyError(f"weight sync sent {slot.name!r}, which the engine's model does not have")
            self.received.add(slot.name)
            raw = bucket.buffer[slot.offset:slot.offset + slot.nbytes]
            tensors.append((slot.name, raw.view(slot.dtype).reshape(slot.shape)))
        return tensors

    def finish(self) -> None:
        missing = sorted(self.expected - self.received)
        if missing:
            raise KeyError(f"weight sync ended without {len(missing)} tensor(s): {missing[:5]}")


@dataclass
class SyncReport:
    seconds: float
    bytes: int
    buckets: int
    tensors: int


def sync_weights(
    model_chunks: Sequence[torch.nn.Module],
    cfg: Qwen25VLConfig,
    engine: RolloutEngine,
    *,
    bucket_bytes: int = 512 * 2**20,
) -> SyncReport:
    """Collective over the model-parallel group: every rank streams the whole policy into its engine."""
    start = time.perf_counter()
    receiver = WeightReceiver(expected_hf_names(cfg, qwen2_5_vl_mappings(cfg)))
    total = count = 0
    for count, bucket in enumerate(pack_buckets(export_hf_weights(model_chunks, cfg), bucket_bytes), start=1):
        engine.update_weights(receiver.receive(bucket))
        total += bucket.buffer.numel()
    receiver.finish()
    return SyncReport(time.perf_counter() - start, total, count, len(receiver.received))
