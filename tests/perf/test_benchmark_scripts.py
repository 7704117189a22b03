"""CPU smoke tests of the GPU benchmarks, so they do not rot between GPU sessions: each script runs at the tiny
preset and writes JSON with the keys the README's performance table is built from. The throughput run in
fp32 also checks that megatron-ovr and HF train the same model: same weights and tokens give the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
FP32_LOSS_AGREEMENT = 1e-4  # relative; measured ~1e-7 (same weights, same tokens, fp32 on both sides)


def run_script(name: str, *args: str) -> dict:
    out_index = args.index("--out") + 1
    # A fresh rendezvous port: this pytest process may hold a process group on the inherited one.
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(Path(args[out_index]).read_text())


def test_train_throughput_runs_both_systems_and_their_losses_agree(tmp_path):
    result = run_script(
        "train_throughput.py", "--preset", "tiny", "--layers", "2", "--vit-depth", "2", "--seq", "64",
        "--microbatches", "2", "--image-size", "112", "--steps", "1", "--warmup", "1", "--dtype", "fp32",
        "--fp8", "--out", str(tmp_path / "throughput.json"))
    assert {"date", "device", "versions", "config", "workloads", "runs", "ratios", "goals", "fp8"} <= set(result)
    assert result["fp8"].startswith("skipped: FP8 needs the Transformer Engine layer spec")
    assert result["out_of_memory"] == {}
    runs = {(r["system"], r["workload"]): r for r in result["runs"]}
    assert set(runs) == {(system, workload) for system in ("megatron-ovr", "hf-transformers")
                         for workload in ("image", "text")}
    for run in runs.values():
        assert run["step_time_s"] > 0 and run["tokens_per_s"] > 0 and run["flops_per_step"] > 0
        assert run["peak_memory_bytes"] > 0 and len(run["losses"]) == 2 and run["mfu"] is None  # no peak on CPU
    for workload in ("image", "text"):
        assert result["ratios"][workload]["tokens_per_s_x_hf"] > 0
        for megatron_loss, hf_loss in zip(runs["megatron-ovr", workload]["losses"],
                                          runs["hf-transformers", workload]["losses"]):
            assert abs(megatron_loss - hf_loss) <= FP32_LOSS_AGREEMENT * hf_loss, (workload, megatron_loss, hf_loss)
    assert result["workloads"]["image"]["image_grids_per_step"] == [[1, 8, 8]] * 2


def test_weight_sync_streams_every_tensor_and_reports_the_bound(tmp_path):
    result = run_script("weight_sync.py", "--preset", "tiny", "--dtype", "bf16", "--bucket-mb", "64",
                        "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "sync.json"))
    assert {"date", "device", "versions", "config", "engine", "bytes", "copy_bandwidth_bytes_per_s", "bound_seconds",
            "checksum_seconds_per_sync", "rows", "goal_seconds"} <= set(result)
    assert result["engine"]["name"] == "copy" and result["goal_seconds"] is None  # the goal is for the whole 7B
    [row] = result["rows"]
    # Every HF tensor the engine holds arrived (the receiver checked the manifest and every bucket's checksum).
    assert row["tensors"] == result["engine"]["tensors"] and row["bytes"] == result["bytes"] >= result["engine"]["bytes"]
    assert row["seconds"] > 0 and row["x_bound"] == row["seconds"] / result["bound_seconds"]
