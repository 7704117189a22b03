"""A real SLURM cluster on this host, for the launch tests (DESIGN §3c): munged, slurmctld and one slurmd
per node, every file under one temporary directory, every daemon stopped by PID.

    with SlurmCluster(nodes=2) as cluster:
        job = cluster.sbatch("examples/slurm/megatron_ovr.sbatch", "sft", "--config", ...)
        cluster.wait(job)

Needs root (slurmd starts job steps as the submitting user) and Debian's ``slurmctld slurmd slurm-client
munge``; :func:`unavailable_reason` says why a cluster cannot start, for ``pytest.skip``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
PACKAGES = "slurmctld slurmd slurm-client munge"


def _find(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    missing = [name for name in DAEMONS if _find(name) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): as root, "
                f"apt-get install -y --no-install-recommends {PACKAGES} (.ci/run does this)")
    if os.geteuid() != 0:
        return "a SLURM cluster needs root here (slurmd runs job steps as the submitting user)"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (install the munge package)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_names(count: int) -> list[str]:
    """Names that resolve to this host (c10d rendezvous resolves them; made-up names fail)."""
    names = [socket.gethostname().split(".")[0], "localhost"]
    names = list(dict.fromkeys(names))
    if len(names) < count:
        raise RuntimeError(f"need {count} distinct names for this host, have {names}")
    return names[:count]


class SlurmCluster:
    def __init__(self, nodes: int = 1, *, root: str | Path | None = None, cpus: int | None = None):
        self.names = node_names(nodes)
        self.cpus = cpus or os.cpu_count() or 1
        # Not under pytest's tmp dir: munged (user munge) cannot enter its 0700 parents.
        self.owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="megatron-ovr-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- start / stop --------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_find("slurmctld"), "-D", "-f", str(self.conf)])
            for name in self.names:
                self._spawn(f"slurmd-{name}", [_find("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        import pwd

        munge = pwd.getpwnam("munge")
        self.root.chmod(0o755)  # munged (user munge) must reach its directory
        mdir = self.root / "munge"
        mdir.mkdir()
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        mdir.chmod(0o755)  # clients (root, job users) must reach the socket
        self.munge_socket = mdir / "munge.socket"
        self._spawn("munged", [
            _find("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ], user=munge.pw_uid, group=munge.pw_gid)
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        for sub in ("state", "log", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        for name in self.names:
            (self.root / "spool" / name).mkdir()
        ctld_port = _free_port()
        lines = [
            "ClusterName=megatron-ovr-test",
            f"SlurmctldHost={self.names[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job waits cred_expire seconds before it may start again (default 120).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=60",
            "SchedulerParameters=sched_interval=1",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
        ]
        for name in self.names:
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        with open(self.root / f"{name}.out", "w") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True, **kwargs)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): {self.daemon_log(name)[-3000:]}")

    def daemon_log(self, name: str) -> str:
        parts = [(self.root / f"{name}.out")]
        if name == "slurmctld":
            parts.append(self.root / "log" / "slurmctld.log")
        elif name.startswith("slurmd-"):
            parts.append(self.root / "log" / f"slurmd-{name[len('slurmd-'):]}.log")
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while True:
            self._check_alive()
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if len(states) == len(self.names) and all(s == "idle" for s in states.values()):
                return
            if time.time() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout} s: {states}\n{self.daemon_log('slurmctld')[-3000:]}")
            time.sleep(0.2)

    def stop(self, *, keep_files: bool = False) -> None:
        """Stops every daemon this cluster started, by PID (slurmd first, munged last), then removes the
        cluster's directory (unless ``keep_files`` or the caller gave it)."""
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.owns_root and not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- client commands -----------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def state(self, job_id: str) -> str | None:
        """The job's state (PENDING, RUNNING, ...), or None once it has left the queue."""
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()
        return out or None

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.5) -> None:
        deadline = time.time() + timeout
        while self.state(job_id) is not None:
            self._check_alive()
            if time.time() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still queued after {timeout} s")
            time.sleep(poll)

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...); kept MinJobAge
        (300 s) after the job ends."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout.strip()
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def job_ids(self) -> set[str]:
        """Every job the controller knows (queued, running, or recently ended)."""
        return set(self.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())
