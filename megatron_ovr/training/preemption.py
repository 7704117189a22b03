"""SIGTERM as a request to checkpoint and exit cleanly (SLURM preemption, ``scancel --signal=TERM``).

The handler only sets a flag (a worker may get SIGTERM twice: from slurmstepd, then from torchrun); the
training loop checks ``should_stop()`` after each step — a collective, so every rank stops at the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_ovr import platform


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        flag = torch.tensor(int(self.requested), device=platform.default_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
