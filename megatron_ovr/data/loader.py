"""SFT micro-batches for one data-parallel rank, resumable to the exact row; weighted dataset blending.

Contract
--------
:class:`SFTDataLoader` iterates global batches forever: each epoch plans its rows with
``(seed, epoch)`` (``packing``), and a global batch is the next ``micro_batch_size * num_microbatches *
dp_size`` rows of that plan, running on into the next epoch's plan when one ends (no row is dropped). DP
rank ``r`` takes the ``r``-th contiguous share and yields it as ``num_microbatches`` dicts of
``collate`` outputs. ``state_dict()`` — ``{"epoch", "rows_consumed"}``, equal on every rank — counts the
batches already yielded, so a loader given it with ``load_state_dict`` continues at exactly the next row.

:class:`BlendedDataset` mixes datasets with weights into one virtual dataset: its position ``i`` comes from
the dataset whose share is furthest behind its weight (so every prefix holds each dataset within one sample
of its weight), and each dataset's samples are drawn in a seeded order, reshuffled each time it is cycled.
"""

from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from .indexed import SFTSample
from .packing import collate, plan_packed_rows, plan_unpacked_rows

__all__ = ["BlendedDataset", "SFTDataLoader"]


class SFTDataset(Protocol):
    """What the loader reads: ``IndexedDataset`` and ``BlendedDataset`` both provide it."""

    lengths: np.ndarray
    image_end: np.ndarray
    """``[num_samples]`` tokens a row needs to hold the sample's images whole (0 for text)."""
    pad_id: int
    vocab_size: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> SFTSample: ...


def _check_images_fit(dataset: SFTDataset, seq_length: int) -> None:
    """Before training, not mid-run: a sample cut through an image cannot be trained on."""
    too_long = np.flatnonzero(np.asarray(dataset.image_end) > seq_length)
    if too_long.size:
        first = int(too_long[0])
        raise ValueError(
            f"{too_long.size} sample(s) have images that end past seq_length={seq_length} (e.g. sample {first}: "
            f"its last image token is token {int(dataset.image_end[first])}); raise data.seq_length, lower the "
            f"images' max_pixels, or drop those samples when preprocessing"
        )


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")


class SFTDataLoader:
    """This DP rank's micro-batches of one global batch per iteration step (see module docstring).

    Args:
        dataset: an ``SFTDataset``.
        seq_length: tokens per row.
        micro_batch_size: rows per micro-batch.
        num_microbatches: micro-batches per global batch on each rank.
        dp_rank, dp_size: this rank and the data-parallel world size.
        seed: shuffling seed (epoch ``e`` plans with ``(seed, e)``).
        packed: pack several samples per row (else one sample per padded row).
        pad_id: padding token; defaults to ``dataset.pad_id``.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        *,
        seq_length: int,
        micro_batch_size: int,
        num_microbatches: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        packed: bool = True,
        pad_id: Optional[int] = None,
    ):
        _require_positive(seq_length=seq_length, micro_batch_size=micro_batch_size,
                          num_microbatches=num_microbatches, dp_size=dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must lie in [0, dp_size={dp_size})")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        _check_images_fit(dataset, seq_length)
        self.dataset = dataset
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.pad_id = dataset.pad_id if pad_id is None else pad_id
        self._plan_rows = plan_packed_rows if packed else plan_unpacked_rows
        self._plan_cache: tuple[int, list[np.ndarray]] = (-1, [])
        self._epoch = 0
        self._rows_consumed = 0

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch_size * self.num_microbatches

    @property
    def global_batch_rows(self) -> int:
        return self.rows_per_rank * self.dp_size

    def _plan(self, epoch: int) -> list[np.ndarray]:
        # Plans cost a pass over all samples: keep the current epoch's.
        if self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._plan_rows(self.dataset.lengths, self.seq_length, self.seed, epoch))
        return self._plan_cache[1]

    def _next_global_batch(self) -> list[np.ndarray]:
        rows: list[np.ndarray] = []
        while len(rows) < self.global_batch_rows:
            plan = self._plan(self._epoch)
            taken = plan[self._rows_consumed : self._rows_consumed + self.global_batch_rows - len(rows)]
            rows.extend(taken)
            self._rows_consumed += len(taken)
            if self._rows_consumed == len(plan):
                self._epoch, self._rows_consumed = self._epoch + 1, 0
        return rows

    def _micro_batch(self, rows: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        return collate([[self.dataset[int(i)] for i in row] for row in rows], self.seq_length, self.pad_id)

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Endless: one list of ``num_microbatches`` micro-batch dicts (``collate``'s keys) per global batch."""
        while True:
            share = self._next_global_batch()[self.dp_rank * self.rows_per_rank :][: self.rows_per_rank]
            mbs = self.micro_batch_size
            yield [self._micro_batch(share[j * mbs : (j + 1) * mbs]) for j in range(self.num_microbatches)]

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "rows_consumed": self._rows_consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, rows_consumed = int(state["epoch"]), int(state["rows_consumed"])
        if epoch < 0 or not 0 <= rows_consumed < len(self._plan(epoch)):
            raise ValueError(f"loader state {state}: epoch must be >= 0 and rows_consumed in "
                             f"[0, {len(self._plan(max(epoch, 0)))}) rows of that epoch's plan")
        self._epoch, self._rows_consumed = epoch, rows_consumed


