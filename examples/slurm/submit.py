#!/usr/bin/env python3
"""Checks a megatron-ovr SLURM job before it is queued, then submits examples/slurm/megatron_ovr.sbatch.

    python examples/slurm/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        -- sft --config examples/cold_start/qwen2_5_vl_7b.yaml --set train_steps=3000
    python examples/slurm/submit.py --nodes 1 --gpus-per-node 0 --nproc-per-node 2 --partition debug \\
        -- sft --config examples/cold_start/tiny.yaml           # the tiny CPU config (gloo)
    python examples/slurm/submit.py --nodes 1 --gpus-per-node 8 --partition gpu --dry-run \\
        -- tools/convert_hf_to_megatron.py --hf-dir HF --out CKPT --tp 4 --pp 2

Everything after ``--`` is the command each node's torchrun runs: a ``megatron-ovr`` subcommand (sft, ppo,
eval, ...) or a tool script (``tools/*.py``). Before anything is submitted this checks, and reports every
problem found in one message (exit code 2):
  - the command: a known subcommand or an existing script, and its ``--config`` file (with ``--set``);
  - the layout: nodes x workers per node must be a multiple of TP x PP x CP from the config's ``parallel``
    section(s) (or a tool's ``--tp/--pp/--cp``); the rest is data parallelism;
  - the partition: exists (or the cluster has a default one) and has enough nodes;
  - the container image: an image file that exists (pyxis/enroot or Apptainer), and srun's pyxis plugin;
and finally lets ``sbatch --test-only`` validate the options against the cluster. ``--dry-run`` prints the
sbatch command and the resolved per-node srun/torchrun line instead of submitting. Standard library and
PyYAML only: it runs on a login node without torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SBATCH_SCRIPT = Path(__file__).resolve().with_name("megatron_ovr.sbatch")
IMAGE_SUFFIXES = (".sqsh", ".squashfs", ".sif", ".tar")
# The subcommands of megatron_ovr/cli.py, when it cannot be imported on this machine.
FALLBACK_SUBCOMMANDS = ("sft", "ppo", "eval")


class Problems(list):
    def add(self, message: str) -> None:
        self.append(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    else:
        command = []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [options] -- <sft|ppo|eval|tools/SCRIPT.py> [args...]")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node to request (default: 8; 0 for CPU-only nodes: gloo)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="workers per node (default: --gpus-per-node, or 1 when it is 0)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--time", default=None, help="time limit, e.g. 04:00:00 (default: the partition's)")
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--job-name", default=None, help="default: ovr-<command>")
    parser.add_argument("--log-dir", default="logs", help="one log per job: LOG_DIR/<job-name>-<job id>.log")
    parser.add_argument("--save-seconds", type=int, default=300,
                        help="SIGTERM this long before the time limit (--signal=TERM@N); torchrun gives the "
                             "workers as long to finish their checkpoint (default: 300)")
    parser.add_argument("--port", type=int, default=None,
                        help="c10d rendezvous port on the first node (default: a free port there, found when the "
                             "job starts)")
    parser.add_argument("--container-image", default=None,
                        help="run in this image through pyxis/enroot: a .sqsh file (must exist) or a registry "
                             "reference such as nvcr.io#nvidia/pytorch:25.09-py3")
    parser.add_argument("--apptainer-image", default=None,
                        help="or run in this Apptainer/Singularity .sif image (apptainer exec --nv on each node)")
    parser.add_argument("--container-mounts", default=None,
                        help="SRC:DST[,SRC:DST...] mounted in the container (default: the current directory at "
                             "the same path)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch option, e.g. --sbatch-arg=--exclude=node7 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the resolved lines; submit nothing")
    args = parser.parse_args(argv)
    if not command:
        parser.error("give the command after --, e.g. -- sft --config examples/cold_start/tiny.yaml")
    if args.nproc_per_node is None:
        args.nproc_per_node = args.gpus_per_node or 1
    args.job_name = args.job_name or "ovr-" + Path(command[0]).stem
    return args, command


# ---- the command and its parallel layout -----------------------------------------------------------------

def _known_subcommands() -> tuple[str, ...]:
    try:
        from megatron_ovr.cli import COMMANDS
    except ImportError:
        return FALLBACK_SUBCOMMANDS
    return tuple(COMMANDS)


def _option_values(args: list[str], name: str) -> list[str]:
    """Values of ``--name VALUE`` and ``--name=VALUE`` in a command line."""
    values = []
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg[len(name) + 1:])
    return values


def _load_config(path: str, overrides: list[str], problems: Problems) -> dict | None:
    import yaml

    if not Path(path).is_file():
        problems.add(f"--config {path}: no such file (relative paths are read from {os.getcwd()}, "
                     f"where the job starts)")
        return None
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        problems.add(f"--config {path}: not valid YAML: {err}")
        return None
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            problems.add(f"--set {override!r}: must look like section.key=value")
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = yaml.safe_load(raw)
    return data


# Layout keys: ours (parallel sections of the training configs) and vLLM's (an engine's options).
LAYOUT_KEYS = {"tensor_parallel": "TP", "pipeline_parallel": "PP", "context_parallel": "CP",
               "tensor_parallel_size": "TP", "pipeline_parallel_size": "PP"}


def _parallel_sections(data, path: str = "") -> list[tuple[str, dict]]:
    """Every mapping that holds a parallel layout (``parallel:``, ``actor.parallel:``, ``engine.options:``)."""
    found = []
    if isinstance(data, dict):
        if any(k in data for k in LAYOUT_KEYS):
            found.append((path or "<top level>", data))
        for key, value in data.items():
            found += _parallel_sections(value, f"{path}.{key}" if path else str(key))
    return found


def command_layouts(command: list[str], problems: Problems) -> list[tuple[str, int, str]]:
    """(where, TP x PP x CP, explanation) for each layout the command asks for; checks the command."""
    entry, rest = command[0], command[1:]
    if entry.endswith(".py"):
        if not Path(entry).is_file():
            problems.add(f"{entry}: no such script (relative paths are read from {os.getcwd()})")
        sizes = {}
        for flag in ("--tp", "--pp", "--cp"):
            values = _option_values(rest, flag)
            try:
                sizes[flag] = int(values[-1]) if values else 1
            except ValueError:
                problems.add(f"{entry} {flag} {values[-1]!r}: not an integer")
                sizes[flag] = 1
        product = sizes["--tp"] * sizes["--pp"] * sizes["--cp"]
        return [(entry, product, f"--tp {sizes['--tp']} x --pp {sizes['--pp']} x --cp {sizes['--cp']}")]
    known = _known_subcommands()
    if entry not in known:
        problems.add(f"unknown megatron-ovr command {entry!r}: choose one of {', '.join(known)}, "
                     f"or give a tool script (tools/NAME.py)")
        return []
    configs = _option_values(rest, "--config")
    if not configs:
        problems.add(f"megatron-ovr {entry} needs --config FILE")
        return []
    data = _load_config(configs[-1], _option_values(rest, "--set"), problems)
    layouts = []
    for where, section in _parallel_sections(data):
        sizes = {key: section[key] for key in LAYOUT_KEYS if key in section}
        try:
            product = 1
            for value in sizes.values():
                product *= int(value or 1)
        except (TypeError, ValueError):
            problems.add(f"{configs[-1]}: {where} has a non-integer parallel size: {sizes}")
            continue
        explained = " x ".join(f"{LAYOUT_KEYS[k]} {int(v or 1)}" for k, v in sizes.items())
        layouts.append((f"{configs[-1]}: {where}", product, explained))
    if data is not None and not layouts:
        layouts.append((f"{configs[-1]} (no parallel section)", 1, "TP 1 x PP 1"))
    return layouts


def check_layout(args: argparse.Namespace, layouts, problems: Problems) -> list[str]:
    world = args.nodes * args.nproc_per_node
    notes = []
    for where, model_parallel, explained in layouts:
        if world % model_parallel:
            fits = [n for n in range(1, 65) if (n * args.nproc_per_node) % model_parallel == 0][:4]
            hint = f"node counts that fit: {', '.join(map(str, fits))}, ..." if fits else \
                f"no node count fits {args.nproc_per_node} workers per node"
            problems.add(f"--nodes {args.nodes} x {args.nproc_per_node} workers per node = {world} processes is not "
                         f"a multiple of {explained} = {model_parallel} ({where}); {hint}")
        else:
            notes.append(f"{where}: {explained} x DP {world // model_parallel} = {world} processes")
    return notes


# ---- the cluster -------------------------------------------------------------------------------------

def cluster_partitions(problems: Problems, dry_run: bool, notes: list[str]) -> dict[str, int] | None:
    """{partition: node count} from sinfo (the default one marked ``*``), or None when no cluster answers:
    an error, except with --dry-run, where the cluster checks are skipped with a note."""
    why = None
    if shutil.which("sinfo") is None:
        why = "sinfo not found"
    else:
        try:
            proc = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            why = "sinfo did not answer within 30 s"
        else:
            if proc.returncode != 0:
                why = f"sinfo failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    if why is not None:
        if dry_run:
            notes.append(f"partition and pyxis not checked: no SLURM cluster answers here ({why})")
        else:
            problems.add(f"{why}: submit from a SLURM login node (or use --dry-run to see the lines)")
        return None
    nodes: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        if line.strip():
            name, count = line.split()
            nodes[name] = nodes.get(name, 0) + int(count)
    return nodes


def check_partition(args: argparse.Namespace, partitions: dict[str, int], problems: Problems) -> None:
    default = next((name[:-1] for name in partitions if name.endswith("*")), None)
    nodes = {name.rstrip("*"): count for name, count in partitions.items()}
    partition = args.partition or default
    if partition is None:
        problems.add(f"no --partition given and the cluster has no default partition: choose one of "
                     f"{', '.join(sorted(nodes))}")
    elif partition not in nodes:
        problems.add(f"--partition {partition}: no such partition; this cluster has {', '.join(sorted(nodes))}")
    elif nodes[partition] < args.nodes:
        problems.add(f"--nodes {args.nodes}: partition {partition} has only {nodes[partition]} node(s)")


def check_container(args: argparse.Namespace, cluster: bool, problems: Problems) -> None:
    if args.apptainer_image is not None:
        if args.container_image is not None:
            problems.add("--container-image (pyxis) and --apptainer-image: choose one")
        if not Path(args.apptainer_image).expanduser().is_file():
            problems.add(f"--apptainer-image {args.apptainer_image}: no such image file (build one with "
                         f"`apptainer build megatron-ovr.sif docker-daemon://megatron-ovr:latest`)")
    image = args.container_image
    if image is None:
        return
    looks_like_file = image.startswith(("/", "./", "../", "~")) or image.endswith(IMAGE_SUFFIXES)
    if looks_like_file and not Path(image).expanduser().is_file():
        problems.add(f"--container-image {image}: no such image file (build one with `enroot import "
                     f"docker://...` and `enroot export`, or give a registry reference such as "
                     f"nvcr.io#nvidia/pytorch:25.09-py3)")
    if cluster and shutil.which("srun") is not None:
        help_text = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=30).stdout
        if "--container-image" not in help_text:
            problems.add("--container-image: this cluster's srun has no --container-image option (the pyxis "
                         "plugin is not installed); run without a container, or see README 'Running on a cluster'")


# ---- submission --------------------------------------------------------------------------------------

def sbatch_command(args: argparse.Namespace, command: list[str]) -> list[str]:
    cmd = ["sbatch", f"--nodes={args.nodes}", f"--job-name={args.job_name}",
           f"--output={args.log_dir}/%x-%j.log", f"--signal=TERM@{args.save_seconds}"]
    for flag in ("partition", "time", "account", "qos"):
        if getattr(args, flag):
            cmd.append(f"--{flag}={getattr(args, flag)}")
    if args.gpus_per_node > 0:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    return cmd + args.sbatch_arg + [str(SBATCH_SCRIPT), *command]


def job_environment(args: argparse.Namespace) -> dict[str, str]:
    env = {"OVR_NPROC_PER_NODE": str(args.nproc_per_node), "OVR_SAVE_SECONDS": str(args.save_seconds)}
    if args.port is not None:
        env["OVR_PORT"] = str(args.port)
    if args.container_image:
        env["OVR_CONTAINER_IMAGE"] = args.container_image
    if args.apptainer_image:
        env["OVR_APPTAINER_IMAGE"] = str(Path(args.apptainer_image).expanduser().resolve())
    if args.container_image or args.apptainer_image:
        env["OVR_CONTAINER_MOUNTS"] = args.container_mounts or f"{os.getcwd()}:{os.getcwd()}"
    return env


def resolved_step(args: argparse.Namespace, command: list[str], env: dict[str, str]) -> str:
    """The per-node srun/torchrun line, as the sbatch script itself resolves it (its dry-run mode)."""
    planned = dict(os.environ, **env, OVR_DRY_RUN="1", SLURM_NNODES=str(args.nodes), SLURM_JOB_ID="JOB_ID")
    planned.pop("SLURM_CPUS_ON_NODE", None)
    proc = subprocess.run(["bash", str(SBATCH_SCRIPT), *command], env=planned, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{SBATCH_SCRIPT} --dry-run failed: {proc.stderr}")
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    problems = Problems()
    for flag in ("nodes", "nproc_per_node", "save_seconds"):
        if getattr(args, flag) < 1:
            problems.add(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be at least 1")
    if args.gpus_per_node < 0:
        problems.add(f"--gpus-per-node={args.gpus_per_node}: must be 0 (CPU) or more")
    notes = check_layout(args, command_layouts(command, problems), problems)
    partitions = cluster_partitions(problems, args.dry_run, notes)
    if partitions is not None:
        check_partition(args, partitions, problems)
    check_container(args, partitions is not None, problems)
    cmd = sbatch_command(args, command)
    env = job_environment(args)
    if not problems and not args.dry_run:
        # SLURM's own check of every option against the cluster (time format, GPUs, account, ...).
        test = subprocess.run([cmd[0], "--test-only", *cmd[1:]], capture_output=True, text=True,
                              env=dict(os.environ, **env), timeout=60)
        if test.returncode != 0:
            problems.add(f"sbatch --test-only rejected the job: {test.stderr.strip() or test.stdout.strip()}")
    if problems:
        print("megatron-ovr submit: nothing was submitted:", file=sys.stderr)
        for problem in problems:
            print(f"  error: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("# layout")
        for line in notes:
            print(f"#   {line}")
        print("# submit (environment, then sbatch):")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " \\\n  " + shlex.join(cmd))
        print("# each node runs (FIRST_NODE: the allocation's first host; PORT: a free port there; "
              "NODE_WRAPPER: the script's preemption wrapper):")
        print(resolved_step(args, command, env))
        return 0
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        print(f"log: {args.log_dir}/{args.job_name}-<job id>.log")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
