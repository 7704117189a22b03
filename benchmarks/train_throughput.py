"""Training throughput of megatron-ovr against the HF ``transformers`` baseline (issue 7).

One process, one device, tensor parallel 1. Both systems train the same Qwen2.5-VL configuration (the
preset's widths; ``--layers`` decoder layers and ``--vit-depth`` ViT blocks so it fits one GPU) from the SAME
weights on the SAME batches in the same dtype, with the same loss tokens:
  megatron-ovr     ``ModelTrainer.train_step`` itself (megatron's schedule, DDP with fp32 gradient buffers,
                   megatron's mixed-precision distributed optimizer, gradient clipping) over model chunks
                   built with the best layer spec here (Transformer Engine if present, else torch-native SDPA)
  megatron-ovr fp8 the same with the decoder's GEMMs in FP8 (``--fp8``; Transformer Engine only)
  hf-transformers  ``Qwen2_5_VLForConditionalGeneration`` (attn_implementation="sdpa") and a plain loop:
                   forward with labels, backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` (fused on CUDA),
                   parameters and optimizer state in the model dtype (how HF models are usually trained)
Workloads: ``text`` rows (one unpadded sample of ``--seq`` tokens each) and ``image`` rows (``--images``
images of ``--image-size`` pixels, then text up to ``--seq``). The loss covers every next-token target that
is a text token. Each step is ``--microbatches`` micro-batches of ``--micro-batch`` rows; ``--warmup`` steps
are excluded, then ``--steps`` steps are timed one by one (``torch.cuda.synchronize`` around each).

Reported per system and workload: median step time, tokens/s (every position of every row), MFU and peak
memory (``torch.cuda.max_memory_allocated`` over the workload, model and optimizer state included; on CPU
the process's peak RSS so far),
and the ratios megatron-ovr / HF and FP8 / BF16. MFU = model FLOPs per step / step time / the device's dense
BF16 peak (``training.flops.PEAK_BF16_TFLOPS``; FP8 runs are measured against the same BF16 peak), with the
FLOPs counted explicitly by ``training.flops.qwen2_5_vl_training_flops``: for the LM ``3 x`` (the matmuls of
every layer, ``2 x`` weights per token, plus attention ``4 s h`` per token and layer over the full square) and
the LM head, for every token; for the ViT the same count per patch with attention over each window or frame,
plus patch embedding and merger. Losses are printed side by side: in fp32 the first ones agree closely (same
weights, same tokens), a sanity check that both train the same model.

    python benchmarks/train_throughput.py                        # 7B widths, 4 LM layers, full ViT, 8k, bf16
    python benchmarks/train_throughput.py --preset tiny --seq 128 --image-size 112 --steps 2 --warmup 1 \\
        --dtype fp32 --out /tmp/smoke.json                       # the CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform as host
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_ovr import platform  # noqa: E402
from megatron_ovr.config import ParallelConfig, Qwen25VLConfig, get_preset  # noqa: E402
from megatron_ovr.config.sft import OptimizerSection  # noqa: E402
from megatron_ovr.distributed import init_distributed, shutdown_distributed  # noqa: E402
from megatron_ovr.mapping import load_hf_weights  # noqa: E402
from megatron_ovr.models.qwen2_5_vl import reference  # noqa: E402
from megatron_ovr.models.qwen2_5_vl.model import build_model_chunks  # noqa: E402
from megatron_ovr.models.qwen2_5_vl.specs import resolve_backend  # noqa: E402
from megatron_ovr.training.core import ModelTrainer, wrap_ddp  # noqa: E402
from megatron_ovr.training.flops import peak_flops, qwen2_5_vl_training_flops  # noqa: E402
from megatron_ovr.training.losses import masked_token_loss  # noqa: E402
from megatron_ovr.training.optimizer import build_optimizer  # noqa: E402

GOALS = {"tokens_per_s_x_hf": 1.6, "mfu": 0.5, "fp8_x_bf16": 1.3}
"""Issue 7, on an H100 in BF16: megatron-ovr >= 1.6x HF's tokens/s, MFU >= 50%; FP8 >= 1.3x BF16 (TE)."""
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FP8_RECIPE = "hybrid"  # E4M3 forward, E5M2 gradients: megatron's usual FP8 training format
IGNORE_INDEX = -100  # HF's label for "no loss here"


