"""One rank of a parallel-layout parity run (launched by torchrun from test_parallel_layouts.py).

Builds the HF reference with a fixed seed on every rank, loads it into the megatron model at the given
layout, then — through megatron's real pipeline schedule, DDP and ``finalize_model_grads`` — computes
(1) full logits, (2) the gradient of a fixed loss, (3) the HF export of the weights. The last stage saves
logits and loss, global rank 0 the exported gradients and weights, for the test to compare with the
single-process HF result.

``--head value`` runs the PPO critic instead (the trunk from HF, a seeded value head): its loss is the mean
value over real tokens, and there are no logits to save.
"""

import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ovr.config import ParallelConfig
from megatron_ovr.distributed import init_distributed, shutdown_distributed
from megatron_ovr.mapping import export_hf_weights, load_hf_weights
from megatron_ovr.mapping.qwen2_5_vl import VALUE_HEAD_HF_NAME
from megatron_ovr.models.qwen2_5_vl import reference
from megatron_ovr.models.qwen2_5_vl.inference import forward_logits
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks, init_value_head
from megatron_ovr.parallel.context_parallel import split_for_context_parallel
from megatron_ovr.training.core import wrap_ddp
from tiny_configs import layout_config

# Two rows, text and images of different sizes, right padding; length a multiple of 2 * cp * tp.
BATCH_ROWS = [[6, (1, 4, 6), 5, (1, 6, 10), 3], [4, (1, 8, 8), 9]]
PAD_TO = 96
VALUE_HEAD_SEED = 3


def parity_batch(cfg):
    batch = reference.sample_batch(cfg, BATCH_ROWS, pad_to=PAD_TO, seed=1)
    labels = torch.randint(0, cfg.text.vocab_size, batch.input_ids.shape, generator=torch.Generator().manual_seed(2))
    return batch, labels


def run(args) -> None:
    parallel = ParallelConfig(
        tensor_parallel=args.tp, pipeline_parallel=args.pp, context_parallel=args.cp, sequence_parallel=args.sp,
        virtual_pipeline=args.vp,
    )
    init_distributed(parallel)
    cfg = layout_config()
    hf_weights = reference.hf_state_dict(reference.build_hf_model(cfg, seed=0))
    chunks = build_model_chunks(cfg, parallel, head=args.head)
    load_hf_weights(chunks, cfg, hf_weights.__getitem__, keep=[VALUE_HEAD_HF_NAME])
    init_value_head(chunks, seed=VALUE_HEAD_SEED)
    model = wrap_ddp(chunks, distributed_optimizer=False)

    batch, labels = parity_batch(cfg)
    num_tokens = batch.attention_mask.sum()
    # Data parallelism: each DP rank takes a contiguous share of the rows, cut into micro-batches.
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows_per_dp = batch.input_ids.shape[0] // dp_size
    rows_per_mb = rows_per_dp // args.microbatches
    first_row = dp_rank * rows_per_dp
    microbatches = [
        (batch.select_rows(i, i + rows_per_mb, cfg), labels[i : i + rows_per_mb])
        for i in range(first_row, first_row + rows_per_dp, rows_per_mb)
    ]
    cp_rank = parallel_state.get_context_parallel_rank()
    critic = args.head == "value"
    logits_parts = [] if critic else [forward_logits(chunks, mb, PAD_TO) for mb, _ in microbatches]
    loss_parts = []

    def forward_step(data_iterator, module):
        mb, mb_labels = next(data_iterator)
        # --head-mask: the output head runs at the loss's tokens only, and returns their losses alone.
        head_mask = mb.attention_mask if args.head_mask else None
        output = module(mb.input_ids, mb.position_ids, mb.segment_ids, mb.pixel_values, mb.image_grid_thw,
                        labels=None if critic else mb_labels, head_mask=head_mask)

        def loss_func(output_tensor):
            # Each rank returns its part of the full-batch token mean. megatron's DDP sums gradients over
            # context-parallel ranks but averages over data-parallel ones, and the schedule divides each
            # micro-batch loss by the number of micro-batches: undo both averages.
            if head_mask is None:
                local_mask = split_for_context_parallel(mb.attention_mask.float(), 1, cp_rank, args.cp)
                local_sum = (output_tensor * local_mask).sum()
            else:
                local_sum = output_tensor.sum()
            loss_parts.append(local_sum.detach())
            return local_sum / num_tokens * args.microbatches * dp_size, {}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in model],
        model=model,
        num_microbatches=len(microbatches),
        seq_length=PAD_TO,
        micro_batch_size=rows_per_mb,
        forward_only=False,
    )

    grads = dict(export_hf_weights(chunks, cfg, tensor_of=lambda p: p.main_grad))
    weights = dict(export_hf_weights(chunks, cfg))
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss_sum = torch.stack(loss_parts).sum()
        dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        result = {"loss": loss_sum / num_tokens}
        if not critic:
            logits = torch.cat(logits_parts, dim=0)
            all_logits = [torch.empty_like(logits) for _ in range(dp_size)]
            dist.all_gather(all_logits, logits, group=parallel_state.get_data_parallel_group())
            result["logits"] = torch.cat(all_logits, dim=0)
        if parallel_state.get_tensor_model_parallel_rank() == 0 and cp_rank == 0 and dp_rank == 0:
            torch.save(result, args.out + ".last")
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "weights": weights}, args.out)
    dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--head-mask", action="store_true")
    parser.add_argument("--head", choices=["lm", "value"], default="lm")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--out", required=True)
    run(parser.parse_args())
