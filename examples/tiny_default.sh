#!/usr/bin/env bash
# The embedded tiny default, on CPU: what the recipe has so far, end to end.
#   1. a random tiny Qwen2.5-VL HF checkpoint;
#   2. that checkpoint in megatron-core at several parallel layouts (torchrun, gloo), logits vs HF;
#   3. synthetic R1-style reasoning data, tokenised with the real Qwen tokenizer;
#   4. the linguistic cold start: SFT of the LM from the checkpoint (2 data-parallel ranks), loss curve PNG.
# Run it with `make demo` (which creates the environment first), or with the venv's python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-outputs}
port=${MASTER_PORT:-29511}
rm -rf "$out/tiny/hf" "$out/sft_tiny"

echo "== 1. tiny HF checkpoint"
python tools/make_tiny_checkpoint.py --out "$out/tiny/hf"

echo "== 2. HF vs megatron-core logits"
compare() { torchrun --nproc-per-node "$1" --master-addr 127.0.0.1 --master-port "$port" \
              tools/compare_hf_megatron.py --hf-dir "$out/tiny/hf" "${@:2}"; }
compare 2 --tp 2 --sample image
compare 2 --pp 2 --sample image
compare 2 --cp 2 --sample text
compare 4 --tp 2 --pp 2 --sp --sample image

echo "== 3. synthetic reasoning data"
tokenizer=$(python -c "from megatron_ovr.data.tokenizer import qwen_tokenizer_dir; print(qwen_tokenizer_dir())")
python tools/preprocess_sft.py --synthetic 2000 --seed 0 --tokenizer "$tokenizer" --output "$out/sft_data/synthetic"

echo "== 4. cold-start SFT (2 data-parallel ranks)"
torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$port" -m megatron_ovr sft \
    --config examples/cold_start/tiny.yaml --set model.hf_dir="$out/tiny/hf" \
    --set data.paths="[$out/sft_data/synthetic]"
echo "loss curve: $out/sft_tiny/loss.png; metrics: $out/sft_tiny/metrics.jsonl"