def model_config(preset: str, layers: int, vit_depth: int) -> Qwen25VLConfig:
    """The preset's widths with ``layers`` decoder layers and ``vit_depth`` ViT blocks (0: the preset's). A
    reduced ViT keeps the full-attention blocks that fall inside it, or makes its last block one, so it still
    mixes full and window attention."""
    cfg = get_preset(preset)
    text = dataclasses.replace(cfg.text, num_layers=layers or cfg.text.num_layers)
    depth = vit_depth or cfg.vision.depth
    full = tuple(i for i in cfg.vision.fullatt_block_indexes if i < depth) or (depth - 1,)
    vision = dataclasses.replace(cfg.vision, depth=depth, fullatt_block_indexes=full)
    return dataclasses.replace(cfg, text=text, vision=vision)


# ---- workloads --------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    microbatches: list[reference.SampleBatch]
    """One optimizer step's micro-batches (on the CPU; every step trains on the same ones)."""
    image_grids: list[tuple[int, int, int]]
    """Every image of one step, ``(t, h, w)`` in patches (for the FLOP count)."""

    @property
    def tokens_per_step(self) -> int:
        return sum(b.input_ids.numel() for b in self.microbatches)


def build_workload(
    cfg: Qwen25VLConfig, name: str, *, seq: int, micro_batch: int, microbatches: int, images: int,
    image_size: int, seed: int,
) -> Workload:
    """``text``: rows of ``seq`` random text tokens; ``image``: rows of ``images`` images, then text."""
    rows = micro_batch * microbatches
    if name == "text":
        row: list = [seq]
    else:
        if images < 1:
            raise ValueError(f"--images {images}: the image workload needs at least one (or run --batches text)")
        unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
        if image_size % unit:
            raise ValueError(f"--image-size {image_size} must be a multiple of {unit} pixels (patch x merge)")
        side = image_size // cfg.vision.patch_size
        grid = (1, side, side)
        image_tokens = images * (side * side // cfg.vision.merge_unit + 2)  # + vision_start/end
        if image_tokens >= seq:
            raise ValueError(f"{images} image(s) of {image_size}px take {image_tokens} tokens: --seq {seq} leaves no text")
        row = [grid] * images + [seq - image_tokens]
    batch = reference.sample_batch(cfg, [row] * rows, seed=seed)
    steps = [batch.select_rows(i * micro_batch, (i + 1) * micro_batch, cfg) for i in range(microbatches)]
    grids = [] if batch.image_grid_thw is None else [tuple(g) for g in batch.image_grid_thw.tolist()]
    return Workload(name, steps, grids)


def loss_targets(batch: reference.SampleBatch, cfg: Qwen25VLConfig) -> torch.Tensor:
    """[b, s] bool: token j is a loss target (a real text token; the model predicts it from position j-1)."""
    visual = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id])
    target = ~torch.isin(batch.input_ids, visual) & batch.attention_mask.bool()
    target[:, 0] = False  # nothing predicts the first token
    return target


def megatron_microbatch(batch: reference.SampleBatch, cfg: Qwen25VLConfig, dtype: torch.dtype) -> dict:
    """The model's forward contract plus ``loss_mask``: ``labels[i]`` is token ``i + 1``."""
    device = platform.default_device()
    target = loss_targets(batch, cfg)
    labels = torch.full_like(batch.input_ids, cfg.bos_token_id)
    labels[:, :-1] = batch.input_ids[:, 1:]
    loss_mask = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    loss_mask[:, :-1] = target[:, 1:].float()
    microbatch = {
        "tokens": batch.input_ids, "position_ids": batch.position_ids, "segment_ids": batch.segment_ids,
        "labels": labels, "loss_mask": loss_mask,
    }
    microbatch = {key: value.to(device) for key, value in microbatch.items()}
    if batch.pixel_values is not None:
        microbatch["pixel_values"] = batch.pixel_values.to(device, dtype)
        microbatch["image_grid_thw"] = batch.image_grid_thw  # the window layout is computed on the host
    return microbatch


