"""Quantises a Qwen2.5-VL checkpoint (FP8 or INT4-AWQ) with NVIDIA Model Optimizer and writes an HF directory
that vLLM loads directly, tokenizer and processor files alongside.

    python tools/quantize.py --hf-dir IN --out OUT --format fp8|int4_awq [--calib FILE ...] [--vision keep|quantize]
    python tools/quantize.py --megatron-dir CKPT --tokenizer-dir HF_DIR --out OUT --format fp8

Calibration: a few hundred samples (--num-samples, default 256) from our own data files, text and image
prompts mixed: evaluation-layout prompt files (question / choices / images; e.g. the rl_train/prompts.jsonl
of tools/make_synthetic_data.py, or a benchmark export) become the exact prompts of evaluation and PPO;
SFT conversation JSONL/Parquet ("messages") is rendered whole, reasoning replies included. Without --calib
the built-in synthetic prompts are used (fine for the tiny model only). A progress bar counts calibration
samples per pass (AWQ makes two passes). --check-samples are held out and used to compare the fake-quantised
model's logits with the original's; the result is printed and kept in OUT/quant_report.json.

Formats (what vLLM reads):
  fp8       FP8 E4M3 weights and activations, static per-tensor scales: modelopt's HF export as is
            (config.json quantization_config quant_method "modelopt", quant_algo "FP8"; hf_quant_config.json;
            per layer weight (float8_e4m3fn), weight_scale, input_scale). Fused q/k/v and gate/up layers
            share one weight scale, so vLLM loads it on CPU as well as on GPUs.
  int4_awq  INT4 weights (group size 128, AWQ-lite scales), 16-bit activations. vLLM 0.32 does not read
            modelopt's W4A16_AWQ export, so it is rewritten exactly into the AutoAWQ GEMM layout
            (quant_method "awq": qweight/qzeros int32, scales), which vLLM reads on GPUs and CPUs.
            --int4-layout modelopt keeps modelopt's layout (TensorRT-LLM).
The vision tower and merger stay unquantised (export dtype) unless --vision quantize. The embeddings and
the LM head are never quantised.

--megatron-dir converts a megatron checkpoint (any TP/PP layout, training or converted) to a temporary HF
directory with the model-free converter (the one mapping table) and quantises that.
Runs on a GPU when there is one (bf16 calibration), else on the CPU (fp32; fine for small models).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ovr.quant import FORMATS, INT4_LAYOUTS, VISION_MODES, QuantizeOptions, quantize_hf_dir, quantize_megatron_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF Qwen2.5-VL directory to quantise (weights, tokenizer, preprocessor config)")
    source.add_argument("--megatron-dir", metavar="CKPT", help="megatron checkpoint root or iter_NNNNNNN directory")
    parser.add_argument("--tokenizer-dir", help="with --megatron-dir: copy tokenizer/processor files from here "
                                                "(default: the HF directory the checkpoint was converted from)")
    parser.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    # Validated by QuantizeOptions (an error that lists the valid names), not by argparse choices, so the
    # library and the CLI say the same thing.
    parser.add_argument("--format", required=True, help=f"one of: {', '.join(FORMATS)}")
    parser.add_argument("--calib", nargs="+", action="extend", metavar="FILE",
                        help="calibration files: evaluation-layout prompts (.jsonl/.json/.parquet) or SFT conversations "
                             "(.jsonl/.parquet with 'messages'); repeatable (default: built-in synthetic prompts)")
    parser.add_argument("--vision", default="keep", help=f"{' | '.join(VISION_MODES)} (default: keep)")
    parser.add_argument("--num-samples", type=int, default=256, help="calibration samples (default: 256)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="cut samples at this length (default: 1024)")
    parser.add_argument("--check-samples", type=int, default=4,
                        help="samples held out for the logit comparison (default: 4; 0 skips it)")
    parser.add_argument("--int4-layout", default="awq", help=f"int4_awq only: {' | '.join(INT4_LAYOUTS)} (default: awq)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    parser.add_argument("--calib-dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32")
    parser.add_argument("--export-dtype", default="bfloat16", help="dtype of the unquantised tensors (default: bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = QuantizeOptions(format=args.format, vision=args.vision, num_samples=args.num_samples,
                                  max_tokens=args.max_tokens, check_samples=args.check_samples, seed=args.seed,
                                  device=args.device, calib_dtype=args.calib_dtype, export_dtype=args.export_dtype,
                                  int4_layout=args.int4_layout, progress=not args.no_progress)
    except ValueError as err:
        print(f"tools/quantize.py: error: {err}", file=sys.stderr)
        return 2
    if args.tokenizer_dir and not args.megatron_dir:
        print("tools/quantize.py: error: --tokenizer-dir goes with --megatron-dir", file=sys.stderr)
        return 2
    try:
        if args.megatron_dir:
            quantize_megatron_dir(args.megatron_dir, args.out, args.calib, options, tokenizer_dir=args.tokenizer_dir,
                                  progress=not args.no_progress)
        else:
            quantize_hf_dir(args.hf_dir, args.out, args.calib, options)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"tools/quantize.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
