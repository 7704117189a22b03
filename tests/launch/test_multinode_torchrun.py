"""Multi-node torchrun without SLURM: examples/multinode/torchrun_node.sh started twice on 127.0.0.1 as
node 0 and node 1 (two torchrun processes, --nnodes 2 --node-rank 0/1) runs the tiny SFT at TP2 x DP2
across the two "nodes" and matches the single-process loss."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from tiny_sft_inputs import REPO, TINY_CONFIG, losses, sft_overrides, tiny_inputs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
NODE_SCRIPT = REPO / "examples" / "multinode" / "torchrun_node.sh"
STEPS = 3


def node(run: Path, nnodes: int, rank: int, nproc: int, port: int, inputs, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NNODES=str(nnodes), NODE_RANK=str(rank),
               NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = ["bash", str(NODE_SCRIPT), "sft", "--config", TINY_CONFIG, *sft_overrides(*inputs, run, STEPS, *extra)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{out[-5000:]}"
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("tiny_inputs"))


def test_two_nodes_tp2_dp2_match_one_process(tmp_path, inputs):
    single = tmp_path / "single"
    finish(node(single, 1, 0, 1, free_port(), inputs), "the single-process run")
    two = tmp_path / "two_nodes"
    port = free_port()
    nodes = [node(two, 2, rank, 2, port, inputs, "parallel.tensor_parallel=2") for rank in (0, 1)]
    outputs = [finish(proc, f"node {rank}") for rank, proc in enumerate(nodes)]
    assert "--nnodes 2 --node-rank 1 --nproc-per-node 2" in outputs[1]
    expected, got = losses(single), losses(two)
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    assert [loss for _, loss, _ in got] == pytest.approx([loss for _, loss, _ in expected], rel=1e-5)
    assert [g for _, _, g in got] == pytest.approx([g for _, _, g in expected], rel=1e-4)


def test_node_rank_outside_the_node_count_is_refused(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", NNODES="2", NODE_RANK="2")
    proc = subprocess.run(["bash", str(NODE_SCRIPT), "sft", "--config", TINY_CONFIG], env=env, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "NODE_RANK=2 is outside 0 .. 1" in proc.stderr
    env.pop("MASTER_ADDR")
    proc = subprocess.run(["bash", str(NODE_SCRIPT), "sft"], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "set MASTER_ADDR" in proc.stderr
