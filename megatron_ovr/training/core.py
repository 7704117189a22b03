"""The training core shared by SFT and PPO: one trainable model (its chunks, DDP, optimizer and LR schedule),
optimizer steps over micro-batches with a pluggable loss, forward-only passes, and its checkpoints.

The SFT trainer owns one; the PPO driver owns two (actor and critic). Micro-batches are dicts with the full
sequence tensors of the model's forward contract (``tokens``, ``position_ids``, ``segment_ids``, optional
``pixel_values``/``image_grid_thw``, ``labels`` for the policy) plus per-token tensors ``[b, s]`` that the
loss reads; the core hands the loss this context-parallel rank's slice of those.

``head_mask`` (steps and forward-only passes) names a per-token micro-batch tensor: the output head then runs
only where it is nonzero (``Qwen25VLModel.forward``), and the loss sees the per-token tensors and the model's
output at those positions only, ``[1, n]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ovr import platform
from megatron_ovr.checkpoint import HFCheckpoint
from megatron_ovr.config import ParallelConfig, Qwen25VLConfig, get_preset
from megatron_ovr.config.checks import DTYPES
from megatron_ovr.config.sft import ModelSection, OptimizerSection
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks, init_value_head
from megatron_ovr.parallel.context_parallel import gather_from_context_parallel, split_for_context_parallel

from . import checkpointing
from .optimizer import build_optimizer

# The LM output layer, or the critic's value head in its place.
OUTPUT_LAYER_KEY = "language_model.output_layer.weight"

# Which parameters each freeze flag covers (by name prefix on Qwen25VLModel).
_FREEZE_GROUPS = {
    "freeze_vision": ("vision.patch_embed.", "vision.decoder."),
    "freeze_merger": ("vision.merger_norm.", "vision.merger."),
    "freeze_language": ("language_model.",),
}

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(per_token_local, model_output) -> (loss sum, token count, report)``: ``per_token_local`` holds this
rank's context-parallel slice of the micro-batch's per-token tensors; ``report`` maps metric names to
``[sum, count]`` tensors, averaged over the step (the key ``"loss"`` is the step's loss)."""


def build_model(
    section: ModelSection, parallel, *, head: str = "lm", seed: int = 0
) -> tuple[Qwen25VLConfig, list[torch.nn.Module]]:
    """Model chunks for this rank — from an HF checkpoint, a megatron checkpoint's weights, or a preset
    (random init) — with freezing applied. ``head="value"`` builds the PPO critic: started from a policy
    checkpoint, it keeps the trunk and draws a fresh value head (seeded by ``seed``)."""
    dtype = DTYPES[section.dtype]
    checkpoint = HFCheckpoint(section.hf_dir) if section.hf_dir else None
    if checkpoint is not None:
        model_cfg = checkpoint.config
    elif section.megatron_dir:
        model_cfg = checkpointing.saved_model_config(section.megatron_dir)
    else:
        model_cfg = get_preset(section.preset)
    chunks = build_model_chunks(model_cfg, parallel, dtype=dtype, recompute=section.recompute, head=head)
    init_value_head(chunks, seed)
    if checkpoint is not None:
        checkpoint.load_into(chunks)
    elif section.megatron_dir:
        stored_head = checkpointing.saved_extra(section.megatron_dir).get("head", "lm")
        if head == "lm" and stored_head == "value":
            raise ValueError(f"{section.megatron_dir} is a critic checkpoint: it cannot start a policy")
        skip = (OUTPUT_LAYER_KEY,) if head != stored_head else ()
        checkpointing.load_checkpoint(section.megatron_dir, chunks, restore_rng=False, skip_model_keys=skip)
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
    metrics: dict[str, float]
    """Every reported metric averaged over the step (``loss`` included)."""
    tokens: int
    head_tokens: int
    """The tokens the output head ran at (``tokens`` unless a ``head_mask`` chose fewer)."""
    finite: bool
    grad_norm: Optional[float]


