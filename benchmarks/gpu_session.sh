#!/usr/bin/env bash
# The GPU session of issue 7: what a session with the lent H100 runs, in few full calls of the device tool.
#
# Here, once (downloads the Python 3.12 megatron-core wheel the device lacks into .whl/, git-ignored):
#   bash benchmarks/gpu_session.sh prepare
# Then, with the device tool (each call <= 10 min; every step has its own time limit, and what a call wrote
# under $OUT comes back even if it is cut off). A session has 15 device minutes in all, start-up included, so
# the first call holds what the issue must show, in order of need (limits sum to ~9 min):
#   run(command="bash benchmarks/gpu_session.sh tests train4k sync", carry=[".whl"], timeout_s=600)
# and, only if status still shows >= 5 minutes, on the warm machine:
#   run(command="bash benchmarks/gpu_session.sh train8k probe train-packed", carry=[".whl"], timeout_s=...)
# Results come back under the reply's files_at: copy its *.json into benchmarks/results/ (named
# <benchmark>_<device>_<shape>_<date>.json) and keep session.log with your notes; then fill the README
# "Performance" table from them.
#
# Stages (device):
#   probe         versions, the GPU, and which attention kernels (SDPA backends, varlen flash) take the
#                 model's three attention shapes, and how fast
#   tests         pytest -m gpu: bf16 vs fp32 training, FP8 vs BF16 (TE only), TE spec vs torch spec (TE only)
#   train4k/8k    train_throughput.py at 7B widths, 4 LM layers, full ViT: seq 4096 resp. 8192 (text + image,
#                 bf16, --fp8 which reports "skipped" without TE); each run writes its own JSON
#   train         both
#   train-packed  megatron-ovr alone at seq 8192 with the segment-id mask packed SFT rows need (the masked
#                 SDPA kernel instead of flash), to price that path
#   sync          weight_sync.py: the whole 7B (28 layers, full ViT) in bf16 into the copy engine, buckets
#                 128 / 512 / 2048 MiB
set -uo pipefail
cd "$(dirname "$0")/.."

MEGATRON_CORE=megatron-core==0.16.1
OUT=${OUT:-benchmarks/results}
LOG="$OUT/session.log"

prepare() {
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$MEGATRON_CORE"
  ls -l .whl
}

# The device image has torch, transformers, safetensors, pyyaml, psutil and pytest; megatron-core travels.
device_setup() {
  if [ ! -d /tmp/site/megatron ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing the carried wheels failed (did you carry .whl?)"; exit 1; }
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  mkdir -p "$OUT"
}

# Runs one step with a time limit; a failure is logged and the session goes on to the next step.
step() {
  local limit=$1; shift
  echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "=== FAILED (exit $rc): $*" | tee -a "$LOG"
}

probe() {
  step 30 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  step 30 python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"
  step 90 python3 - <<'EOF'
# Which attention kernels take the model's attention calls (bf16, forward + backward), and their time: SDPA's
# backends (a bool mask rules flash out) and, where torch has it, varlen flash over the same 64-token segments.
import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SEGMENT = 64  # tokens per segment: a ViT window of 8x8 patches, or a short packed sample
CASES = {"LM causal, no mask (GQA 28/4, s 8192)": (28, 4, 8192, 128, False, True),
         "LM packed: bool mask (GQA 28/4, s 8192)": (28, 4, 8192, 128, True, True),
         "ViT window: bool mask (16 heads, 4096 patches)": (16, 16, 4096, 80, True, False)}


def report(name, label, run):
    try:
        run(); torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); [run() for _ in range(5)]; end.record(); torch.cuda.synchronize()
        print(f"{name:<48}{label:<26}{start.elapsed_time(end) / 5:8.2f} ms fwd+bwd")
    except (RuntimeError, TypeError, torch.OutOfMemoryError) as error:  # TypeError: an older varlen_attn signature
        print(f"{name:<48}{label:<26}   refused: {str(error).splitlines()[0][:90]}")


def tensors(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)


for name, (heads, groups, seq, head_dim, masked, causal) in CASES.items():
    q, k, v = tensors(1, heads, seq, head_dim), tensors(1, groups, seq, head_dim), tensors(1, groups, seq, head_dim)
    segments = torch.arange(seq, device="cuda") // SEGMENT
    mask = None
    if masked:
        mask = (segments[:, None] == segments[None, :])[None, None]
        if causal:
            mask = mask & torch.ones(seq, seq, device="cuda", dtype=torch.bool).tril()
    for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        def run():
            with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and not masked,
                                               enable_gqa=heads != groups).sum().backward()
        report(name, "sdpa " + (backend.name if backend else "default"), run)
    if masked:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            print(f"{name:<48}{'varlen_attn':<26}   absent in torch {torch.__version__}")
            continue
        params = inspect.signature(varlen_attn).parameters
        kwargs = {}
        if causal:
            kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if heads != groups:
            kwargs["enable_gqa"] = True
        cu = torch.arange(0, seq + 1, SEGMENT, device="cuda", dtype=torch.int32)
        qv, kv, vv = (t[0].transpose(0, 1).detach().contiguous().requires_grad_() for t in (q, k, v))
        report(name, "varlen_attn", lambda: varlen_attn(qv, kv, vv, cu, cu, SEGMENT, SEGMENT, **kwargs).sum().backward())
EOF
}

tests() {
  step 150 python3 -m pytest -m gpu -ra -p no:cacheprovider tests/perf tests/models/test_te_spec_gpu.py
}

THROUGHPUT=(python3 benchmarks/train_throughput.py --preset 7b --layers 4 --micro-batch 1 --microbatches 4
            --images 1 --image-size 896 --steps 5 --warmup 2 --dtype bf16)

train4k() {
  step 200 "${THROUGHPUT[@]}" --seq 4096 --fp8 --out "$OUT"
}

train8k() {
  step 260 "${THROUGHPUT[@]}" --seq 8192 --fp8 --out "$OUT"
}

train() {
  train4k
  train8k
}

train-packed() {
  step 200 "${THROUGHPUT[@]}" --seq 8192 --lm-mask segments --skip-hf --out "$OUT"
}

sync() {
  step 180 python3 benchmarks/weight_sync.py --preset 7b --dtype bf16 --engine copy --bucket-mb 128 512 2048 \
    --repeats 3 --warmup 1 --out "$OUT"
}

[ $# -gt 0 ] || { sed -n '2,24p' "$0"; exit 2; }
for stage in "$@"; do
  case $stage in
    prepare) prepare ;;
    probe|tests|train|train4k|train8k|train-packed|sync) device_setup; "$stage" ;;
    *) echo "unknown stage $stage (prepare, probe, tests, train, train4k, train8k, train-packed, sync)"; exit 2 ;;
  esac
done
