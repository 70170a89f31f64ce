"""A real, throw-away Slurm cluster on loopback for tests: munged, slurmctld and two slurmd ("n1", "n2").

Everything (keys, sockets, state, spool, logs, pid files) lives in one temp folder; the daemons are
stopped by the pids in their pid files, never by name. Requires Debian's `slurmctld slurmd
slurm-client munge` (Slurm 22.05). See /work/shared/notes/slurm.md for the facts this relies on.

    with SlurmCluster() as cluster:
        job = cluster.sbatch(["--nodes=2", "slurm/train.sh", "--data", d], cwd=repo)
        info = cluster.wait(job, timeout=120)
        assert info.state == "COMPLETED"
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "sinfo",
    "squeue",
)
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# Job states after which a job will not run again by itself (requeued jobs go back to PENDING).
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# The test cluster's process tracking, and a real cluster's (Slurm's default KillWait is 30 s).
LINUXPROC_SETTINGS = ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "KillWait=10")
CGROUP_SETTINGS = (
    "ProctrackType=proctrack/cgroup",
    "TaskPlugin=task/cgroup,task/affinity",
    "KillWait=30",
)
CGROUP_CONF = (
    "CgroupPlugin=cgroup/v1",
    "CgroupMountpoint=/sys/fs/cgroup",
    "ConstrainCores=yes",
    "ConstrainRAMSpace=no",
    "ConstrainDevices=no",
)


def find_binary(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    for d in SBIN_DIRS:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def cgroup_v1_problem() -> str | None:
    """Why this machine cannot run the cgroup configuration (cgroup/v1 cpuset and freezer, as root),
    or None when it can."""
    if os.geteuid() != 0:
        return "proctrack/cgroup needs root"
    for controller in ("cpuset", "freezer"):
        folder = Path("/sys/fs/cgroup") / controller
        if not (folder / "cgroup.procs").is_file() or not os.access(folder, os.W_OK):
            return f"no writable cgroup v1 '{controller}' hierarchy at {folder} (Slurm 22.05's cgroup/v1 needs one)"
    return None


def missing_binaries() -> list[str]:
    """Names of the Slurm/munge programs that are not installed (empty when all are there)."""
    return [b for b in REQUIRED_BINARIES if find_binary(b) is None]


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class JobInfo:
    """The fields of `scontrol show job` that tests look at, plus the raw key=value map."""

    job_id: str
    state: str
    exit_code: str  # "rc:signal", as scontrol prints it, e.g. "0:0"
    restarts: int
    reason: str
    node_list: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def rc(self) -> int:
        return int(self.exit_code.split(":")[0])

    @property
    def signal(self) -> int:
        parts = self.exit_code.split(":")
        return int(parts[1]) if len(parts) > 1 else 0

    def __str__(self) -> str:
        return (
            f"job {self.job_id}: {self.state} exit={self.exit_code} restarts={self.restarts} "
            f"reason={self.reason} nodes={self.node_list}"
        )


def parse_scontrol_oneliner(text: str) -> dict[str, str]:
    """Parse `scontrol -o show job` output (space-separated key=value; values may not contain spaces,
    except Command=/WorkDir= etc. which we keep as best effort)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", text.strip()):
        out[m.group(1)] = m.group(2)
    return out


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """Start/stop a two-node Slurm on loopback. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        nodes: int = 2,
        cpus: int = 2,
        real_memory_mb: int = 2000,
        base: str | None = None,
        cgroup: bool = False,
    ):
        self.n_nodes = nodes
        self.cgroup = cgroup
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        # cgroup: ProctrackType=proctrack/cgroup, TaskPlugin=task/cgroup,task/affinity, KillWait=30 and
        # ConstrainCores, as real clusters run; `cpus` should then be the machine's real CPU count.
        # Short path: unix socket paths are limited to 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="slurm-", dir=base or "/tmp"))
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.first_job_id = random.randrange(1000, 1_000_000, 100)
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.munge_pidfile = self.root / "run" / "munged.pid"
        self.ctld_pidfile = self.root / "run" / "slurmctld.pid"
        self._started: list[tuple[str, Path]] = []  # (name, pid file) of daemons we started
        self.env: dict[str, str] = {}
        self._bins = {b: find_binary(b) for b in REQUIRED_BINARIES}

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        for sub in ("etc", "munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)  # munged insists the socket's folder is not writable by others

        user = _current_user()
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + self.n_nodes)
        self.ctld_port = ctld_port
        self.node_ports = node_ports
        r = self.root
        plugstack = r / "etc" / "plugstack.conf"
        plugstack.write_text("")  # isolate from /etc/slurm/plugstack.conf
        lines = [
            "ClusterName=caetest",
            # Job ids differ between clusters started side by side (train.sh derives ports from them).
            f"FirstJobId={self.first_job_id}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: the default 120 s delays a requeued job's restart by two minutes.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            f"PlugStackConfig={plugstack}",
            *(CGROUP_SETTINGS if self.cgroup else LINUXPROC_SETTINGS),
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay visible to scontrol for the whole test session
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.node_names, node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")
        if self.cgroup:
            (self.conf.parent / "cgroup.conf").write_text("\n".join(CGROUP_CONF) + "\n")

        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = str(self.conf)
        # Daemons and clients may live in sbin.
        path = env.get("PATH", "")
        for d in SBIN_DIRS:
            if d not in path.split(":"):
                path = f"{path}:{d}" if path else d
        env["PATH"] = path
        self.env = env

    def start(self, timeout: float = 60) -> None:
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"Slurm/munge programs not installed: {', '.join(missing)}")
        self._write_config()
        r = self.root
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self._daemon(
            "munged",
            [
                self._bins["munged"],
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.munge_pidfile}",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munge/munged.seed",
                "--force",
            ],
            self.munge_pidfile,
        )
        self._wait_for(lambda: self.munge_socket.exists(), 15, "munged socket")
        self._daemon("slurmctld", [self._bins["slurmctld"], "-i"], self.ctld_pidfile)
        for name in self.node_names:
            self._daemon(
                f"slurmd {name}", [self._bins["slurmd"], "-N", name], r / "run" / f"slurmd-{name}.pid"
            )
        self._wait_for(self._all_idle, timeout, "nodes idle")

    def _daemon(self, name: str, argv: list[str], pidfile: Path) -> None:
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise SlurmError(
                f"{name} failed to start (rc {res.returncode}): {res.stdout}{res.stderr}\n{self.logs()}"
            )
        self._wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 15, f"{name} pid file")
        self._started.append((name, pidfile))

    def _all_idle(self) -> bool:
        res = self.cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.node_names)

    def _wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then stop our daemons by pid (slurmd, slurmctld, munged), then clean up."""
        if self._started and any(n == "slurmctld" for n, _ in self._started):
            try:
                jobs = self.cmd(["squeue", "-h", "-o", "%i"], check=False, timeout=15).stdout.split()
                if jobs:
                    self.cmd(["scancel", *jobs], check=False, timeout=15)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        res = self.cmd(
                            ["squeue", "-h", "-t", "R,CG,CF,S", "-o", "%i"], check=False, timeout=15
                        )
                        if res.returncode == 0 and not res.stdout.strip():
                            break
                        time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        # Stop in reverse start order: slurmd's, slurmctld, munged.
        for _name, pidfile in reversed(self._started):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            _terminate(pid, timeout=15)
        self._started.clear()
        if self.cgroup:
            self._remove_cgroups()
        if os.environ.get("KEEP_SLURM_TMP"):
            print(f"[slurm_cluster] kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        """Remove the cgroups that our slurmd's leave behind (/sys/fs/cgroup/*/slurm_NODE), if empty."""
        for name in self.node_names:
            for top in Path("/sys/fs/cgroup").glob(f"*/slurm_{name}"):
                for folder, _, _ in os.walk(top, topdown=False):
                    # Kept while in use (a job of another cluster with the same node names).
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)

    # ---------------------------------------------------------------- client helpers
    def cmd(
        self, argv: list[str], check: bool = True, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        res = subprocess.run(
            argv, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed (rc {res.returncode}): {res.stdout}{res.stderr}")
        return res

    def job_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(self.env)
        if extra:
            env.update(extra)
        return env

    def sbatch(
        self, args: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
    ) -> str:
        """Submit with `sbatch --parsable ARGS`; returns the job id. env entries are added to self.env."""
        res = self.cmd(["sbatch", "--parsable", *args], env=self.job_env(env), cwd=cwd)
        job_id = res.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"unexpected sbatch output: {res.stdout!r}")
        return job_id

    def info(self, job_id: str) -> JobInfo:
        res = self.cmd(["scontrol", "-o", "show", "job", str(job_id)])
        f = parse_scontrol_oneliner(res.stdout.splitlines()[0])
        return JobInfo(
            job_id=str(job_id),
            state=f.get("JobState", "?"),
            exit_code=f.get("ExitCode", "?:?"),
            restarts=int(f.get("Restarts", "0") or 0),
            reason=f.get("Reason", ""),
            node_list=f.get("NodeList", ""),
            fields=f,
        )

    def wait(self, job_id: str, timeout: float, states: set[str] | None = None, poll: float = 0.5) -> JobInfo:
        """Poll `scontrol show job` until the job reaches one of `states` (default: a terminal state).
        Raises TimeoutError (with the last info and daemon logs) after `timeout` seconds."""
        states = states or TERMINAL_STATES
        deadline = time.monotonic() + timeout
        info = None
        while True:
            info = self.info(job_id)
            if info.state in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{info} did not reach {sorted(states)} within {timeout:.0f}s\n{self.logs()}"
                )
            time.sleep(poll)

    def scancel(self, *args: str) -> None:
        self.cmd(["scancel", *args])


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM pid, wait up to timeout for it to exit, then SIGKILL."""
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