def hf_microbatch(batch: reference.SampleBatch, cfg: Qwen25VLConfig, dtype: torch.dtype) -> tuple[dict, int]:
    """HF's forward keywords (explicit 3D positions; labels with HF's internal shift) and the loss-token count."""
    device = platform.default_device()
    target = loss_targets(batch, cfg)
    labels = torch.where(target, batch.input_ids, torch.full_like(batch.input_ids, IGNORE_INDEX))
    inputs = {
        "input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
        "position_ids": batch.position_ids.to(device), "labels": labels.to(device), "use_cache": False,
    }
    if batch.pixel_values is not None:
        inputs["pixel_values"] = batch.pixel_values.to(device, dtype)
        inputs["image_grid_thw"] = batch.image_grid_thw.to(device)
    return inputs, int(target.sum())


# ---- the two systems --------------------------------------------------------------------------------


def optimizer_section(learning_rate: float) -> OptimizerSection:
    """Both systems' update rule: megatron-ovr's defaults (AdamW, betas (0.9, 0.95), eps 1e-8, no weight decay,
    gradients clipped to norm 1.0) at a constant learning rate."""
    return OptimizerSection(lr=learning_rate, warmup_steps=0, decay_style="constant")


class PrebuiltModelTrainer(ModelTrainer):
    """``ModelTrainer`` over model chunks built by the caller, so that the layer backend and FP8 can be chosen
    (``ModelSection`` exposes neither) and the weights come from the HF model. ``train_step`` is the production
    one, unchanged, except that with ``causal_only`` the segment ids are not handed to the model: every row
    here is one unpadded sample, so causal masking alone is exact and SDPA can take its flash kernel (the
    segment-id mask that packed rows need makes it fall back to a masked kernel)."""

    def __init__(self, chunks: list[torch.nn.Module], model_cfg: Qwen25VLConfig, dtype: torch.dtype,
                 total_steps: int, optimizer: OptimizerSection, *, causal_only: bool):
        self.head = "lm"
        self.dtype = dtype
        self.model_cfg = model_cfg
        self.chunks = chunks
        self.causal_only = causal_only
        for chunk in chunks:
            chunk.config.calculate_per_token_loss = True  # as build_model does: the loss is a per-token mean
        self.model = wrap_ddp(chunks, optimizer.distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.model, optimizer, total_steps, dtype)

    def _run_model(self, module, batch: dict, head_mask):
        if self.causal_only:
            batch = {**batch, "segment_ids": None}
        return super()._run_model(module, batch, head_mask)


@dataclass
class RunResult:
    system: str
    workload: str
    step_times_s: list[float]
    losses: list[float]
    """Every step's loss, warm-up steps included (the first is the untrained model's)."""
    tokens_per_step: int
    flops_per_step: float
    peak_memory_bytes: int
    memory_before_bytes: int
    """Device memory allocated when the system's run began (0 on CPU): what an earlier run left behind, which
    the peak includes."""

    @property
    def step_time_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    def mfu(self, peak: Optional[float]) -> Optional[float]:
        return None if peak is None else self.flops_per_step / self.step_time_s / peak


def synchronize() -> None:
    """Waits for the device (a no-op on CPU), so host clocks time the device's work."""
    if platform.HAVE_CUDA:
        torch.cuda.synchronize()


