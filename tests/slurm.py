"""A one-node SLURM cluster of its own for the tests of `cyclegan sweep` (README: A sweep on a
SLURM cluster): munged with its own key and socket, slurmctld and slurmd on free 127.0.0.1 ports,
everything (config, state, spool, logs) in a temp folder.

Debian's slurm-wlm and munge (`.ci/run` installs them); no cgroups (proctrack/linuxproc,
task/none), no accounting database. slurmd launches jobs as their user, so it runs as root; the
tests skip without root or without the packages. Commands reach this cluster through SLURM_CONF,
which `Cluster.env()` sets. On exit every job is cancelled and the daemons stop (SIGTERM, then
SIGKILL), also when the test fails; job processes still alive after that are killed by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import pytest

from helpers import wait_for
from servers import free_ports, server_process

SBIN = ("/usr/sbin", "/usr/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
NODE = "cyclegan-test-node"
PARTITION = "test"


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


@dataclass(frozen=True)
class Cluster:
    folder: Path
    conf: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) pointed at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([_find(cmd[0]) or cmd[0], *cmd[1:]], env=self.env(), capture_output=True, text=True,
                              timeout=60)
        assert not check or proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
        return proc

    def states(self, job: str) -> dict[str, str]:
        """Array task id -> state (PENDING, RUNNING, COMPLETED, FAILED, ...) of job `job`'s tasks.

        Finished tasks stay listed for MinJobAge (an hour here): no accounting database is needed."""
        out = self.run("squeue", "--noheader", "--states=all", "--array", f"--jobs={job}", "--format=%K %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("log/*.log")))


def slurm_conf(folder: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    return f"""ClusterName=cyclegantest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={folder / 'munge' / 'munge.sock'}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}
SlurmdLogFile={folder / 'log' / 'slurmd.log'}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=5
NodeName={NODE} NodeHostname={os.uname().nodename} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _processes_of(conf: Path) -> list[int]:
    """Pids whose environment points at `conf`: this cluster's jobs (and the test's own commands)."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@contextmanager
def slurm_cluster(cpus: int = 2) -> Iterator[Cluster]:
    missing = [name for name in DAEMONS + CLIENTS if _find(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): `.ci/run` installs Debian's "
                    f"slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd starts jobs as their user, so the test cluster runs as root; run the tests as root")
    # Not under pytest's tmp folders: munged wants every folder above its socket open to all.
    folder = Path(tempfile.mkdtemp(prefix="cyclegan-slurm-"))
    folder.chmod(0o755)
    for name in ("munge", "state", "spool", "log"):
        (folder / name).mkdir(mode=0o755)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, *free_ports(2), cpus))
    cluster = Cluster(folder, conf)
    munge = folder / "munge"
    try:
        with ExitStack() as stack:
            munged = stack.enter_context(server_process(
                [_find("munged"), "--foreground", f"--socket={munge / 'munge.sock'}", f"--key-file={key}",
                 f"--pid-file={munge / 'munged.pid'}", f"--log-file={folder / 'log' / 'munged.log'}",
                 f"--seed-file={munge / 'munged.seed'}"], folder / "log" / "munged.out.log"))
            wait_for(lambda: munged.poll() is not None or (munge / "munge.sock").exists(), 30, "munged's socket",
                     poll=0.1)
            assert munged.poll() is None, cluster.log()
            for daemon, extra in (("slurmctld", []), ("slurmd", ["-N", NODE])):
                proc = stack.enter_context(server_process(
                    [_find(daemon), "-D", "-f", str(conf), *extra], folder / "log" / f"{daemon}.out.log",
                    env=cluster.env()))
                assert proc.poll() is None, cluster.log()
            # Cancelled before the daemons stop (ExitStack unwinds in reverse): slurmd ends the job steps.
            stack.callback(_cancel_jobs, cluster)

            def idle() -> bool:
                out = cluster.run("sinfo", "--noheader", "--format=%T", check=False)
                return out.returncode == 0 and out.stdout.strip() == "idle"

            wait_for(idle, 60, f"the SLURM node to be idle (logs in {folder / 'log'})", poll=0.5)
            yield cluster
    finally:
        for pid in _processes_of(conf):  # job processes that outlived slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def _cancel_jobs(cluster: Cluster) -> None:
    cluster.run("scancel", f"--partition={PARTITION}", check=False)
    try:
        wait_for(lambda: not cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.strip(), 30,
                 "the cancelled jobs to end", poll=0.5)
    except pytest.fail.Exception:
        pass  # the daemons stop now all the same; leftover job processes are killed by pid
