"""The project's SLURM scripts on a real SLURM cluster started here (DESIGN §3c): examples/slurm/submit.py
submits examples/slurm/megatron_ovr.sbatch, which runs the tiny SFT for a few steps on one node, and on a
2-node cluster on this host with one torchrun per node; the test polls until the job is done and checks its
state, its one log, the loss log and the checkpoint. Then preemption: `scancel --signal=TERM` mid-run
writes a checkpoint, the job requeues itself and continues with bit-identical losses. Bad partitions, node
counts, images and time limits are refused before anything is queued.

The commands are the README's ("Running on a cluster"), with the test's paths appended as --set overrides.
Needs root and Debian's slurmctld slurmd slurm-client munge (.ci/run installs them); otherwise every test
here skips and says why. All SLURM state lives under one temporary directory; the daemons are stopped by PID.
"""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, unavailable_reason
from tiny_sft_inputs import REPO, TINY_CONFIG, history, losses, sft_overrides, tiny_inputs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SUBMIT = REPO / "examples" / "slurm" / "submit.py"
STEPS = 5


def readme_tiny_command(nodes: int) -> list[str]:
    """The README's submit.py command for the tiny config on ``nodes`` nodes, as argv after the script."""
    section = (REPO / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith("python examples/slurm/submit.py") and TINY_CONFIG in line and f"--nodes {nodes} " in line:
            return shlex.split(line)[2:]
    raise AssertionError(f"README 'Running on a cluster' has no tiny submit.py command on {nodes} node(s)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    slurm = SlurmCluster(nodes=2)
    slurm.env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                     PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    slurm.start()
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("tiny_inputs"))


def submit(cluster: SlurmCluster, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], cwd=REPO, env=cluster.env, capture_output=True,
                          text=True, timeout=120)


def submit_tiny(cluster, inputs, run: Path, nodes: int, *extra_sets: str) -> tuple[str, Path]:
    """Submits the README's tiny command with this run's paths; returns (job id, log path)."""
    argv = readme_tiny_command(nodes)
    cut = argv.index("--")
    argv = [*argv[:cut], "--log-dir", str(run / "logs"), "--time", "00:15:00", *argv[cut:],
            *sft_overrides(*inputs, run, STEPS, *extra_sets)]
    proc = submit(cluster, argv)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    return job, run / "logs" / f"ovr-sft-{job}.log"


def wait_done(cluster, job: str, log: Path) -> dict:
    try:
        cluster.wait(job, timeout=600)
    except TimeoutError:
        raise AssertionError(f"job {job} did not finish:\n{log.read_text()[-5000:] if log.exists() else 'no log'}")
    info = cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log.read_text()[-5000:])
    return info


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "ckpt").glob("iter_*") if p.name[5:].isdigit())


@pytest.fixture(scope="module")
def single_node_run(cluster, inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm_one_node")
    start = time.time()
    job, log = submit_tiny(cluster, inputs, run, 1)
    info = wait_done(cluster, job, log)
    return run, log, info, time.time() - start


def test_one_node(single_node_run):
    run, log, info, seconds = single_node_run
    text = log.read_text()
    assert "(1 node(s) x 1 worker(s))" in text and "--rdzv-backend c10d" in text
    assert f"--rdzv-id {info['JobId']}" in text
    assert "megatron-ovr: finished with exit code 0" in text
    assert re.search(r"transformer-engine=\S+; apex=\S+.*; vllm=", text), "start-up banner"
    steps = history(run)
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert checkpoints(run) == [STEPS] and (run / "ckpt" / "latest").read_text().strip() == str(STEPS)
    print(f"one-node job: {seconds:.1f} s")


def test_two_nodes_one_torchrun_each(cluster, inputs, single_node_run, tmp_path):
    start = time.time()
    job, log = submit_tiny(cluster, inputs, tmp_path, 2, "parallel.tensor_parallel=2")
    info = wait_done(cluster, job, log)
    text = log.read_text()
    assert "(2 node(s) x 1 worker(s))" in text and "--nnodes 2" in text
    nodes = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert sorted(nodes) == sorted(cluster.names)
    expected, got = losses(single_node_run[0]), losses(tmp_path)
    assert [s for s, _, _ in got] == [s for s, _, _ in expected]
    assert [loss for _, loss, _ in got] == pytest.approx([loss for _, loss, _ in expected], rel=1e-5)
    assert checkpoints(tmp_path) == [STEPS]
    print(f"two-node job: {time.time() - start:.1f} s")


def test_preemption_checkpoints_requeues_and_resumes_bit_identically(cluster, inputs, single_node_run, tmp_path):
    start = time.time()
    job, log = submit_tiny(cluster, inputs, tmp_path, 1)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # step 1 done: preempt mid-run
        assert cluster.state(job) is not None, f"job ended before its first step:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, "no step after 300 s"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=TERM", job)
    info = wait_done(cluster, job, log)
    text = log.read_text()
    assert info["Restarts"] == "1", info
    saved = int(re.search(r"SIGTERM: saved step (\d+)", text).group(1))
    assert 1 <= saved < STEPS, text[-4000:]
    assert "torchrun exited 1 after the checkpoint" in text and "Exited with exit code 75" in text
    assert f"preempted after a checkpoint; requeueing job {job}" in text
    assert f"job {job} restart 1" in text and f"resumed from {tmp_path / 'ckpt'} at step {saved}" in text
    assert checkpoints(tmp_path) == [saved, STEPS]
    # Every step logged once, and exactly the uninterrupted run's losses and gradient norms.
    assert losses(tmp_path) == losses(single_node_run[0])
    print(f"preempted job (step {saved}), requeued and finished: {time.time() - start:.1f} s")


@pytest.mark.parametrize("change,message", [
    (["--partition", "nosuch"], "--partition nosuch: no such partition; this cluster has debug"),
    (["--nodes", "3"], "--nodes 3: partition debug has only 2 node(s)"),
    (["--set", "parallel.tensor_parallel=2"], "is not a multiple of TP 2 x PP 1 x CP 1 = 2"),
    (["--container-image", "/nonexistent/megatron-ovr.sqsh"], "/nonexistent/megatron-ovr.sqsh: no such image file"),
    (["--container-image", "nvcr.io#nvidia/pytorch:26.08-py3"], "srun has no --container-image option"),
    (["--time", "banana"], "sbatch --test-only rejected the job"),
])
def test_bad_input_is_refused_before_anything_is_queued(cluster, change, message, tmp_path):
    argv = readme_tiny_command(1)
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut:]
    if change[0] == "--nodes":
        options[options.index("--nodes") + 1] = change[1]
    elif change[0] == "--partition":
        options[options.index("--partition") + 1] = change[1]
    elif change[0] == "--set":
        command += change
    else:
        options += change
    before = cluster.job_ids()
    proc = submit(cluster, [*options, "--log-dir", str(tmp_path / "logs"), *command])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing was submitted" in proc.stderr and message in proc.stderr, proc.stderr
    assert cluster.job_ids() == before


def test_dry_run_checks_the_live_partition(cluster):
    proc = submit(cluster, ["--dry-run", *readme_tiny_command(2)])
    assert proc.returncode == 0, proc.stderr
    assert "not checked" not in proc.stdout
    assert "--partition=debug" in proc.stdout
