"""examples/slurm without a cluster: submit.py --dry-run resolves the per-node torchrun line for SFT, PPO,
evaluation and conversion through the sbatch script itself, bad input is refused before anything is
submitted, the README's cluster commands pass --dry-run, and the scripts parse. (tests/launch/
test_slurm_cluster.py runs them on a real SLURM cluster.)"""

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from launch import REPO

SUBMIT = REPO / "examples" / "slurm" / "submit.py"
SBATCH = REPO / "examples" / "slurm" / "megatron_ovr.sbatch"
NODE_SCRIPT = REPO / "examples" / "multinode" / "torchrun_node.sh"
SEVEN_B = "examples/cold_start/qwen2_5_vl_7b.yaml"
TINY = "examples/cold_start/tiny.yaml"


_EMPTY_CONF: list = []


@pytest.fixture(scope="module", autouse=True)
def empty_slurm_conf(tmp_path_factory):
    """An empty slurm.conf: no cluster answers, at once, whether or not the SLURM client is installed (a
    missing file makes the client retry for 60 s)."""
    conf = tmp_path_factory.mktemp("no_cluster") / "slurm.conf"
    conf.write_text("")
    _EMPTY_CONF[:] = [str(conf)]


def no_cluster_env() -> dict:
    """No allocation: no SLURM variables, and no rendezvous address (the dry run would show an inherited
    MASTER_ADDR, which in-process tests export when they set up their process group)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["SLURM_CONF"] = _EMPTY_CONF[0]
    return env


def submit(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=cwd, env=no_cluster_env(),
                          capture_output=True, text=True, timeout=60)


def node_line(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    return shlex.split(line)


def test_dry_run_resolves_the_7b_sft_line():
    proc = submit("--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00",
                  "--", "sft", "--config", SEVEN_B, "--set", "train_steps=10")
    assert "TP 4 x PP 1 x CP 4 x DP 1 = 16 processes" in proc.stdout
    assert "partition and pyxis not checked" in proc.stdout
    assert "--gpus-per-node=8" in proc.stdout and "--signal=TERM@300" in proc.stdout
    assert "OVR_NPROC_PER_NODE=8" in proc.stdout and "OVR_SAVE_SECONDS=300" in proc.stdout
    words = node_line(proc)
    torchrun = words[words.index("torchrun"):]
    assert torchrun == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "FIRST_NODE:PORT", "--rdzv-id", "JOB_ID", "-m", "megatron_ovr", "sft",
                        "--config", SEVEN_B, "--set", "train_steps=10"]
    assert words[:3] == ["srun", "--nodes", "2"]


def test_a_fixed_rendezvous_port():
    proc = submit("--dry-run", "--port", "6000", "--", "sft", "--config", TINY)
    assert "OVR_PORT=6000" in proc.stdout and "FIRST_NODE:6000" in node_line(proc)


def test_dry_run_of_the_tiny_cpu_config():
    proc = submit("--dry-run", "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--", "sft",
                  "--config", TINY)
    assert "--gpus-per-node" not in proc.stdout.split("# each node")[0]  # CPU nodes: no GPU request
    assert "TP 1 x PP 1 x CP 1 x DP 2 = 2 processes" in proc.stdout
    assert "--nproc-per-node 2" in " ".join(node_line(proc))


def test_dry_run_of_a_conversion_tool():
    proc = submit("--dry-run", "--nodes", "1", "--gpus-per-node", "8", "--", "tools/convert_hf_to_megatron.py",
                  "--hf-dir", "/models/hf", "--out", "/ckpt", "--tp", "4", "--pp", "2")
    assert "--tp 4 x --pp 2 x --cp 1 x DP 1 = 8 processes" in proc.stdout
    assert "--job-name=ovr-convert_hf_to_megatron" in proc.stdout
    words = node_line(proc)
    assert words[words.index("--rdzv-id") + 2:] == ["tools/convert_hf_to_megatron.py", "--hf-dir", "/models/hf",
                                                     "--out", "/ckpt", "--tp", "4", "--pp", "2"]


@pytest.mark.parametrize("command,config", [("ppo", "examples/rl/tiny.yaml"), ("eval", "examples/eval/tiny.yaml")])
def test_dry_run_of_the_other_stages(command, config):
    """PPO and evaluation run through the same script, selected by the command, on their example configs."""
    from megatron_ovr.cli import COMMANDS

    if command not in COMMANDS or not (REPO / config).is_file():
        pytest.skip(f"megatron-ovr {command} or {config} does not exist yet")
    proc = submit("--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--", command, "--config", config)
    assert config in proc.stdout.split("# submit")[0]
    words = node_line(proc)
    assert words[words.index("--rdzv-id") + 2:] == ["-m", "megatron_ovr", command, "--config", config]
    assert "--job-name=ovr-" + command in proc.stdout


def test_layouts_are_read_from_every_section(tmp_path):
    """A parallel section anywhere in the config counts (e.g. one per model), and so does an engine's vLLM
    layout (tensor_parallel_size)."""
    config = tmp_path / "nested.yaml"
    config.write_text(yaml.safe_dump({"parallel": {"tensor_parallel": 2, "pipeline_parallel": 2},
                                      "critic": {"parallel": {"tensor_parallel": 2}},
                                      "engine": {"options": {"tensor_parallel_size": 4}}}))
    proc = submit("--dry-run", "--gpus-per-node", "8", "--", "sft", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    for line in ("parallel: TP 2 x PP 2 x DP 2", "critic.parallel: TP 2 x DP 4", "engine.options: TP 4 x DP 2"):
        assert line in proc.stdout
    bad = submit("--dry-run", "--gpus-per-node", "6", "--", "sft", "--config", str(config))
    assert bad.returncode == 2
    assert "not a multiple of TP 2 x PP 2 = 4" in bad.stderr and "not a multiple of TP 4 = 4" in bad.stderr


@pytest.mark.parametrize("args,messages", [
    (["--nodes", "3", "--gpus-per-node", "2", "--", "sft", "--config", SEVEN_B],
     ["--nodes 3 x 2 workers per node = 6 processes is not a multiple of TP 4 x PP 1 x CP 4 = 16",
      "node counts that fit: 8, 16, 24, 32"]),
    (["--nodes", "1", "--", "sft", "--config", TINY, "--set", "parallel.tensor_parallel=16"],
     ["not a multiple of TP 16 x PP 1 x CP 1 = 16"]),
    (["--", "stf", "--config", TINY], ["unknown megatron-ovr command 'stf': choose one of sft"]),
    (["--", "sft", "--config", "examples/cold_start/missing.yaml"], ["--config examples/cold_start/missing.yaml: no such file"]),
    (["--", "sft"], ["megatron-ovr sft needs --config FILE"]),
    (["--", "tools/no_such_tool.py"], ["tools/no_such_tool.py: no such script"]),
    (["--container-image", "/nonexistent/ovr.sqsh", "--", "sft", "--config", TINY],
     ["--container-image /nonexistent/ovr.sqsh: no such image file"]),
    (["--apptainer-image", "missing.sif", "--", "sft", "--config", TINY], ["--apptainer-image missing.sif: no such image file"]),
    (["--nodes", "0", "--", "sft", "--config", TINY], ["--nodes=0: must be at least 1"]),
])
def test_bad_input_is_refused_before_submitting(args, messages):
    proc = submit("--dry-run", *args)
    assert proc.returncode == 2, proc.stdout
    assert "nothing was submitted" in proc.stderr
    for message in messages:
        assert message in proc.stderr, proc.stderr
    assert "srun" not in proc.stdout


def test_without_a_cluster_a_real_submission_is_refused():
    proc = submit("--nodes", "1", "--", "sft", "--config", TINY)
    assert proc.returncode == 2
    assert "submit from a SLURM login node (or use --dry-run" in proc.stderr


def _readme_submit_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.replace("\\\n", " ").splitlines():
        if line.startswith("python examples/slurm/submit.py"):
            commands.append(shlex.split(line, comments=True)[2:])
    return commands


def test_readme_cluster_commands_pass_dry_run():
    commands = _readme_submit_commands()
    assert len(commands) >= 5
    for args in commands:
        proc = submit("--dry-run", *args)
        image = next((a for a in args if a.endswith((".sqsh", ".sif"))), None)
        if image is not None:  # the image files of the container examples do not exist here
            errors = [line for line in proc.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1 and f"{image}: no such image file" in errors[0], proc.stderr
        else:
            assert proc.returncode == 0, (args, proc.stderr)


def test_sbatch_script_header_and_syntax():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--requeue", "--open-mode=append", "--ntasks-per-node=1"):
        assert f"#SBATCH {option}" in header
    assert any(re.fullmatch(r"#SBATCH --signal=TERM@\d+", line) for line in header)
    assert any(line.startswith("#SBATCH --output=logs/%x-%j.log") for line in header)
    for script in (SBATCH, NODE_SCRIPT):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_sbatch_script_outside_an_allocation_says_so():
    proc = subprocess.run(["bash", str(SBATCH), "sft", "--config", TINY], env=no_cluster_env(), cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not inside a SLURM allocation" in proc.stderr