def _on_device(batch: dict) -> dict:
    """The micro-batch's tensors on the training device; the image grids stay on the host, where the
    ViT's window layout is computed from them."""
    device = platform.default_device()
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "image_grid_thw" else v
            for k, v in batch.items()}


def _cp_slice(tensor: torch.Tensor) -> torch.Tensor:
    cp_size = parallel_state.get_context_parallel_world_size()
    return split_for_context_parallel(tensor, 1, parallel_state.get_context_parallel_rank(), cp_size)


class ModelTrainer:
    """One trainable model; see the module docstring."""

    def __init__(
        self,
        model_section: ModelSection,
        parallel: ParallelConfig,
        optimizer_section: OptimizerSection,
        total_steps: int,
        *,
        head: str = "lm",
        seed: int = 0,
    ):
        self.head = head
        self.dtype = DTYPES[model_section.dtype]
        self.model_cfg, self.chunks = build_model(model_section, parallel, head=head, seed=seed)
        self.model = wrap_ddp(self.chunks, optimizer_section.distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.model, optimizer_section, total_steps, self.dtype)

    # ---- steps -------------------------------------------------------------------------------------

    def _run_model(self, module, batch: dict, head_mask: Optional[str]):
        labels = batch.get("labels") if self.head == "lm" else None
        return module(
            batch["tokens"], batch["position_ids"], batch["segment_ids"],
            batch.get("pixel_values"), batch.get("image_grid_thw"), labels=labels,
            head_mask=batch[head_mask] != 0 if head_mask else None,
        )

    @staticmethod
    def _local(batch: dict, keys: Sequence[str], head_mask: Optional[str]) -> tuple[dict, Optional[torch.Tensor]]:
        """This CP rank's slice of the per-token tensors ``keys`` (``[1, n]`` at the head's positions when
        ``head_mask`` names one), and those positions (``[b, s/cp]`` bool) or None."""
        local = {key: _cp_slice(batch[key]) for key in keys}
        if not head_mask:
            return local, None
        rows = _cp_slice(batch[head_mask]) != 0
        return {key: value[rows][None] for key, value in local.items()}, rows

    def _schedule(self, forward_step, microbatches: list[dict], **kwargs):
        """megatron's pipeline schedule over the micro-batches (one packed shape per call)."""
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(microbatches) for _ in self.model],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=microbatches[0]["tokens"].shape[1],
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            **kwargs,
        )

    def train_step(
        self, microbatches: list[dict], loss_fn: LossFn, loss_keys: Sequence[str], *, head_mask: Optional[str] = None
    ) -> StepResult:
        """One optimizer step over ``microbatches`` (this data-parallel rank's share of the global batch).
        ``loss_keys``: the per-token tensors of each micro-batch that ``loss_fn`` reads; ``head_mask``: see the
        module docstring."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

        def forward_step(data_iterator, module):
            batch = _on_device(next(data_iterator))
            local, _ = self._local(batch, loss_keys, head_mask)
            return self._run_model(module, batch, head_mask), lambda output: loss_fn(local, output)

        reports = self._schedule(forward_step, microbatches, forward_only=False)
        names = sorted(reports[0]) if reports else []
        # Per metric [sum, count], then the step's tokens and those the head ran at, summed over micro-batches
        # and data/context-parallel ranks (the last stage has them; the other stages contribute zeros through
        # the model-parallel sum).
        totals = torch.zeros(2 * len(self._metric_names(names)) + 2, device=platform.default_device())
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            tokens = sum(int((mb["segment_ids"] > 0).sum()) for mb in microbatches)
            head_tokens = sum(int((mb[head_mask] != 0).sum()) for mb in microbatches) if head_mask else tokens
            # Every context-parallel rank reads the whole micro-batch: count its tokens once.
            counts = torch.tensor([tokens, head_tokens], dtype=torch.float32)
            counts /= parallel_state.get_context_parallel_world_size()
            sums = [torch.stack([r[name] for r in reports]).sum(0).float() for name in names]
            totals = torch.cat(sums + [counts.to(sums[0].device)])
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        names = self._metric_names(names)
        # Every rank agrees that loss and gradients are finite before anyone updates: a NaN is never
        # trained through.
        finite = torch.tensor(float(torch.isfinite(totals).all() and self._grads_finite()), device=totals.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        grad_norm = None
        if finite.item():
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        # Pipeline stages other than the last learn the metrics from it.
        totals = self._from_last_stage(totals)
        metrics = {name: (totals[2 * i] / totals[2 * i + 1].clamp(min=1)).item() for i, name in enumerate(names)}
        tokens, head_tokens = totals[-2:].tolist()
        return StepResult(loss=metrics.get("loss", float("nan")), metrics=metrics, tokens=int(tokens),
                          head_tokens=int(head_tokens), finite=bool(finite.item()), grad_norm=grad_norm)

    def _metric_names(self, names: list[str]) -> list[str]:
        """The last stage knows the loss's report keys; the others learn them once and remember them."""
        if not hasattr(self, "_names"):
            gathered: list = [None]
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                gathered = [names]
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast_object_list(gathered, src=src, group=parallel_state.get_pipeline_model_parallel_group())
            self._names = gathered[0]
        return self._names

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return tensor

    def _grads_finite(self) -> bool:
        return all(bool(torch.isfinite(buffer.grad_data).all()) for m in self.model for buffer in m.buffers)

    @torch.no_grad()
    def forward_only(
        self,
        microbatches: list[dict],
        reduce_output: Callable[[torch.Tensor, dict], torch.Tensor],
        num_outputs: int = 1,
        *,
        head_mask: Optional[str] = None,
    ) -> list[torch.Tensor]:
        """Runs every micro-batch forward; returns, on EVERY rank of the model-parallel group, one tensor
        ``[num_outputs, b, s]`` per micro-batch. ``reduce_output(local_output, local_batch)`` maps this rank's
        output (logits ``[b, s/cp, V/tp]`` or values ``[b, s/cp]``) to ``[num_outputs, b, s/cp]`` (collectives
        over TP are fine); ``local_batch`` holds this rank's CP slice of ``labels``. With ``head_mask`` (see the
        module docstring) both are ``[1, n, ...]`` at the head's positions, and the result is zero elsewhere.
        The core gathers the result over CP and broadcasts it from the last pipeline stage."""

        def reduce_at_head_positions(output: torch.Tensor, local: dict, rows: Optional[torch.Tensor]):
            reduced = reduce_output(output, local)
            if rows is None:
                return reduced
            dense = reduced.new_zeros((num_outputs, *rows.shape))
            dense[:, rows] = reduced[:, 0]
            return dense

        def forward_step(data_iterator, module):
            batch = _on_device(next(data_iterator))
            local, rows = self._local(batch, ["labels"], head_mask)
            return self._run_model(module, {**batch, "labels": None}, head_mask), (
                lambda output, non_loss_data=True: reduce_at_head_positions(output, local, rows)
            )

        # megatron's inference path: the schedule hands back what the "loss" function returns.
        outputs = self._schedule(forward_step, microbatches, forward_only=True, collect_non_loss_data=True)
        results = []
        for i, batch in enumerate(microbatches):
            full = torch.empty((num_outputs, *batch["tokens"].shape), dtype=torch.float32,
                               device=platform.default_device())
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                full = gather_from_context_parallel(outputs[i].float(), -1, parallel_state.get_context_parallel_group())
            results.append(self._from_last_stage(full.contiguous()).cpu())
        return results

    # ---- checkpoints -------------------------------------------------------------------------------

    def save(self, root: str, step: int, extra: dict[str, Any]) -> None:
        extra = {**extra, "head": self.head, "model_config": self.model_cfg.to_hf_config(),
                 "world_size": dist.get_world_size()}
        checkpointing.save_checkpoint(root, step, self.model, self.optimizer, self.scheduler, extra)

    def load(self, root: str, *, step: Optional[int] = None, restore_rng: bool = True) -> Optional[dict]:
        return checkpointing.load_checkpoint(root, self.model, self.optimizer, self.scheduler,
                                             restore_rng=restore_rng, step=step)
