"""SIGTERM as a request to checkpoint and exit cleanly (SLURM preemption, ``scancel --signal=TERM``).

The handler only sets a flag (a worker may get SIGTERM twice: from slurmstepd, then from torchrun); the
training loop checks ``should_stop()`` after each step — a collective, so every rank stops at the same step.
"""

from __future__ import annotations

import signal
from typing import Callable, Optional

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


class SaveAndStopPolicy:
    """When a training loop (SFT steps, PPO iterations) checkpoints and when it stops: every
    ``save_interval`` steps (0: never in between), at the last step, on SIGTERM, and after ``exit_after``
    steps of this process (time-limited queues run a long schedule in chunks)."""

    def __init__(self, *, total: int, save_interval: int, exit_after: Optional[int], first: int, unit: str):
        self.total, self.save_interval, self.exit_after, self.first, self.unit = total, save_interval, exit_after, first, unit
        self.preemption = PreemptionHandler()

    def after_step(self, step: int, save: Callable[[], None]) -> bool:
        """Saves if due; returns True when the loop must stop (collective: every rank calls it)."""
        preempted = self.preemption.should_stop()
        chunk_done = self.exit_after is not None and step - self.first >= self.exit_after
        if preempted or chunk_done or (self.save_interval and step % self.save_interval == 0) or step == self.total:
            save()
        if preempted or chunk_done:
            if dist.get_rank() == 0:
                why = "SIGTERM" if preempted else f"exit after {self.exit_after} {self.unit}s"
                print(f"megatron-ovr: {why}: saved {self.unit} {step}, exiting", flush=True)
            return True
        return False
