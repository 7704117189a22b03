"""Checkpoint conversion cost vs a plain copy of the same bytes, against the goal (issue 3): each converter
within 1.5x the copy's time and a peak RSS within 1.5x the largest safetensors shard.

Writes a random HF checkpoint with the real Qwen2.5-VL-7B widths (float16; ``--lm-layers`` decoder layers,
the full ViT), then times, each in a fresh process so peak RSS is its own:
  copy      read + write every safetensors byte (the floor any converter pays)
  to_mcore  tools/convert_hf_to_megatron.py (model-free, one process)
  to_hf     tools/convert_megatron_to_hf.py back to safetensors (model-free, one process)
The steps alternate over ``--rounds`` rounds and each reports its best time (the machine may be shared).
Prints a table and writes JSON to benchmarks/results/. Timing only: no pass/fail.

    python benchmarks/convert.py --lm-layers 28      # the whole 7B (needs ~17 GB disk x 3)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform as host
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.5  # issue 3: time <= 1.5x the copy, peak RSS <= 1.5x the largest shard


def random_checkpoint(out: Path, lm_layers: int, seed: int = 0) -> None:
    """Streams random float16 tensors of the 7B shapes (from a meta-device HF model) into ``out``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(REPO))
    from megatron_ovr.checkpoint import write_hf_checkpoint
    from megatron_ovr.config import get_preset
    from megatron_ovr.mapping.qwen2_5_vl import canonical_hf_name

    cfg = get_preset("7b")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=lm_layers))
    with torch.device("meta"):
        shapes = {canonical_hf_name(k): v.shape for k, v in
                  Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_config())).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    tensors = ((name, (torch.randn(shape, generator=gen) * 0.02).half()) for name, shape in shapes.items())
    write_hf_checkpoint(out, cfg, tensors, max_shard_bytes=2 * 2**30)


# Runs a script as __main__ and reports the process's own peak RSS on stderr. Linux carries ru_maxrss
# across fork and exec, so the driver stays small (stdlib only) and every heavy step is a child.
_MEASURE = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__'); code = 0\n"
    "except SystemExit as e:\n    code = e.code or 0\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print('PEAK_RSS', usage.ru_maxrss * 1024, 'CPU', usage.ru_utime + usage.ru_stime, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def timed(label: str, script_and_args: list[str]) -> dict:
    """Runs a script in a fresh process: wall time and that process's peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *script_and_args], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    fields = proc.stderr.rsplit("PEAK_RSS", 1)[1].split()
    return {"step": label, "seconds": elapsed, "peak_rss_bytes": int(fields[0]), "cpu_seconds": float(fields[2])}


def copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        with open(f, "rb") as r, open(dst / f.name, "wb") as w:
            shutil.copyfileobj(r, w, length=64 * 2**20)
            w.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-layers", type=int, default=4, help="decoder layers of the 7B shape (28 = all)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--tag", default="modelfree", help="suffix of the results file name")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each step reports its best")
    parser.add_argument("--copy", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copy:  # the measured "copy" step, run in its own process
        copy_tree(Path(args.copy[0]), Path(args.copy[1]))
        return
    if args.make:
        random_checkpoint(Path(args.make), args.lm_layers)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        result = run(work, args.lm_layers, args.tag, args.rounds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {result}")


def run(work: Path, lm_layers: int, tag: str, rounds: int) -> Path:
    hf = work / "hf"
    timed("make", [__file__, "--make", str(hf), "--lm-layers", str(lm_layers)])
    load = os.getloadavg()[0]
    total = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    largest_shard = max(f.stat().st_size for f in hf.glob("*.safetensors"))
    largest_tensor = 152064 * 3584 * 2  # the embedding / LM head in float16
    samples: dict[str, list[dict]] = {"copy": [], "to_mcore": [], "to_hf": []}
    # The machine may be shared: the steps alternate over several rounds and each reports its best time
    # (the one least disturbed), so a burst of someone else's I/O does not land on one step only.
    for _ in range(rounds):
        samples["copy"].append(timed("copy", [__file__, "--copy", str(hf), str(work / "copy")]))
        shutil.rmtree(work / "copy")  # disk: at most three checkpoints at a time
        samples["to_mcore"].append(timed("to_mcore", ["tools/convert_hf_to_megatron.py", "--hf-dir", str(hf),
                                                      "--out", str(work / "mcore"), "--no-progress"]))
        samples["to_hf"].append(timed("to_hf", ["tools/convert_megatron_to_hf.py", "--ckpt", str(work / "mcore"),
                                                "--out", str(work / "hf_again"), "--max-shard-gb", "2",
                                                "--no-progress"]))
        shutil.rmtree(work / "mcore")
        shutil.rmtree(work / "hf_again")
    rows = []
    for step, runs in samples.items():
        seconds = sorted(r["seconds"] for r in runs)
        rows.append({"step": step, "seconds": seconds[0], "seconds_median": seconds[len(seconds) // 2],
                     "seconds_all": [r["seconds"] for r in runs],
                     "cpu_seconds": min(r["cpu_seconds"] for r in runs),
                     "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)})
    copy_seconds = rows[0]["seconds"]
    print(f"checkpoint: 7B widths, {lm_layers} LM layers, {total / 2**30:.2f} GiB float16, "
          f"largest shard {largest_shard / 2**30:.2f} GiB, largest tensor {largest_tensor / 2**30:.2f} GiB; "
          f"best of {rounds} rounds")
    print(f"{'step':<10}{'seconds':>10}{'x copy':>9}{'median x':>10}{'CPU s':>8}{'peak RSS GiB':>14}{'x shard':>9}"
          f"   goal: x copy <= {GOAL}, x shard <= {GOAL}")
    for row in rows:
        rss = row["peak_rss_bytes"]
        row["time_x_copy"] = row["seconds"] / copy_seconds
        row["time_x_copy_median"] = row["seconds_median"] / rows[0]["seconds_median"]
        row["rss_x_largest_shard"] = rss / largest_shard
        print(f"{row['step']:<10}{row['seconds']:>10.1f}{row['time_x_copy']:>9.2f}{row['time_x_copy_median']:>10.2f}"
              f"{row['cpu_seconds']:>8.1f}{rss / 2**30:>14.2f}{row['rss_x_largest_shard']:>9.2f}")
    converters = rows[1:]
    result = {
        "date": datetime.date.today().isoformat(), "host": host.node(), "device": "cpu", "cpus": os.cpu_count(),
        "lm_layers": lm_layers, "checkpoint_bytes": total, "largest_shard_bytes": largest_shard,
        "largest_tensor_bytes": largest_tensor, "converter": "model-free, single process", "rounds": rounds,
        "load_average_at_start": load, "rows": rows, "goal": {"time_x_copy": GOAL, "rss_x_largest_shard": GOAL},
        "goal_met": all(r["time_x_copy"] <= GOAL and r["rss_x_largest_shard"] <= GOAL for r in converters),
    }
    suffix = f"_{tag}" if tag else ""
    out = REPO / "benchmarks" / "results" / f"convert_cpu_{lm_layers}layers_{result['date']}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out

if __name__ == "__main__":
    main()
