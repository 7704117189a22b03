"""The SFT trainer: a ``ModelTrainer`` (megatron schedules + DDP + distributed optimizer) driven over the
data loader, with atomic checkpoints, exact resume, SIGTERM safety, a NaN policy and metrics. The loss is
pluggable (``loss_fn``); PPO drives the same core with its own losses."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from megatron_ovr import platform
from megatron_ovr.config.io import to_dict
from megatron_ovr.config.sft import SFTConfig
from megatron_ovr.distributed import is_reporting_rank

from . import checkpointing
from .core import ModelTrainer, StepResult
from .flops import lm_training_flops, peak_flops
from .losses import masked_token_loss
from .metrics import MetricsLogger
from .preemption import SaveAndStopPolicy


class Trainer:
    """Owns the model trainer, data loader and checkpoints of one SFT run."""

    def __init__(self, cfg: SFTConfig, data_loader, *, loss_fn: Callable = masked_token_loss):
        """``loss_fn(per_token, per_token_loss) -> (sum, count, report)`` reads ``per_token["loss_mask"]``
        (see ``losses``); both arrive at the loss mask's tokens only, ``[1, n]`` (the head runs there alone)."""
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.core = ModelTrainer(cfg.model, cfg.parallel, cfg.optimizer, cfg.train_steps, seed=cfg.seed)
        self.model_cfg = self.core.model_cfg
        self.data = data_loader
        self.step = 0
        self.skipped_steps = 0
        self.metrics = MetricsLogger(
            enabled=is_reporting_rank(),
            tensorboard_dir=cfg.logging.tensorboard_dir,
            wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode,
            wandb_config=to_dict(cfg),
            jsonl_path=cfg.logging.metrics_path,
        )
        resume_dir = cfg.checkpoint.load or cfg.checkpoint.dir
        if resume_dir and checkpointing.latest_step(resume_dir) is not None:
            extra = self.core.load(resume_dir)
            self.step = extra["step"]
            self.skipped_steps = extra["skipped_steps"]
            self.data.load_state_dict(extra["data"])
            if dist.get_rank() == 0:
                print(f"megatron-ovr: resumed from {resume_dir} at step {self.step}", flush=True)
        self._batches = iter(self.data)
        self.control = SaveAndStopPolicy(total=cfg.train_steps, save_interval=cfg.checkpoint.save_interval,
                                         exit_after=cfg.exit_after_steps, first=self.step, unit="step")

    def train_step(self, microbatches: list[dict]) -> StepResult:
        # The head runs at the loss's tokens only: prompts and padding need no logits.
        return self.core.train_step(microbatches, self.loss_fn, loss_keys=("loss_mask",), head_mask="loss_mask")

    def _step_metrics(self, result: StepResult, elapsed: float) -> dict[str, float]:
        metrics = {
            "loss": result.loss,
            "lr": self.core.optimizer.param_groups[0]["lr"],
            "grad_norm": float("nan") if result.grad_norm is None else float(result.grad_norm),
            "tokens_per_s": result.tokens / elapsed,
            "step_time_s": elapsed,
            "mem_gb": platform.peak_memory_bytes() / 2**30,
            "skipped_steps": self.skipped_steps,
        }
        peak = peak_flops(torch.cuda.get_device_name()) if platform.HAVE_CUDA else None
        if peak is not None:
            flops = lm_training_flops(self.model_cfg.text, self.cfg.data.seq_length, result.tokens, result.head_tokens)
            metrics["mfu"] = flops / elapsed / (peak * dist.get_world_size())
        return metrics

    def save(self) -> None:
        if not self.cfg.checkpoint.dir:
            return
        extra = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data": self.data.state_dict(),
            "config": to_dict(self.cfg),
        }
        self.core.save(self.cfg.checkpoint.dir, self.step, extra)

    def train(self) -> list[dict]:
        cfg = self.cfg
        while self.step < cfg.train_steps:
            start = time.perf_counter()
            result = self.train_step(next(self._batches))
            self.step += 1
            if not result.finite:
                if cfg.nan_policy == "stop":
                    raise FloatingPointError(f"non-finite loss or gradient at step {self.step} (nan_policy=stop)")
                self.skipped_steps += 1
            elapsed = time.perf_counter() - start
            if self.step % cfg.logging.log_interval == 0 or not result.finite:
                self.metrics.log(self.step, self._step_metrics(result, elapsed))
            if self.control.after_step(self.step, self.save):
                break
        if cfg.logging.plot_path:
            self.metrics.plot(cfg.logging.plot_path, keys=("loss", "lr", "grad_norm"), title="cold-start SFT")
        self.metrics.close()
        return self.metrics.history
