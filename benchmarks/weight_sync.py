"""Time to stream the actor's weights into the rollout engine (issue 7: a 7B model in <= 0.3 s on one GPU),
next to the bound a single copy of the same bytes sets.

Builds the megatron actor (one process, TP=1) at the preset's shape (``--layers``/``--vit-depth`` to reduce
it) with random weights, then times ``rollout.weight_sync.sync_weights`` — the production path: export under
HF names through the mapping table, packing into checksummed buckets, the receiver's checksum and manifest
checks, and the engine's update — into one of
  copy   ``CopyEngine``: one preallocated device tensor per HF weight (shapes from HF's own model
         definition), each received tensor copied into its tensor — the engine-side work of a colocated
         engine's in-place update, without a generation engine around it (the default; vLLM cannot be
         carried to the lent GPU machine)
  vllm   a real vLLM engine started with dummy weights (``--engine vllm``; vLLM must be importable)
``--warmup`` untimed syncs first (allocator, first-touch), then ``--repeats`` timed syncs for every
``--bucket-mb`` size, each between ``torch.cuda.synchronize`` calls. The sender side alone (export, packing
and its checksums, no engine) is timed the same way, and the checksum's own rate is probed, to split the cost.

The bound: ``bytes / copy bandwidth``, the copy bandwidth being the median rate of a plain device-to-device
``copy_`` of a buffer of ``min(bytes, 1 GiB)`` (bytes copied per second; each byte read once and written
once). An engine that holds its own copy of the weights cannot take them faster than one such copy.

    python benchmarks/weight_sync.py                                   # the whole 7B in bf16, copy engine
    python benchmarks/weight_sync.py --preset tiny --dtype fp32 --repeats 2 --out /tmp/sync.json
"""

from __future__ import annotations

import argparse
import datetime
import platform as host
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_ovr import platform  # noqa: E402
from megatron_ovr.config import ParallelConfig, Qwen25VLConfig  # noqa: E402
from megatron_ovr.distributed import init_distributed, shutdown_distributed  # noqa: E402
from megatron_ovr.mapping.qwen2_5_vl import canonical_hf_name  # noqa: E402
from megatron_ovr.mapping.stream import export_hf_weights  # noqa: E402
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks  # noqa: E402
from megatron_ovr.rollout import EngineInfo, RolloutEngine, RolloutRequest, SamplingSettings, build_engine  # noqa: E402
from megatron_ovr.rollout.weight_sync import bucket_checksum, pack_buckets, sync_weights  # noqa: E402
from train_throughput import device_name, model_config, synchronize, versions, write_result  # noqa: E402

GOAL_SECONDS = 0.3  # issue 7: the whole 7B actor into the engine on one GPU
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ENGINE_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
COPY_PROBE_BYTES = 2**30


