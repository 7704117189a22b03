#!/usr/bin/env bash
# The embedded tiny default: the whole Open Vision Reasoner recipe on the tiny Qwen2.5-VL, on CPU, in about
# 11 minutes on 2 cores. Every stage is the real component the 7B recipe runs (torchrun, megatron-core,
# the vLLM rollout engine, the math-verify reward); only the sizes are tiny:
#   1. synthetic data: language-only reasoning conversations (the cold-start data, trained with the recipe's
#      system prompt), PPO prompts over drawn images, held-out drawn and text questions for evaluation;
#   2. a random tiny Qwen2.5-VL HF checkpoint (real vocabulary and tokenizer);
#   3. Stage 1, the linguistic cold start: SFT of the LM (torchrun, 2 data-parallel ranks);
#   4. Stage 2, multimodal PPO from the SFT checkpoint (torchrun; vLLM rollouts, critic, GAE);
#   5. the cold-start and the PPO actor checkpoints exported to HF (tools/convert_megatron_to_hf.py);
#   6. evaluation of both on the held-out split (vLLM, greedy);
#   7. behaviour analysis of the PPO model's responses with the offline rule judge (and of hand-written
#      sample generations, where the behaviours do occur);
#   8. OUT/summary/summary.md and summary.png: time per stage, SFT loss, PPO reward and response length per
#      iteration, accuracy, behaviour rates.
# Run it with `make demo` (which creates the environment first), or with the venv's python on PATH.
# OUT_DIR (default outputs) holds everything; PARITY=1 also checks HF vs megatron-core logits at 4 layouts.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-outputs}
port=${MASTER_PORT:-29511}
# vLLM on CPU: in-process engine, 1 GiB of KV cache (DESIGN.md §3b).
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}

# The metrics files are appended to: start every stage's outputs afresh.
rm -rf "$out/data" "$out/tiny/hf" "$out/sft_data" "$out/sft_tiny" "$out/ppo_tiny" "$out/eval_sft" "$out/eval_ppo" \
       "$out/behaviors_demo" "$out/summary" "$out/timings.tsv" "$out/logs"
mkdir -p "$out/logs"
timings="$out/timings.tsv"
demo_start=$SECONDS

# stage NAME COMMAND...: runs one stage, its output in OUT/logs/NAME.log (the last lines shown on failure),
# and records its wall time for the summary.
stage() {
    local name=$1 start=$SECONDS
    shift
    echo "== $name"
    if ! "$@" > "$out/logs/$name.log" 2>&1; then
        tail -n 40 "$out/logs/$name.log"
        echo "stage '$name' failed: full log in $out/logs/$name.log" >&2
        exit 1
    fi
    printf '%s\t%s\n' "$name" "$((SECONDS - start))" >> "$timings"
    echo "   done in $((SECONDS - start)) s (total $((SECONDS - demo_start)) s)"
}
launch() { torchrun --nproc-per-node "$1" --master-addr 127.0.0.1 --master-port "$port" "${@:2}"; }

data() {
    # The cold-start conversations are language only, open with the recipe's system prompt (the one PPO and
    # evaluation prompt with), and 30% of them are counting word problems ("... How many red squares are
    # there?"): the habit of answering "How many ...?" with a small count. PPO trains on the drawn counting
    # questions; evaluation holds out counting questions, drawn and in words.
    python tools/make_synthetic_data.py --out "$out/data" --sft 2000 --sft-system-prompt --sft-counting-share 0.3 \
        --visual-kinds count --text-kind counting --train-visual 480 --train-text 0 --eval-visual 64 --eval-text 64
    python tools/preprocess_sft.py --input "$out/data/sft.jsonl" --tokenizer "$tokenizer" \
        --output "$out/sft_data/synthetic"
}

parity() {
    local layout
    for layout in "2 --tp 2 --sample image" "2 --pp 2 --sample image" "2 --cp 2 --sample text" \
                  "4 --tp 2 --pp 2 --sp --sample image"; do
        # shellcheck disable=SC2086
        launch ${layout%% *} tools/compare_hf_megatron.py --hf-dir "$out/tiny/hf" ${layout#* }
    done
}

sft() {
    launch 2 -m megatron_ovr sft --config examples/cold_start/tiny.yaml --set model.hf_dir="$out/tiny/hf" \
        --set data.paths="[$out/sft_data/synthetic]" --set checkpoint.dir="$out/sft_tiny/checkpoints" \
        --set logging.tensorboard_dir="$out/sft_tiny/tensorboard" --set logging.plot_path="$out/sft_tiny/loss.png" \
        --set logging.metrics_path="$out/sft_tiny/metrics.jsonl"
}

ppo() {
    launch 2 -m megatron_ovr ppo --config examples/rl/tiny.yaml --set actor.megatron_dir="$out/sft_tiny/checkpoints" \
        --set data.paths="[$out/data/rl_train/prompts.jsonl]" --set checkpoint.dir="$out/ppo_tiny/checkpoints" \
        --set logging.tensorboard_dir="$out/ppo_tiny/tensorboard" --set logging.plot_path="$out/ppo_tiny/ppo.png" \
        --set logging.metrics_path="$out/ppo_tiny/metrics.jsonl"
}

export_hf() {
    python tools/convert_megatron_to_hf.py --ckpt "$out/sft_tiny/checkpoints" --out "$out/sft_tiny/hf" \
        --tokenizer-dir "$out/tiny/hf" --no-progress
    python tools/convert_megatron_to_hf.py --ckpt "$out/ppo_tiny/checkpoints/actor" --out "$out/ppo_tiny/hf" \
        --tokenizer-dir "$out/tiny/hf" --no-progress
}

evaluate() {
    local model
    for model in sft ppo; do
        python tools/evaluate.py --config examples/eval/tiny.yaml --set engine.hf_dir="$out/${model}_tiny/hf" \
            --set "benchmarks=[{name: synthetic, path: $out/data/rl_eval/prompts.jsonl}]" --set output_dir="$out/eval_$model"
    done
}

behaviors() {
    python tools/analyze_behaviors.py --generations "$out/eval_ppo/generations.jsonl" --offline-judge \
        --output-dir "$out/eval_ppo/behaviors"
    python tools/analyze_behaviors.py --generations examples/eval/sample_generations.jsonl --benchmark mathvision \
        --offline-judge --output-dir "$out/behaviors_demo"
}

tokenizer=$(python -c "from megatron_ovr.data.tokenizer import qwen_tokenizer_dir; print(qwen_tokenizer_dir())")
stage data data
stage checkpoint python tools/make_tiny_checkpoint.py --out "$out/tiny/hf"
if [ "${PARITY:-0}" = 1 ]; then stage parity parity; fi
stage sft sft
stage ppo ppo
stage export_hf export_hf
stage eval evaluate
stage behaviors behaviors
python tools/summarize_demo.py --out "$out/summary" --sft-metrics "$out/sft_tiny/metrics.jsonl" \
    --ppo-metrics "$out/ppo_tiny/metrics.jsonl" --eval "sft=$out/eval_sft" --eval "ppo=$out/eval_ppo" \
    --behaviors "$out/eval_ppo/behaviors" --timings "$timings"
echo "total: $((SECONDS - demo_start)) s; logs in $out/logs; sample-generation behaviours: $out/behaviors_demo/behaviors.md"