def _start_memory_window() -> int:
    """Frees what earlier runs left and restarts the peak; returns the device memory still allocated."""
    gc.collect()
    if not platform.HAVE_CUDA:
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def timed_steps(step: Callable[[], float | torch.Tensor], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Runs ``warmup + steps`` steps; returns the timed steps' seconds and every step's loss (read after the
    clock stops, so a loss still on the device costs the step no host sync)."""
    times, losses = [], []
    for i in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        loss = step()
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return times, losses


def run_megatron(system: str, cfg: Qwen25VLConfig, hf_weights: dict[str, torch.Tensor], workloads: list[Workload],
                 args: argparse.Namespace, fp8: Optional[str]) -> list[RunResult]:
    dtype = DTYPES[args.dtype]
    resident = _start_memory_window()
    chunks = build_model_chunks(cfg, ParallelConfig(), dtype=dtype, fp8=fp8, recompute=args.recompute)
    load_hf_weights(chunks, cfg, hf_weights.__getitem__)
    total_steps = len(workloads) * (args.warmup + args.steps)
    trainer = PrebuiltModelTrainer(chunks, cfg, dtype, total_steps, optimizer_section(args.lr),
                                   causal_only=args.lm_mask == "causal")
    results = []
    for workload in workloads:
        microbatches = [megatron_microbatch(b, cfg, dtype) for b in workload.microbatches]
        if platform.HAVE_CUDA:
            torch.cuda.reset_peak_memory_stats()

        def step() -> float:
            result = trainer.train_step(microbatches, masked_token_loss, loss_keys=("loss_mask",))
            if not result.finite:
                raise FloatingPointError(f"{system}: non-finite loss or gradient on the {workload.name} workload")
            return result.loss

        times, losses = timed_steps(step, args.warmup, args.steps)
        results.append(RunResult(system, workload.name, times, losses, workload.tokens_per_step,
                                 workload_flops(cfg, workload), platform.peak_memory_bytes(), resident))
    return results


def build_hf_model(cfg: Qwen25VLConfig, dtype: torch.dtype, seed: int):
    """HF's model with its own random initialisation, built on the device in the run dtype, training mode."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(platform.default_device()):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            Qwen2_5_VLConfig(**cfg.to_hf_config()), attn_implementation="sdpa", dtype=dtype)
    return model.train()


def run_hf(model, cfg: Qwen25VLConfig, workloads: list[Workload], args: argparse.Namespace) -> list[RunResult]:
    dtype = DTYPES[args.dtype]
    resident = _start_memory_window()
    model.to(platform.default_device())
    section = optimizer_section(args.lr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, betas=(section.adam_beta1, section.adam_beta2),
                                  eps=section.adam_eps, weight_decay=section.weight_decay, fused=platform.HAVE_CUDA)
    results = []
    for workload in workloads:
        microbatches = [hf_microbatch(b, cfg, dtype) for b in workload.microbatches]
        loss_tokens = sum(count for _, count in microbatches)
        if platform.HAVE_CUDA:
            torch.cuda.reset_peak_memory_stats()

        def step() -> torch.Tensor:
            total = torch.zeros((), device=platform.default_device())
            for inputs, count in microbatches:
                # HF's loss is the micro-batch's mean: weight it so the step's loss is the mean over all tokens.
                loss = model(**inputs).loss * (count / loss_tokens)
                loss.backward()
                total += loss.detach().float()
            torch.nn.utils.clip_grad_norm_(model.parameters(), section.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total

        times, losses = timed_steps(step, args.warmup, args.steps)
        results.append(RunResult("hf-transformers", workload.name, times, losses, workload.tokens_per_step,
                                 workload_flops(cfg, workload), platform.peak_memory_bytes(), resident))
    return results


def workload_flops(cfg: Qwen25VLConfig, workload: Workload) -> float:
    rows = sum(b.input_ids.shape[0] for b in workload.microbatches)
    return qwen2_5_vl_training_flops(cfg, rows, workload.microbatches[0].input_ids.shape[1], workload.image_grids)


# ---- report -----------------------------------------------------------------------------------------


def device_name() -> str:
    return torch.cuda.get_device_name() if platform.HAVE_CUDA else "cpu"


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "megatron-core", "transformer-engine"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def ratios(results: list[RunResult]) -> dict[str, dict[str, float]]:
    by_key = {(r.system, r.workload): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for (system, workload), run in by_key.items():
        if system == "megatron-ovr" and ("hf-transformers", workload) in by_key:
            out.setdefault(workload, {})["tokens_per_s_x_hf"] = run.tokens_per_s / by_key["hf-transformers", workload].tokens_per_s
        if system == "megatron-ovr fp8" and ("megatron-ovr", workload) in by_key:
            out.setdefault(workload, {})["fp8_x_bf16"] = run.tokens_per_s / by_key["megatron-ovr", workload].tokens_per_s
    return out


def print_table(results: list[RunResult], peak: Optional[float], result_ratios: dict) -> None:
    print(f"{'workload':<9}{'system':<19}{'step s':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}   losses (first ... last)")
    for r in results:
        mfu = r.mfu(peak)
        mfu_text = f"{mfu:>7.1%}" if mfu is not None else f"{'-':>7}"
        print(f"{r.workload:<9}{r.system:<19}{r.step_time_s:>9.3f}{r.tokens_per_s:>11.0f}{mfu_text}"
              f"{r.peak_memory_bytes / 2**30:>10.2f}   {r.losses[0]:.6f} ... {r.losses[-1]:.6f}")
    for workload, values in result_ratios.items():
        parts = [f"{name} {value:.2f}x (goal >= {GOALS[name]})" for name, value in values.items()]
        print(f"{workload}: " + "; ".join(parts))


def write_result(out: Optional[Path], benchmark: str, shape: str, result: dict) -> Path:
    """Writes ``result`` as JSON to ``out`` when it names a file, else to ``<benchmark>_<device>_<shape>_<date>.json``
    in the directory ``out`` (default ``benchmarks/results``); says where."""
    device = device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    name = f"{benchmark}_{device}_{shape}_{datetime.date.today()}.json"
    if out is None:
        out = REPO / "benchmarks" / "results" / name
    elif out.is_dir():
        out = out / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", help="model widths (megatron_ovr.config.PRESETS), e.g. 7b or tiny")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the preset's count if 0)")
    parser.add_argument("--vit-depth", type=int, default=0, help="ViT blocks (the preset's full depth if 0)")
    parser.add_argument("--seq", type=int, default=8192, help="tokens per row")
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--batches", nargs="+", choices=("image", "text"), default=["image", "text"],
                        help="workloads to run")
    parser.add_argument("--images", type=int, default=1, help="images per row of the image workload")
    parser.add_argument("--image-size", type=int, default=896, help="image side in pixels (a multiple of 28)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per workload")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--lr", type=float, default=1e-5, help="constant learning rate of both optimizers")
    parser.add_argument("--fp8", action="store_true", help="also run megatron-ovr with FP8 GEMMs (Transformer Engine only)")
    parser.add_argument("--recompute", action="store_true", help="megatron-ovr: full recomputation of decoder layers")
    parser.add_argument("--lm-mask", choices=("causal", "segments"), default="causal",
                        help="megatron-ovr's decoder mask: causal only (exact for these unpacked rows: flash SDPA) "
                             "or the segment-id mask packed SFT rows need")
    parser.add_argument("--skip-hf", action="store_true", help="measure megatron-ovr only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result file, or a directory for train_throughput_<device>_<shape>_<date>.json "
                             "(default: benchmarks/results/)")
    return parser.parse_args()


def fp8_status(requested: bool) -> str:
    """"measured", "not requested", or why FP8 is skipped."""
    if not requested:
        return "not requested"
    if platform.use_transformer_engine():
        return "measured"
    return ("skipped: FP8 needs the Transformer Engine layer spec, and Transformer Engine is "
            + ("not installed" if not platform.HAVE_TE else "disabled (MEGATRON_OVR_DISABLE_TE=1)"))


def run_systems(cfg: Qwen25VLConfig, workloads: list[Workload], args: argparse.Namespace,
                with_fp8: bool) -> tuple[list[RunResult], dict[str, str]]:
    """Every system on every workload; returns the results and, per system that did not fit, its error."""
    dtype = DTYPES[args.dtype]
    # Both systems start from HF's own initialisation. The HF model waits on the host while megatron-ovr runs,
    # so that each system's peak memory is its own.
    hf_model = build_hf_model(cfg, dtype, args.seed).to("cpu")
    hf_weights = reference.hf_state_dict(hf_model)
    systems: dict[str, Callable[[], list[RunResult]]] = {
        "megatron-ovr": lambda: run_megatron("megatron-ovr", cfg, hf_weights, workloads, args, fp8=None)}
    if with_fp8:
        systems["megatron-ovr fp8"] = lambda: run_megatron("megatron-ovr fp8", cfg, hf_weights, workloads, args,
                                                           fp8=FP8_RECIPE)
    if not args.skip_hf:
        systems["hf-transformers"] = lambda: run_hf(hf_model, cfg, workloads, args)
    results: list[RunResult] = []
    out_of_memory: dict[str, str] = {}
    for system, run in systems.items():
        # A GPU session is scarce: a system that does not fit is recorded and the others still run.
        try:
            results += run()
        except torch.OutOfMemoryError as error:
            out_of_memory[system] = str(error).splitlines()[0]
            print(f"{system}: out of memory ({out_of_memory[system]})", flush=True)
    return results, out_of_memory


def main() -> None:
    args = parse_args()
    init_distributed(ParallelConfig(), seed=args.seed)
    print(platform.describe_backends(), flush=True)
    cfg = model_config(args.preset, args.layers, args.vit_depth)
    # Images first: text rows leave the ViT without gradients, which megatron's optimizer treats as zeros
    # (Adam's momentum still moves the ViT) and torch's AdamW skips. The text loss never sees the ViT, so with
    # this order both systems' losses stay comparable throughout; the reverse order would make the image
    # losses drift apart for that reason alone.
    names = sorted(set(args.batches), key=("image", "text").index)
    workloads = [build_workload(cfg, name, seq=args.seq, micro_batch=args.micro_batch, microbatches=args.microbatches,
                                images=args.images, image_size=args.image_size, seed=args.seed + i)
                 for i, name in enumerate(names)]
    fp8 = fp8_status(args.fp8)
    if args.fp8:
        print(f"FP8: {fp8}", flush=True)
    results, out_of_memory = run_systems(cfg, workloads, args, with_fp8=fp8 == "measured")
    shutdown_distributed()

    peak = peak_flops(device_name()) if platform.HAVE_CUDA else None
    result_ratios = ratios(results)
    print(f"Qwen2.5-VL {args.preset} widths, {cfg.text.num_layers} LM layers, ViT depth {cfg.vision.depth}, "
          f"seq {args.seq}, {args.microbatches} x {args.micro_batch} rows per step, {args.dtype}, "
          f"megatron-ovr spec {resolve_backend()}, LM mask {args.lm_mask}; {device_name()}")
    print_table(results, peak, result_ratios)
    report = {
        "benchmark": "train_throughput",
        "date": datetime.date.today().isoformat(),
        "host": host.node(),
        "device": device_name(),
        "versions": versions(),
        "backends": platform.describe_backends(),
        "megatron_layer_spec": resolve_backend(),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "lm_layers": cfg.text.num_layers, "vit_depth": cfg.vision.depth,
                   "vit_fullatt_block_indexes": list(cfg.vision.fullatt_block_indexes),
                   "fp8_recipe": FP8_RECIPE if fp8 == "measured" else None},
        "workloads": {w.name: {"tokens_per_step": w.tokens_per_step, "rows_per_step": len(w.microbatches) * args.micro_batch,
                               "image_grids_per_step": [list(g) for g in w.image_grids]} for w in workloads},
        "flops": "training.flops.qwen2_5_vl_training_flops (see its module docstring): 3 x forward matmuls of LM "
                 "and ViT, attention over the full square (LM) or each window/frame (ViT)",
        "peak_flops": peak,
        "fp8": fp8,
        "runs": [{**dataclasses.asdict(r), "step_time_s": r.step_time_s, "tokens_per_s": r.tokens_per_s,
                  "mfu": r.mfu(peak)} for r in results],
        "ratios": result_ratios,
        "out_of_memory": out_of_memory,
        "goals": GOALS,
    }
    variant = "".join(f"_{flag}" for flag, on in (("segments", args.lm_mask == "segments"),
                                                   ("recompute", args.recompute)) if on)
    write_result(args.out, "train_throughput",
                 f"{args.preset}_{cfg.text.num_layers}l_seq{args.seq}_{args.dtype}{variant}", report)


if __name__ == "__main__":
    main()
