r"""Post-training quantisation of an HF Qwen2.5-VL directory with NVIDIA Model Optimizer, exported as an HF
directory that vLLM loads directly.

Contract
--------
:func:`quantize_hf_dir` (``hf_dir`` -> ``out``) and :func:`quantize_megatron_dir` (a megatron checkpoint,
converted to a temporary HF directory by the model-free converter first: the one mapping table, no second
name table):

1. validates the options before anything heavy happens (an unknown format or vision mode is a
   ``ValueError`` listing the valid names), reads the calibration samples (an empty set is a ``ValueError``);
2. loads the HF model with transformers (``device``: cuda when available, else cpu; calibration dtype
   bfloat16 on GPU, float32 on CPU), runs the check samples through it (reference logits);
3. quantises with ``mtq.quantize(model, FORMATS[format].modelopt_config, forward_loop)``: fake-quantisation
   with static scales calibrated on the samples (FP8: max calibration of per-tensor weight and activation
   scales; INT4-AWQ: AWQ-lite scale search, group size 128, weight-only), with a progress bar per pass.
   The vision tower (``*visual*``, merger included) is left unquantised by modelopt's own defaults;
   ``vision="quantize"`` removes that exclusion (INT4 layers whose input width is not a multiple of the
   group size stay unquantised, and are named);
4. makes the fake-quantised model equal to what is exported and served (see *What is exported*), then
   measures its logits against the reference on the check samples (:mod:`.report`);
5. exports with ``export_hf_checkpoint`` (unquantised tensors in ``export_dtype``, default bfloat16: vLLM's
   FP8/AWQ kernels take bf16/fp16 activations) into a temporary directory next to ``out``, copies the
   tokenizer and processor files, rewrites INT4 into the AutoAWQ layout (``int4_layout="awq"``, the default;
   see :mod:`.layouts`), writes ``quant_report.json``, and renames it to ``out``. ``out`` appears only complete.

What is exported (and why the fake-quant model is adjusted first)
-----------------------------------------------------------------
- FP8: modelopt leaves fused groups (``q/k/v_proj``, ``gate/up_proj``: vLLM's ``qkv_proj`` and
  ``gate_up_proj``) with one weight scale each; vLLM then re-quantises them to the group's largest scale at
  load time with a kernel that the CPU build lacks (``_C::static_scaled_fp8_quant() expected at most 0
  argument(s)``). The quantiser gives each group its largest scale before measuring and exporting, which is
  what vLLM would serve anyway; the checkpoint then loads on CPU too and the fake-quant model is the served one.
- INT4-AWQ: modelopt's export averages the AWQ scales of layers sharing an input and folds them into the
  preceding norm (``requantize_resmooth_fused_llm_layers``); that pass runs before the measurement. For the
  AutoAWQ layout, an AWQ scale that cannot be folded exactly into the producing layer (``o_proj`` under
  grouped-query attention, the vision merger) is removed (the layer is max-calibrated without AWQ scaling,
  as AutoAWQ itself does for Qwen2 ``o_proj``).
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megatron_ovr.checkpoint.hf import apply_umask

from . import backend
from .calibration import InputBuilder, ModelInputs, load_calibration_samples, synthetic_calibration_files
from .layouts import cast_unquantized, directory_bytes, modelopt_int4_to_awq
from .report import logit_deltas
from .verify import dequantized_model

__all__ = ["FORMATS", "INT4_LAYOUTS", "VISION_MODES", "QuantFormat", "QuantizeOptions", "QuantizeResult",
           "quantize_hf_dir", "quantize_megatron_dir", "quant_config"]

AUXILIARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                   "video_preprocessor_config.json", "generation_config.json")
VISION_PATTERNS = ("*visual*",)
"""modelopt's default configs disable every quantizer under these names (the vision tower and its merger)."""
VISION_UNQUANTIZED = ("*patch_embed*",)
"""Vision modules that stay unquantised even with ``vision="quantize"``."""
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linears that vLLM runs as one fused layer (``qkv_proj``, ``gate_up_proj``) with one FP8 scale."""


@dataclass(frozen=True)
class QuantFormat:
    name: str
    modelopt_config: str
    """Name of the ``modelopt.torch.quantization`` config."""
    description: str
    rel_rms_tolerance: float
    """Relative RMS logit error (``||q - ref|| / ||ref||``) the tiny random test model must stay under,
    measured on CPU (see README "Quantised export"); a trained model is expected well below it."""


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat("fp8", "FP8_DEFAULT_CFG",
                       "FP8 (E4M3) weights and activations, static per-tensor scales (vLLM: modelopt FP8)",
                       rel_rms_tolerance=0.10),
    "int4_awq": QuantFormat("int4_awq", "INT4_AWQ_CFG",
                            "INT4 weights, group size 128, AWQ-lite scales; bf16 activations (vLLM: awq)",
                            rel_rms_tolerance=0.50),
}
VISION_MODES = ("keep", "quantize")
INT4_LAYOUTS = ("awq", "modelopt")
EXPORT_TOLERANCE = 5e-3
"""Relative RMS logit difference allowed between the dequantised export and the fake-quant model. Measured on
the tiny model: ~3e-7 for FP8 and ~3e-4 for INT4 (fp16 AWQ scales); an FP8 activation that lands on a
rounding boundary can round the other way (the stored scale is amax/448, rounded) and moves the logits by
~1e-3. A single layer's weight scale off by 10% gives ~1.5e-2, a mis-packed layer ~1."""
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(kw_only=True)
class QuantizeOptions:
    format: str
    """One of :data:`FORMATS`."""
    vision: str = "keep"
    """``keep``: the vision tower and merger stay in ``export_dtype``; ``quantize``: quantise them too."""
    num_samples: int = 256
    """Calibration samples (an evenly spread subset when the files hold more)."""
    max_tokens: int = 1024
    """Longer samples are cut (a cut through an image drops the sample)."""
    check_samples: int = 4
    """Samples held out of calibration to measure the logit error (all samples are used when there are fewer)."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda[:N]``."""
    calib_dtype: str = "auto"
    """The model's dtype during calibration: ``auto`` is bfloat16 on GPU and float32 on CPU."""
    export_dtype: str = "bfloat16"
    """dtype of the unquantised tensors (embeddings, norms, vision tower); vLLM's kernels need bf16/fp16."""
    verify_export: bool = True
    """Load the exported directory back (dequantised) and compare its logits with the fake-quant model's."""
    int4_layout: str = "awq"
    """INT4 only: ``awq`` (AutoAWQ GEMM layout, which vLLM loads) or ``modelopt`` (modelopt's W4A16_AWQ as
    exported, for TensorRT-LLM; vLLM 0.32 refuses it)."""
    progress: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, value, what: str) -> None:
            if not ok:
                raise ValueError(f"{name}={value!r}: {what}")

        need(self.format in FORMATS, "format", self.format, f"choose one of {sorted(FORMATS)}")
        need(self.vision in VISION_MODES, "vision", self.vision, f"choose one of {list(VISION_MODES)}")
        need(self.int4_layout in INT4_LAYOUTS, "int4_layout", self.int4_layout, f"choose one of {list(INT4_LAYOUTS)}")
        need(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        need(self.max_tokens >= 8, "max_tokens", self.max_tokens, "must be >= 8")
        need(self.check_samples >= 0, "check_samples", self.check_samples, "must be >= 0")
        need(self.calib_dtype == "auto" or self.calib_dtype in _DTYPES, "calib_dtype", self.calib_dtype,
             f"choose auto or one of {sorted(_DTYPES)}")
        need(self.export_dtype in _DTYPES, "export_dtype", self.export_dtype, f"choose one of {sorted(_DTYPES)}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device", self.device,
             "choose auto, cpu or cuda[:N]")


@dataclass
class QuantizeResult:
    out: Path
    report: dict = field(default_factory=dict)


def quant_config(mtq, options: QuantizeOptions, model: Optional[torch.nn.Module] = None) -> dict:
    """modelopt's config for the format, with the vision tower kept or quantised. With a model, INT4 linears
    whose input width is not a multiple of the group size are disabled by name (modelopt cannot pack them)."""
    cfg = copy.deepcopy(getattr(mtq, FORMATS[options.format].modelopt_config))
    entries = cfg["quant_cfg"]
    if options.vision == "quantize":
        entries[:] = [e for e in entries if not (isinstance(e, dict) and e.get("quantizer_name") in VISION_PATTERNS
                                                 and e.get("enable") is False and "parent_class" not in e)]
        # The patch embedding is a Conv3d: modelopt fake-quantises it but exports it unquantised, and vLLM
        # runs it unquantised, so it stays unquantised here too.
        entries.extend({"quantizer_name": p, "enable": False} for p in VISION_UNQUANTIZED)
    if model is not None and options.format == "int4_awq":
        group = _int4_group_size(cfg)
        for name in _unpackable_linears(model, group, vision=options.vision == "quantize"):
            entries.append({"quantizer_name": f"{name}.*", "enable": False})
    return cfg


def _int4_group_size(cfg: dict) -> int:
    for entry in cfg["quant_cfg"]:
        if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            return int(entry["cfg"]["block_sizes"][-1])
    raise ValueError("INT4 config without a block size")


def _unpackable_linears(model: torch.nn.Module, group: int, *, vision: bool) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features % group:
            if "visual" in name and not vision:
                continue
            if "lm_head" in name:
                continue
            names.append(name)
    return names


# ---- model ---------------------------------------------------------------------------------------------------

def _device(options: QuantizeOptions) -> torch.device:
    if options.device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(options.device)


def _calib_dtype(options: QuantizeOptions, device: torch.device) -> torch.dtype:
    if options.calib_dtype != "auto":
        return _DTYPES[options.calib_dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_hf_model(hf_dir: str | Path, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype)
    return model.to(device).eval()


@torch.no_grad()
def _forward_logits(model, inputs: ModelInputs, dtype: torch.dtype, last: int) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(**inputs.to(device, dtype)).logits[0, -last:]
    return logits.float().cpu()


def _forward_loop(inputs: Sequence[ModelInputs], dtype: torch.dtype, desc: str, progress: bool) -> Callable:
    """modelopt calls this once (max calibration) or twice (AWQ-lite: statistics, then the scale search)."""
    from tqdm import tqdm

    passes = [0]

    @torch.no_grad()
    def loop(model) -> None:
        passes[0] += 1
        device = next(model.parameters()).device
        for x in tqdm(inputs, desc=f"{desc} (pass {passes[0]})", unit="sample", disable=not progress,
                      file=sys.stderr, mininterval=1.0):
            # The trunk only: the LM head is never quantised, and its 152k-wide logits would dominate the cost.
            model.model(**x.to(device, dtype))

    return loop


def quantized_linears(model) -> list[str]:
    """Names of the linears whose weight quantizer is on."""
    return [n[: -len(".weight_quantizer")] for n, m in model.named_modules()
            if n.endswith(".weight_quantizer") and getattr(m, "is_enabled", False)]


@torch.no_grad()
def round_unquantized(model, dtype: torch.dtype) -> int:
    """Rounds every floating-point parameter that is exported unquantised (embeddings, norms, biases, LM head,
    vision tower) to ``dtype`` in place, so the fake-quant model is the exported one. Quantised weights and
    quantizer state are left alone. Returns the number of tensors rounded."""
    quantised = {f"{n}.weight" for n in quantized_linears(model)}
    rounded = 0
    for name, param in model.named_parameters():
        if name in quantised or "_quantizer" in name or not param.is_floating_point():
            continue
        if param.dtype != dtype:
            param.data.copy_(param.data.to(dtype).to(param.dtype))
            rounded += 1
    return rounded


@torch.no_grad()
def unify_fused_fp8_scales(model) -> int:
    """Gives the linears of each fused group (:data:`FUSED_GROUPS`) their largest weight scale (see the module
    docstring). Returns the number of groups changed."""
    changed = 0
    for _, parent in model.named_modules():
        for group in FUSED_GROUPS:
            members = [getattr(parent, n, None) for n in group]
            if any(m is None or not hasattr(m, "weight_quantizer") for m in members):
                continue
            quantizers = [m.weight_quantizer for m in members]
            if not all(q.is_enabled and q.amax is not None and q.amax.numel() == 1 for q in quantizers):
                continue
            amax = torch.stack([q.amax.reshape(()) for q in quantizers]).max()
            for q in quantizers:
                q.amax = amax.clone().reshape(q.amax.shape)
            changed += 1
    return changed


def _foldable_pqs(name: str, num_heads: int, num_kv_heads: int) -> bool:
    """Whether an AWQ ``pre_quant_scale`` of linear ``name`` survives into the AutoAWQ layout: folded into a
    norm by modelopt's export, or into the producing linear by :func:`.layouts.modelopt_int4_to_awq`."""
    leaf = name.rsplit(".", 2)
    tail = ".".join(leaf[-2:])
    if tail in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                "attn.qkv", "mlp.down_proj", "attn.proj"):
        return True
    return tail == "self_attn.o_proj" and num_heads == num_kv_heads


@torch.no_grad()
def drop_unfoldable_awq_scales(model, modelopt, num_heads: int, num_kv_heads: int) -> list[str]:
    """Removes the AWQ scaling of INT4 linears whose ``pre_quant_scale`` the AutoAWQ layout cannot hold
    (restores the weight, then max-calibrates its quantizer). Returns their names."""
    dropped = []
    for name, module in model.named_modules():
        iq = getattr(module, "input_quantizer", None)
        if iq is None or getattr(iq, "pre_quant_scale", None) is None or _foldable_pqs(name, num_heads, num_kv_heads):
            continue
        pqs = iq.pre_quant_scale.float()
        wq = module.weight_quantizer
        if getattr(wq, "pre_quant_scale", None) is not None:
            delattr(wq, "_pre_quant_scale")         # kept on the weight quantizer: the weight itself is original
        else:
            module.weight.data.copy_((module.weight.float() * pqs[None, :]).to(module.weight.dtype))
        delattr(iq, "_pre_quant_scale")
        wq.reset_amax()
        modelopt.max_calibrate(module, lambda m: m.weight_quantizer(m.weight))
        dropped.append(name)
    return dropped


# ---- the pipeline ----------------------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quantize_hf_dir(hf_dir: str | Path, out: str | Path, calib_files: Sequence[str | Path] | None,
                    options: QuantizeOptions) -> QuantizeResult:
    """Quantises ``hf_dir`` into ``out`` (see the module docstring). ``calib_files`` None: the built-in
    synthetic prompts (with a warning)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not an HF checkpoint directory (no config.json)")
    _check_out(out)
    fmt = FORMATS[options.format]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quant-calib-") as scratch:
        if calib_files is None:
            _log("megatron-ovr quantize: no --calib file: calibrating on the built-in synthetic prompts "
                 "(fine for the tiny model; pass your own prompts or SFT data for a real one)")
            calib_files = synthetic_calibration_files(scratch, options.num_samples + options.check_samples, options.seed)
        samples = load_calibration_samples(calib_files, options.num_samples + options.check_samples, seed=options.seed)
        modelopt = backend.require_modelopt()
        device = _device(options)
        dtype = _calib_dtype(options, device)
        _log(backend.describe(f"{device} ({str(dtype).removeprefix('torch.')})"))
        builder = InputBuilder(hf_dir, options.max_tokens)
        inputs = builder.build_all(samples)
    if options.check_samples and len(inputs) > options.check_samples:
        check, calib = inputs[-options.check_samples:], inputs[: -options.check_samples]
        held_out = True
    else:
        check, calib, held_out = inputs[: options.check_samples], inputs, False
    _log(f"calibration: {len(calib)} samples ({sum(x.has_images for x in calib)} with images, "
         f"{sum(x.num_tokens for x in calib)} tokens); logit check on {len(check)} "
         f"{'held-out ' if held_out else 'calibration '}samples; format {fmt.name}: {fmt.description}; "
         f"vision tower: {options.vision}")

    model = load_hf_model(hf_dir, dtype, device)
    last = 256  # logits compared on each check sample's last positions (bounded memory for a 152k vocab)
    reference = [_forward_logits(model, x, dtype, last) for x in check]
    cfg = quant_config(modelopt.mtq, options, model)
    calibrate_started = time.perf_counter()
    model = modelopt.mtq.quantize(model, cfg, _forward_loop(calib, dtype, f"calibrate {fmt.name}", options.progress))
    calibrate_s = time.perf_counter() - calibrate_started
    text_cfg = model.config.get_text_config()
    num_heads, num_kv_heads = text_cfg.num_attention_heads, text_cfg.num_key_value_heads
    export_dtype = _DTYPES[options.export_dtype]
    adjustments: dict = {}
    if options.format == "int4_awq":
        unpackable = _unpackable_linears(model, _int4_group_size(cfg), vision=options.vision == "quantize")
        if unpackable:
            _log(f"INT4: {len(unpackable)} linear(s) stay unquantised (input width not a multiple of the group "
                 f"size): {', '.join(unpackable)}")
        adjustments["int4_unpackable_unquantized"] = unpackable
    if options.format == "fp8":
        adjustments["fp8_fused_groups_unified"] = unify_fused_fp8_scales(model)
    elif options.int4_layout == "awq":
        adjustments["awq_scaling_dropped"] = drop_unfoldable_awq_scales(model, modelopt, num_heads, num_kv_heads)
    modelopt.requantize_resmooth_fused_llm_layers(model)
    adjustments["rounded_to_export_dtype"] = round_unquantized(model, export_dtype)
    quantised = quantized_linears(model)
    fake_quant = [_forward_logits(model, x, dtype, last) for x in check]
    deltas = logit_deltas(reference, fake_quant) if check else None
    if deltas is not None:
        verdict = "within" if deltas.rel_rms <= fmt.rel_rms_tolerance else "ABOVE"
        _log(f"fake-quant vs original logits: {deltas.describe()} ({verdict} the tiny-model tolerance "
             f"{fmt.rel_rms_tolerance} rel. RMS)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # Exported in the calibration dtype, then the unquantised tensors are cast (see cast_unquantized).
        modelopt.export_hf_checkpoint(model, export_dir=str(tmp), dtype=dtype)
        del model  # the export turned it into packed weights; free it before the check below loads the export
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cast_unquantized(tmp, export_dtype)
        copied = []
        for name in AUXILIARY_FILES:
            if (hf_dir / name).is_file() and (name == "generation_config.json" or not (tmp / name).exists()):
                shutil.copyfile(hf_dir / name, tmp / name)
                copied.append(name)
        if options.format == "int4_awq" and options.int4_layout == "awq":
            # fp16 scales, as AutoAWQ writes them (vLLM converts them to its activation dtype on load)
            modelopt_int4_to_awq(tmp, num_heads=num_heads, num_kv_heads=num_kv_heads, scale_dtype=torch.float16)
        export_check = None
        if options.verify_export and check:
            exported = dequantized_model(tmp, dtype=dtype, device=device)
            export_check = logit_deltas(fake_quant, [_forward_logits(exported, x, dtype, last) for x in check])
            del exported
            verdict = "ok" if export_check.rel_rms <= EXPORT_TOLERANCE else "MISMATCH: the export is not the calibrated model"
            _log(f"exported (dequantised) vs fake-quant logits: {export_check.describe()} ({verdict}; tolerance "
                 f"{EXPORT_TOLERANCE} rel. RMS)")
        report = {
            "format": fmt.name, "description": fmt.description, "vision": options.vision,
            "int4_layout": options.int4_layout if options.format == "int4_awq" else None,
            "source": str(hf_dir), "modelopt": modelopt.version, "device": str(device),
            "calib_dtype": str(dtype).removeprefix("torch."), "export_dtype": options.export_dtype,
            "calibration": {"files": [str(f) for f in calib_files], "samples": len(calib),
                            "with_images": sum(x.has_images for x in calib),
                            "tokens": sum(x.num_tokens for x in calib), "dropped_too_long": builder.dropped,
                            "seconds": round(calibrate_s, 2)},
            "quantized_linears": quantised,
            "adjustments": adjustments,
            "logit_check": None if deltas is None else {**asdict(deltas), "held_out": held_out,
                                                        "tolerance_rel_rms_tiny": fmt.rel_rms_tolerance},
            "export_check": None if export_check is None else {**asdict(export_check), "tolerance_rel_rms": EXPORT_TOLERANCE},
            "bytes": {"source": directory_bytes(hf_dir), "quantized": directory_bytes(tmp)},
            "auxiliary_files": copied,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
        apply_umask(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"wrote {out}: {report['bytes']['quantized'] / 2**20:.1f} MiB of weights "
         f"(source {report['bytes']['source'] / 2**20:.1f} MiB), {len(quantised)} linear layers quantised, "
         f"{report['seconds']:.0f} s")
    return QuantizeResult(out=out, report=report)


def quantize_megatron_dir(ckpt: str | Path, out: str | Path, calib_files: Sequence[str | Path] | None,
                          options: QuantizeOptions, *, tokenizer_dir: str | Path | None = None,
                          progress: bool = True) -> QuantizeResult:
    """Converts a megatron checkpoint (any layout; training or converted) to a temporary HF directory with the
    model-free converter, then quantises that (tokenizer/processor files from ``tokenizer_dir`` or the HF
    directory the checkpoint was converted from)."""
    from megatron_ovr.checkpoint.convert import megatron_to_hf

    _check_out(Path(out))
    with tempfile.TemporaryDirectory(prefix="quant-megatron-", dir=Path(out).parent if Path(out).parent.exists() else None) as tmp:
        hf = megatron_to_hf(ckpt, Path(tmp) / "hf", tokenizer_dir=tokenizer_dir, progress=progress)
        if not (hf / "tokenizer.json").is_file() and not (hf / "vocab.json").is_file():
            raise FileNotFoundError(f"{ckpt}: no tokenizer files came with the conversion (the HF directory it was "
                                    "converted from is gone): pass --tokenizer-dir DIR")
        result = quantize_hf_dir(hf, out, calib_files, options)
    result.report["source"] = str(ckpt)
    (Path(out) / "quant_report.json").write_text(json.dumps(result.report, indent=2) + "\n")
    return result
