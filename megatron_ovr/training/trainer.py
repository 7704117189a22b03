"""The SFT trainer: megatron schedules + DDP + (distributed) optimizer, atomic checkpoints, exact resume,
SIGTERM-safe, NaN policy, metrics. The loss is pluggable (``loss_fn``) so PPO reuses the same step."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ovr import platform
from megatron_ovr.checkpoint import HFCheckpoint
from megatron_ovr.config import Qwen25VLConfig, get_preset
from megatron_ovr.config.checks import DTYPES
from megatron_ovr.config.io import to_dict
from megatron_ovr.config.sft import ModelSection, SFTConfig
from megatron_ovr.distributed import is_reporting_rank
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks
from megatron_ovr.parallel.context_parallel import split_for_context_parallel

from . import checkpointing
from .flops import lm_training_flops_per_token, peak_flops
from .losses import masked_token_loss
from .metrics import MetricsLogger
from .optimizer import build_optimizer
from .preemption import PreemptionHandler

# Which parameters each freeze flag covers (by name prefix on Qwen25VLModel).
_FREEZE_GROUPS = {
    "freeze_vision": ("vision.patch_embed.", "vision.decoder."),
    "freeze_merger": ("vision.merger_norm.", "vision.merger."),
    "freeze_language": ("language_model.",),
}


def build_model(section: ModelSection, parallel) -> tuple[Qwen25VLConfig, list[torch.nn.Module]]:
    """Model chunks for this rank — from an HF checkpoint, a megatron checkpoint's weights, or a preset
    (random init) — with freezing applied."""
    dtype = DTYPES[section.dtype]
    checkpoint = HFCheckpoint(section.hf_dir) if section.hf_dir else None
    if checkpoint is not None:
        model_cfg = checkpoint.config
    elif section.megatron_dir:
        model_cfg = checkpointing.saved_model_config(section.megatron_dir)
    else:
        model_cfg = get_preset(section.preset)
    chunks = build_model_chunks(model_cfg, parallel, dtype=dtype, recompute=section.recompute)
    if checkpoint is not None:
        checkpoint.load_into(chunks)
    elif section.megatron_dir:
        checkpointing.load_checkpoint(section.megatron_dir, chunks, restore_rng=False)
    frozen = tuple(p for flag, prefixes in _FREEZE_GROUPS.items() if getattr(section, flag) for p in prefixes)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(not name.startswith(frozen))
        # Per-token loss: the schedule reports token counts and finalize_model_grads divides by their sum.
        chunk.config.calculate_per_token_loss = True
    return model_cfg, chunks


def wrap_ddp(chunks, distributed_optimizer: bool) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    model = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    return model


@dataclass
class StepResult:
    loss: float
    tokens: int
    finite: bool
    grad_norm: Optional[float]


class Trainer:
    """Owns model, optimizer, scheduler, data loader and checkpoints for one run."""

    def __init__(self, cfg: SFTConfig, data_loader, *, loss_fn: Callable = masked_token_loss):
        """``loss_fn(loss_mask, per_token_loss) -> (sum, count, report)`` (see ``losses``)."""
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.model_cfg, self.chunks = build_model(cfg.model, cfg.parallel)
        self.model = wrap_ddp(self.chunks, cfg.optimizer.distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.optimizer, cfg.train_steps, DTYPES[cfg.model.dtype]
        )
        self.data = data_loader
        self.step = 0
        self.skipped_steps = 0
        self.preemption = PreemptionHandler()
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
            extra = checkpointing.load_checkpoint(resume_dir, self.model, self.optimizer, self.scheduler)
            self.step = extra["step"]
            self.skipped_steps = extra["skipped_steps"]
            self.data.load_state_dict(extra["data"])
            if dist.get_rank() == 0:
                print(f"megatron-ovr: resumed from {resume_dir} at step {self.step}", flush=True)
        self._batches = iter(self.data)

    # ---- one optimizer step ------------------------------------------------------------------------

    def _forward_step(self, data_iterator, module):
        batch = next(data_iterator)
        output = module(
            batch["tokens"], batch["position_ids"], batch["segment_ids"],
            batch.get("pixel_values"), batch.get("image_grid_thw"), labels=batch["labels"],
        )
        cp_size = parallel_state.get_context_parallel_world_size()
        local_mask = split_for_context_parallel(batch["loss_mask"], 1, parallel_state.get_context_parallel_rank(), cp_size)
        return output, functools.partial(self.loss_fn, local_mask)

    def train_step(self, microbatches: list[dict]) -> StepResult:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=[iter(microbatches) for _ in self.model],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=microbatches[0]["tokens"].shape[1],
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=False,
        )
        # [loss sum, loss tokens, tokens] over micro-batches and data/context-parallel ranks (last stage).
        totals = torch.zeros(3, device=platform.default_device())
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            tokens = sum(int((mb["segment_ids"] > 0).sum()) for mb in microbatches)
            # Every context-parallel rank reads the whole micro-batch: count its tokens once.
            tokens /= parallel_state.get_context_parallel_world_size()
            loss = torch.stack([r["lm loss"] for r in reports]).sum(0)
            totals = torch.cat([loss, torch.tensor([tokens], dtype=loss.dtype)])
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        # Every rank agrees that loss and gradients are finite before anyone updates: a NaN is never
        # trained through.
        finite = torch.tensor(float(torch.isfinite(totals).all() and self._grads_finite()), device=totals.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        grad_norm = None
        if finite.item():
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        return StepResult(loss=loss, tokens=int(totals[2].item()), finite=bool(finite.item()), grad_norm=grad_norm)

    def _grads_finite(self) -> bool:
        return all(bool(torch.isfinite(buffer.grad_data).all()) for m in self.model for buffer in m.buffers)

    # ---- the loop ----------------------------------------------------------------------------------

    def _step_metrics(self, result: StepResult, elapsed: float) -> dict[str, float]:
        metrics = {
            "loss": result.loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float("nan") if result.grad_norm is None else float(result.grad_norm),
            "tokens_per_s": result.tokens / elapsed,
            "step_time_s": elapsed,
            "mem_gb": platform.peak_memory_bytes() / 2**30,
            "skipped_steps": self.skipped_steps,
        }
        peak = peak_flops(torch.cuda.get_device_name()) if platform.HAVE_CUDA else None
        if peak is not None:
            flops = result.tokens * lm_training_flops_per_token(self.model_cfg.text, self.cfg.data.seq_length)
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
            "model_config": self.model_cfg.to_hf_config(),
            "world_size": dist.get_world_size(),
        }
        checkpointing.save_checkpoint(self.cfg.checkpoint.dir, self.step, self.model, self.optimizer, self.scheduler, extra)

    def train(self) -> list[dict]:
        cfg = self.cfg
        first_step = self.step
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
            preempted = self.preemption.should_stop()
            chunk_done = cfg.exit_after_steps is not None and self.step - first_step >= cfg.exit_after_steps
            interval = cfg.checkpoint.save_interval
            if preempted or chunk_done or (interval and self.step % interval == 0) or self.step == cfg.train_steps:
                self.save()
            if preempted or chunk_done:
                if dist.get_rank() == 0:
                    why = "SIGTERM" if preempted else f"exit_after_steps={cfg.exit_after_steps}"
                    print(f"megatron-ovr: {why}: saved step {self.step}, exiting", flush=True)
                break
        if cfg.logging.plot_path:
            self.metrics.plot(cfg.logging.plot_path, keys=("loss", "lr", "grad_norm"), title="cold-start SFT")
        self.metrics.close()
        return self.metrics.history
