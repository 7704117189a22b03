"""GPU + Transformer Engine only: megatron-ovr trains with FP8 decoder GEMMs (forward and backward run, losses
finite) and its loss tracks the BF16 run from the same weights on the same batches. Runs the throughput
benchmark's own FP8 path (tiny preset), so the benchmark's ``--fp8`` is exercised too.

Tolerance (not yet calibrated on a GPU with TE; the first such session should record the measured gap):
E4M3 keeps 3 mantissa bits, so one FP8 GEMM is off by a few percent, but the loss is an average over
hundreds of tokens behind a BF16 LM head, and delayed scaling keeps the tensors in range: 2% relative per
step, while both runs fall by far more than that at the learning rate used here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from megatron_ovr import platform

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not platform.HAVE_TE, reason="FP8 needs Transformer Engine (pip install 'megatron-ovr[gpu]')"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
RELATIVE_TOLERANCE = 0.02
MIN_LOSS_DROP = 0.5  # nats over the run, far above the tolerance (~0.24 nats)


def test_fp8_training_runs_and_tracks_bf16(tmp_path):
    out = tmp_path / "fp8.json"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--layers", "2", "--vit-depth", "2",
                    "--seq", "128", "--image-size", "112", "--microbatches", "2", "--steps", "6", "--warmup", "0",
                    "--lr", "1e-3", "--dtype", "bf16", "--fp8", "--skip-hf", "--out", str(out)], check=True, env=env)
    result = json.loads(out.read_text())
    assert result["fp8"] == "measured"
    runs = {(r["system"], r["workload"]): r["losses"] for r in result["runs"]}
    bf16 = runs["megatron-ovr", "image"] + runs["megatron-ovr", "text"]
    fp8 = runs["megatron-ovr fp8", "image"] + runs["megatron-ovr fp8", "text"]
    assert bf16[0] - bf16[5] > MIN_LOSS_DROP and fp8[0] - fp8[5] > MIN_LOSS_DROP, (bf16, fp8)
    for step, (reference_loss, loss) in enumerate(zip(bf16, fp8)):
        assert abs(loss - reference_loss) <= RELATIVE_TOLERANCE * reference_loss, (step, bf16, fp8)
