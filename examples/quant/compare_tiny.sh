#!/usr/bin/env bash
# Quantised export on the tiny model, end to end on CPU (~10 min on 2 cores): a random tiny Qwen2.5-VL, the
# synthetic data, FP8 and INT4-AWQ checkpoints (calibrated on the PPO train prompts and the SFT
# conversations), the BF16 and both quantised models evaluated with the same harness config (vLLM, greedy),
# and the comparison tables (accuracy per benchmark, size on disk, logit error; THROUGHPUT=1 adds vLLM
# generation throughput, which means something only on a GPU).
# The random model's accuracy is ~0 whatever the format: this proves the path, not the quality.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT_DIR:-outputs/quant_tiny}
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
rm -rf "$out"
mkdir -p "$out"

python tools/make_synthetic_data.py --out "$out/data" --sft 400 --train-visual 192 --train-text 64 \
    --eval-visual 48 --eval-text 16
python tools/make_tiny_checkpoint.py --out "$out/src"
# The BF16 baseline (the tiny checkpoint is stored in float32): its size on disk is the reference.
python - "$out" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from megatron_ovr.quant.layouts import cast_unquantized
out = Path(sys.argv[1])
shutil.copytree(out / "src", out / "bf16")
cast_unquantized(out / "bf16", torch.bfloat16)
PY
calib=("$out/data/rl_train/prompts.jsonl" "$out/data/sft.jsonl")
python tools/quantize.py --hf-dir "$out/src" --out "$out/fp8" --format fp8 --calib "${calib[@]}" --num-samples 256
python tools/quantize.py --hf-dir "$out/src" --out "$out/int4_awq" --format int4_awq --calib "${calib[@]}" --num-samples 64

for model in bf16 fp8 int4_awq; do
    python tools/evaluate.py --config examples/quant/eval_tiny.yaml --set engine.hf_dir="$out/$model" \
        --set output_dir="$out/eval_$model"
done
for model in fp8 int4_awq; do
    extra=()
    if [[ ${THROUGHPUT:-0} == 1 ]]; then
        extra=(--throughput-prompts "$out/data/rl_eval/prompts.jsonl" --max-new-tokens 256)
    fi
    python -m megatron_ovr.quant.report --baseline-dir "$out/bf16" --quantized-dir "$out/$model" \
        --baseline-results "$out/eval_bf16/results.json" --quantized-results "$out/eval_$model/results.json" \
        --out "$out/compare_$model.json" "${extra[@]}" | tee "$out/compare_$model.md"
done