def _blend_order(weights: np.ndarray, size: int) -> np.ndarray:
    """``[size]`` dataset index of each blended position.

    Dataset ``d``'s ``k``-th sample is due at time ``(k + 1/2) / w_d``; taking the ``size`` earliest due
    samples keeps every prefix within one sample of its weight, without a Python loop over positions.
    """
    due = [(np.arange(int(np.ceil(size * w)) + 1) + 0.5) / w for w in weights]
    owner = np.concatenate([np.full(len(t), d) for d, t in enumerate(due)])
    # Ties go to the lower dataset index (lexsort's last key is the primary one).
    return owner[np.lexsort((owner, np.concatenate(due)))[:size]]


def _draw_order(num_draws: int, num_samples: int, seed: int, dataset: int) -> np.ndarray:
    """``[num_draws]`` sample indices: seeded permutations of the dataset, a fresh one per pass."""
    passes = -(-num_draws // num_samples)
    perms = [np.random.default_rng([seed, dataset, p]).permutation(num_samples) for p in range(passes)]
    return np.concatenate(perms)[:num_draws] if perms else np.zeros(0, dtype=np.int64)


class BlendedDataset:
    """Weighted mix of several datasets (see module docstring); behaves like one ``SFTDataset``.

    Args:
        datasets: the sources (same tokenizer: equal ``pad_id`` and ``vocab_size``).
        weights: positive, one per dataset (normalised here).
        seed: seeds each dataset's sample order.
        size: number of blended samples (default: the datasets' total); a dataset whose weight asks for
            more samples than it holds is cycled, one with fewer is subsampled.
    """

    def __init__(self, datasets: Sequence[SFTDataset], weights: Sequence[float], seed: int, size: Optional[int] = None):
        if not datasets or len(weights) != len(datasets):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w) & (w > 0)):
            raise ValueError(f"weights must be positive and finite, got {list(weights)}")
        if any(len(d) == 0 for d in datasets):
            raise ValueError(f"every dataset must hold samples, got sizes {[len(d) for d in datasets]}")
        for attr in ("pad_id", "vocab_size"):
            values = {getattr(d, attr) for d in datasets}
            if len(values) > 1:
                raise ValueError(f"datasets disagree on {attr}: {sorted(values)} "
                                 f"(tokenised with different tokenizers?)")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.pad_id = datasets[0].pad_id
        self.vocab_size = datasets[0].vocab_size
        size = sum(len(d) for d in datasets) if size is None else size
        _require_positive(size=size)
        self.dataset_index = _blend_order(self.weights, size)
        self.sample_index = np.zeros(size, dtype=np.int64)
        self.lengths = np.zeros(size, dtype=np.int64)
        self.image_end = np.zeros(size, dtype=np.int64)
        for d, dataset in enumerate(self.datasets):
            slots = self.dataset_index == d
            self.sample_index[slots] = _draw_order(int(slots.sum()), len(dataset), seed, d)
            self.lengths[slots] = np.asarray(dataset.lengths)[self.sample_index[slots]]
            self.image_end[slots] = np.asarray(dataset.image_end)[self.sample_index[slots]]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> SFTSample:
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]
