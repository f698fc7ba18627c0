"""A real single-node SLURM cluster on this machine, for the launcher tests.

    python -m tests.integration.slurm.harness          # start it, print the environment, wait for Ctrl-C
    # in another shell: export SLURM_CONF=<printed path>; sinfo; sbatch ...

Installs Debian's ``slurmctld slurmd munge slurm-client`` with apt-get when they are missing, writes a
minimal ``slurm.conf`` (one node = this machine, proctrack/linuxproc, task/none, JobRequeue=1, state and
spool in a temporary directory, free ports), starts a private ``munged`` (own key and socket) and
``slurmctld``/``slurmd`` in the foreground as child processes with their logs in the temporary
directory, and waits until ``sinfo`` shows the node idle. :meth:`SlurmCluster.stop` cancels the jobs and
stops every daemon it started, by pid. Nothing is written under /etc: clients find the cluster through
the ``SLURM_CONF`` variable of :meth:`SlurmCluster.env`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mico_ds.distributed.launch import free_port

PACKAGES = ["slurmctld", "slurmd", "munge", "slurm-client"]
BINARIES = ["slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel"]
SBIN = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]


class SlurmUnavailable(RuntimeError):
    """apt-get itself is missing: SLURM cannot be installed here."""


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def install(timeout: float = 900) -> None:
    """apt-get install the Debian packages when a binary is missing (needs root)."""
    if not missing_binaries():
        return
    if which("apt-get") is None:
        raise SlurmUnavailable(
            f"apt-get is not available to install {PACKAGES} (missing {missing_binaries()})"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
    if missing_binaries():
        raise RuntimeError(f"installed {PACKAGES} but still missing {missing_binaries()}")


def real_memory_mb(margin_mb: int = 1024) -> int:
    """MemTotal minus a margin: slurmd drains a node that reports less than RealMemory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(256, int(line.split()[1]) // 1024 - margin_mb)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def first_job_id() -> int:
    """A random first job id whose rendezvous port is free.

    launch/slurm_pretrain.sh derives MASTER_PORT = 20000 + job id mod 20000, so two private clusters
    that both started at job 1 (tests running at once on one machine) would share a port.
    """
    rng = random.Random()
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        # Below the kernel's ephemeral range (32768 by default): a port there can be taken by any
        # outgoing connection between this check and the job's rendezvous.
        jid = rng.randrange(1000, max(1001, min(19000, low - 20000)))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + jid))
                return jid
            except OSError:
                continue
    return 1


SLURM_CONF = """\
ClusterName=micotest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobRequeue=1
FirstJobId={first_job_id}
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
KillWait=20
MinJobAge=600
InactiveLimit=0
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    """One slurmctld + one slurmd (+ a private munged) in a temporary directory."""

    def __init__(self, root: Path | None = None, cpus: int | None = None) -> None:
        self.tmp = Path(root or tempfile.mkdtemp(prefix="mico-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.tmp / "slurm.conf"
        self.munge_socket = self.tmp / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at = 0.0

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF and the sbin directories on PATH."""
        path = os.environ.get("PATH", "")
        extra = [d for d in SBIN if d not in path.split(os.pathsep)]
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=os.pathsep.join([path, *extra]))

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env(), capture_output=True, text=True, check=check, timeout=timeout
        )

    # ------------------------------------------------------------------ start / stop
    def write_config(self) -> None:
        for d in ("state", "spool", "munge"):
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        for d in (self.tmp, self.tmp / "munge"):
            os.chmod(d, 0o755)  # munged wants the socket path searchable by all
        text = SLURM_CONF.format(
            host=self.host,
            tmp=self.tmp,
            ctld_port=free_port(""),
            d_port=free_port(""),
            munge_socket=self.munge_socket,
            cpus=self.cpus,
            mem=real_memory_mb(),
            first_job_id=first_job_id(),
        )
        self.conf.write_text(text)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.tmp / f"{name}.out", "ab")  # noqa: SIM115 - the daemon owns it until stop()
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )

    def start_munge(self) -> None:
        key = self.tmp / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn(
            "munged",
            [
                which("munged") or "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.tmp / 'munge' / 'munged.pid'}",
                f"--log-file={self.tmp / 'munged.log'}",
                f"--seed-file={self.tmp / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 30, "munged socket")

    def start(self, timeout: float = 120) -> SlurmCluster:
        """Install if needed, configure, start munged/slurmctld/slurmd, wait for an idle node."""
        install()
        self.write_config()
        self.started_at = time.time()
        try:
            self.start_munge()
            self._spawn("slurmctld", [which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(
                lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout, "slurmctld"
            )
            self._spawn("slurmd", [which("slurmd") or "slurmd", "-D", "-f", str(self.conf), "-N", self.host])
            self._wait(lambda: self.node_state() == "idle", timeout, "an idle node in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def node_state(self) -> str:
        r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return r.stdout.strip().lower().rstrip("*~#$@")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"SLURM daemon(s) exited {dead} while waiting for {what}\n{self.logs()}")
            try:
                if ok():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.tmp.glob("*.log")) + sorted(self.tmp.glob("*.out")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def job_steps(self) -> list[int]:
        """slurmstepd processes started by our slurmd (they outlive it if it is killed first)."""
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if (p / "comm").read_text().strip() != "slurmstepd":
                    continue
                env = (p / "environ").read_bytes()
            except OSError:
                continue
            if f"SLURM_CONF={self.conf}".encode() in env or str(self.tmp).encode() in env:
                pids.append(int(p.name))
        return pids

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons we started (TERM, then KILL), by pid."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--partition=test", check=False, timeout=20)
                deadline = time.time() + 30
                while time.time() < deadline:
                    if not self.run("squeue", "-h", check=False, timeout=20).stdout.strip():
                        break
                    time.sleep(1)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for pid in self.job_steps():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def main() -> None:
    c = SlurmCluster()
    c.start()
    print(f"SLURM is up: export SLURM_CONF={c.conf}   (logs in {c.tmp}); Ctrl-C or kill stops it", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a background process has SIGINT ignored: TERM works too

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":
    main()