class CopyEngine(RolloutEngine):
    """A rollout engine reduced to its weights: one preallocated device tensor per HF name; an update copies
    each received tensor into its own. It cannot generate."""

    def __init__(self, shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device):
        self.weights = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes.items()}
        self.info = EngineInfo("copy", {"tensors": len(self.weights),
                                        "bytes": sum(w.nbytes for w in self.weights.values())})

    @classmethod
    def for_config(cls, cfg: Qwen25VLConfig, dtype: torch.dtype, device: torch.device) -> "CopyEngine":
        """Shapes from transformers' own Qwen2.5-VL of this config (built on the meta device: no memory)."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_config()))
        return cls({canonical_hf_name(k): v.shape for k, v in model.state_dict().items()}, dtype, device)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            target = self.weights[name]
            if target.shape != tensor.shape:  # copy_ would broadcast a wrong shape silently
                raise ValueError(f"{name}: received shape {tuple(tensor.shape)}, the engine holds {tuple(target.shape)}")
            target.copy_(tensor)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSettings):
        raise NotImplementedError("CopyEngine only receives weights (a weight-sync benchmark stand-in)")

    def sleep(self) -> None:
        """Holds no memory beyond its weights: nothing to free."""

    def wake_up(self) -> None:
        """Nothing was freed by ``sleep``."""


def vllm_engine(cfg: Qwen25VLConfig, dtype: str, workdir: Path) -> RolloutEngine:
    """A vLLM engine with dummy weights, from a model directory holding config, tokenizer and processor files."""
    from megatron_ovr.data.tokenizer import qwen_tokenizer_dir
    from megatron_ovr.rollout.model_dir import write_engine_dir

    model_dir = write_engine_dir(workdir / "engine", cfg, qwen_tokenizer_dir(), min_pixels=56 * 56,
                                 max_pixels=448 * 448)
    return build_engine("vllm", model_dir=model_dir, max_model_len=1024, dtype=dtype, dummy_weights=True)


def timed(action: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``action`` after ``warmup`` untimed ones."""
    seconds = []
    for i in range(warmup + repeats):
        synchronize()
        start = time.perf_counter()
        action()
        synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def probe_rates(total_bytes: int, repeats: int) -> tuple[float, float]:
    """(copy, checksum) bytes per second on this device: a plain ``copy_`` (each byte read once and written
    once) and ``bucket_checksum`` (which sender and receiver each run over every byte), over one buffer of
    ``min(total_bytes, 1 GiB)`` random bytes."""
    size = min(total_bytes, COPY_PROBE_BYTES)
    source = torch.randint(0, 256, (size,), dtype=torch.uint8, device=platform.default_device())
    target = torch.empty_like(source)
    copy = statistics.median(timed(lambda: target.copy_(source), warmup=2, repeats=max(repeats, 5)))
    checksum = statistics.median(timed(lambda: bucket_checksum(source), warmup=1, repeats=repeats))
    return size / copy, size / checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", help="model widths (megatron_ovr.config.PRESETS), e.g. 7b or tiny")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (the preset's count if 0)")
    parser.add_argument("--vit-depth", type=int, default=0, help="ViT blocks (the preset's full depth if 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--engine", choices=("copy", "vllm"), default="copy")
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[512], help="bucket sizes to time (MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs per bucket size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed syncs per bucket size first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result file, or a directory for weight_sync_<device>_<shape>_<date>.json "
                             "(default: benchmarks/results/)")
    args = parser.parse_args()

    init_distributed(ParallelConfig(), seed=args.seed)
    print(platform.describe_backends(), flush=True)
    cfg = model_config(args.preset, args.layers, args.vit_depth)
    dtype = DTYPES[args.dtype]
    actor = build_model_chunks(cfg, ParallelConfig(), dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="weight-sync-") as workdir:
        if args.engine == "vllm":
            engine = vllm_engine(cfg, ENGINE_DTYPES[args.dtype], Path(workdir))
        else:
            engine = CopyEngine.for_config(cfg, dtype, platform.default_device())
        rows = []
        for bucket_mb in args.bucket_mb:
            bucket_bytes = bucket_mb * 2**20
            reports = []
            seconds = timed(lambda: reports.append(sync_weights(actor, cfg, engine, bucket_bytes=bucket_bytes)),
                            args.warmup, args.repeats)
            sender = timed(lambda: sum(1 for _ in pack_buckets(export_hf_weights(actor, cfg), bucket_bytes)),
                           args.warmup, args.repeats)
            report = reports[-1]
            rows.append({"bucket_mb": bucket_mb, "seconds": statistics.median(seconds), "seconds_best": min(seconds),
                         "seconds_all": seconds, "sender_seconds": statistics.median(sender),
                         "buckets": report.buckets, "tensors": report.tensors, "bytes": report.bytes})
        if isinstance(engine, CopyEngine):
            # The engine ends up holding the actor's weights (the receiver already checked every checksum).
            output_layer = actor[0].language_model.output_layer.weight
            if not torch.equal(engine.weights["lm_head.weight"], output_layer.detach()):
                raise AssertionError("the copy engine's lm_head.weight differs from the actor's output layer")
        engine_info = {"name": engine.info.name, **engine.info.details}
        engine.close()
    total_bytes = rows[0]["bytes"]
    bandwidth, checksum_rate = probe_rates(total_bytes, args.repeats)
    bound = total_bytes / bandwidth
    shutdown_distributed()

    whole_7b = args.preset == "7b" and args.dtype == "bf16" and cfg.text.num_layers == 28 and cfg.vision.depth == 32
    print(f"actor: Qwen2.5-VL {args.preset} widths, {cfg.text.num_layers} LM layers, ViT depth {cfg.vision.depth}, "
          f"{args.dtype}, {total_bytes / 2**30:.2f} GiB in {rows[0]['tensors']} HF tensors; engine: {args.engine}; "
          f"{device_name()}")
    print(f"device copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound {bound:.4f} s for these bytes"
          + (f"; goal <= {GOAL_SECONDS} s" if whole_7b else ""))
    print(f"bucket checksum {checksum_rate / 1e9:.1f} GB/s: {2 * total_bytes / checksum_rate:.4f} s of each sync "
          "(sender and receiver each checksum every byte)")
    print(f"{'bucket MiB':>10}{'buckets':>9}{'sync s':>10}{'best s':>10}{'sender s':>10}{'x bound':>9}")
    for row in rows:
        row["x_bound"] = row["seconds"] / bound
        print(f"{row['bucket_mb']:>10}{row['buckets']:>9}{row['seconds']:>10.4f}{row['seconds_best']:>10.4f}"
              f"{row['sender_seconds']:>10.4f}{row['x_bound']:>9.1f}")
    result = {
        "benchmark": "weight_sync",
        "date": datetime.date.today().isoformat(),
        "host": host.node(),
        "device": device_name(),
        "versions": versions(),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "lm_layers": cfg.text.num_layers, "vit_depth": cfg.vision.depth},
        "engine": engine_info,
        "bytes": total_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bound_seconds": bound,
        "checksum_bytes_per_s": checksum_rate,
        "checksum_seconds_per_sync": 2 * total_bytes / checksum_rate,
        "rows": rows,
        "goal_seconds": GOAL_SECONDS if whole_7b else None,
        "goal_met": min(r["seconds"] for r in rows) <= GOAL_SECONDS if whole_7b else None,
    }
    write_result(args.out, "weight_sync", f"{args.preset}_{cfg.text.num_layers}l_{args.dtype}_{args.engine}", result)


if __name__ == "__main__":
    main()
