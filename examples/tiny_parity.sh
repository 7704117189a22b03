#!/usr/bin/env bash
# The embedded tiny default: writes a random tiny Qwen2.5-VL HF checkpoint, loads it into the megatron-core
# model at several parallel layouts (real torchrun, gloo on CPU) and checks the logits against HF.
# Run it with `make demo` (which creates the environment first), or with the venv's python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-outputs/tiny}
mkdir -p "$out"
python tools/make_tiny_checkpoint.py --out "$out/hf"
run() { torchrun --nproc-per-node "$1" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
          tools/compare_hf_megatron.py --hf-dir "$out/hf" "${@:2}"; }
run 1 --sample image
run 2 --tp 2 --sample image
run 2 --pp 2 --sample image
run 2 --cp 2 --sample text
run 4 --tp 2 --pp 2 --sp --sample image
run 4 --tp 2 --cp 2 --sample image
