"""Compares our megatron Qwen2.5-VL with HF transformers on one HF checkpoint, at any TP/PP/CP layout.

Every rank loads its shard of the checkpoint into the megatron model and runs one forward-only batch through
megatron's pipeline schedule. The reporting rank (last pipeline stage, TP/CP/DP rank 0) also loads the
checkpoint with ``transformers``, runs the same batch once, prints a table (max and mean |logit diff| over
non-padding tokens, argmax agreement) and decides; every rank then exits 1 if max |diff| > --atol, else 0.

    torchrun --nproc-per-node 4 tools/compare_hf_megatron.py --hf-dir DIR --tp 2 --cp 2 --sample image
    python tools/compare_hf_megatron.py --hf-dir DIR --tp 1 --pp 1 --cp 1      # one process, no torchrun

World size = tp * pp * cp * dp. ``--perturb-megatron SCALE`` is a self-test: it adds noise to our model's
weights after loading, which proves the comparison can fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ovr import platform
from megatron_ovr.checkpoint import HFCheckpoint
from megatron_ovr.config import ParallelConfig, Qwen25VLConfig
from megatron_ovr.config.checks import DTYPES
from megatron_ovr.distributed import init_distributed, is_reporting_rank, shutdown_distributed
from megatron_ovr.models.qwen2_5_vl import reference
from megatron_ovr.models.qwen2_5_vl.inference import forward_logits
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks

# Two rows each: the second, shorter row is right-padded, so padding handling is compared too.
SAMPLES = {
    "text": [[40], [23]],
    "image": [[6, (1, 8, 12), 10], [17]],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    parser.add_argument("--sample", choices=sorted(SAMPLES), default="text", help="batch to compare on")
    parser.add_argument("--atol", type=float, default=1e-4, help="fail when max |logit diff| exceeds this")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both models")
    parser.add_argument("--perturb-megatron", type=float, default=0.0, metavar="SCALE",
                        help="self-test: add N(0, SCALE^2) noise to our weights after loading (proves the "
                             "comparison can fail)")
    return parser.parse_args(argv)


def sample_batch(cfg: Qwen25VLConfig, sample: str, multiple: int) -> reference.SampleBatch:
    """The named sample, right-padded to a multiple of ``multiple`` (CP and SP split the sequence)."""
    rows = SAMPLES[sample]
    length = reference.sample_batch(cfg, rows, seed=0).input_ids.shape[1]
    return reference.sample_batch(cfg, rows, pad_to=-(-length // multiple) * multiple, seed=0)


def on_device(batch: reference.SampleBatch) -> reference.SampleBatch:
    device = platform.default_device()
    return dataclasses.replace(batch, **{f.name: value.to(device) for f in dataclasses.fields(batch)
                                         if (value := getattr(batch, f.name)) is not None})


@torch.no_grad()
def perturb(model_chunks, scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for chunk in model_chunks:
        for param in chunk.parameters():
            param.add_((torch.randn(param.shape, generator=gen) * scale).to(param))


def hf_reference_logits(hf_dir: str, dtype: torch.dtype, batch: reference.SampleBatch) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration

    # transformers 5 maps the on-disk names (visual.*, model.*) to its in-memory modules on load.
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype, output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise RuntimeError(f"transformers did not load {hf_dir} cleanly: {info}")
    return reference.hf_logits(model.to(platform.default_device()).eval(), batch)


def compare(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Statistics over the tokens where ``mask`` is set (padding is excluded)."""
    ours, ref, mask = ours.float(), ref.float(), mask.bool()
    diff = (ours - ref).abs()[mask]
    agree = (ours.argmax(-1) == ref.argmax(-1))[mask].float().mean()
    return {"max": diff.max().item(), "mean": diff.mean().item(), "agree": 100 * agree.item()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, context_parallel=args.cp,
                              sequence_parallel=args.sp)
    init_distributed(parallel)
    if dist.get_rank() == 0:
        print(platform.describe_backends(), flush=True)
    dtype = DTYPES[args.dtype]

    ckpt = HFCheckpoint(args.hf_dir)
    cfg = ckpt.config
    chunks = build_model_chunks(cfg, parallel, dtype=dtype)
    ckpt.load_into(chunks)
    if args.perturb_megatron:
        perturb(chunks, args.perturb_megatron)

    batch = on_device(sample_batch(cfg, args.sample, 2 * args.cp * args.tp))
    logits = forward_logits(chunks, batch, batch.input_ids.shape[1])

    failed = torch.zeros((), dtype=torch.int32, device=platform.default_device())
    if is_reporting_rank():
        stats = compare(logits, hf_reference_logits(args.hf_dir, dtype, batch), batch.attention_mask)
        layout = f"tp{args.tp} pp{args.pp} cp{args.cp} dp{parallel_state.get_data_parallel_world_size()}"
        layout += " sp" if args.sp else ""
        print(f"{'sample':<8}{'layout':<22}{'max |diff|':>12}{'mean |diff|':>13}{'argmax agree':>14}")
        print(f"{args.sample:<8}{layout:<22}{stats['max']:>12.3e}{stats['mean']:>13.3e}{stats['agree']:>13.1f}%")
        ok = stats["max"] <= args.atol
        print(f"{'PASS' if ok else 'FAIL'}: max |diff| {stats['max']:.3e} {'<=' if ok else '>'} atol {args.atol:.1e}",
              flush=True)
        failed.fill_(0 if ok else 1)
    # Every rank exits with the reporter's verdict.
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    shutdown_distributed()
    return int(failed.item())


if __name__ == "__main__":
    sys.exit(main())
