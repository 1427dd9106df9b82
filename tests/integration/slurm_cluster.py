"""A one-node SLURM cluster in a temporary directory, for tests that submit the project's sbatch
script: Debian's slurm-wlm and munge (installed on first use when running as root), a private
munged, slurmctld and slurmd on free ports, all stopped again by `Cluster.stop`."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"]


def install_reason() -> str | None:
    """Install SLURM and munge from the distribution if missing; None when they are there, else
    why this machine cannot have them (no root, no apt-get: the test is skipped with that reason).
    An installation that fails where it should work (CI is root with apt) raises."""
    if all(os.access(daemon, os.X_OK) for daemon in DAEMONS) and shutil.which("sbatch"):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it (apt-get install slurm-wlm munge) needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and this system has no apt-get to install slurm-wlm and munge"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # stale or empty package lists (a fresh CI image)
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}")
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_quietly(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _wait(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


class Cluster:
    """slurmctld + slurmd for this machine as one node (all its CPUs, 90% of its memory), one
    partition; ``env`` points the SLURM commands at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.daemons: list[subprocess.Popen] = []
        munge = pwd.getpwnam("munge")
        root.chmod(0o755)  # munged, running as munge, checks every directory above its socket
        self.munge_dir = root / "munge"
        self.munge_dir.mkdir()
        self.munge_dir.chmod(0o755)  # clients need to reach the socket
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.socket = self.munge_dir / "munge.socket"
        memory = psutil.virtual_memory().total // 2**20 * 9 // 10
        (root / "state").mkdir()
        (root / "spool").mkdir()
        self.conf = root / "slurm.conf"
        self.conf.write_text(f"""\
ClusterName=moh-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> None:
        """munged (as the munge user), then slurmctld and slurmd; returns once the node is idle."""
        munged = ["/usr/sbin/munged", "--foreground", f"--socket={self.socket}",
                  f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={self.munge_dir}/munged.log",
                  f"--seed-file={self.munge_dir}/munged.seed"]
        self._daemon(munged, "munged", user="munge")
        _wait(self.socket.exists, "munged's socket appearing", 20)
        self._daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._daemon(["/usr/sbin/slurmd", "-D", "-f", str(self.conf)], "slurmd")
        _wait(lambda: self.node_state() == "IDLE", f"node {self.node} becoming idle (logs in {self.root})", 60)

    def _daemon(self, command: list[str], name: str, user: str | None = None) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, user=user, group=user,
                                             extra_groups=[] if user else None))
        log.close()

    def run(self, *command: str) -> str:
        """A SLURM command against this cluster; its stdout."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True, timeout=60).stdout

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-n", self.node, "-o", "%T").strip().upper()
        except subprocess.SubprocessError:
            return ""

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def stop(self) -> None:
        """Cancel every job, stop the daemons (slurmd before slurmctld, munged last) and anything
        of a job left over; whatever happened before."""
        if self.daemons:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=60)
            _wait_quietly(lambda: not self.job_processes(), 20)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self.daemons.clear()
        for process in self.job_processes() + self._of_this_cluster("slurmstepd"):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def _of_this_cluster(self, name: str | None = None) -> list[psutil.Process]:
        """Live processes started with this cluster's SLURM_CONF (named ``name``, if given)."""
        found = []
        for process in psutil.process_iter(["name"]):
            try:
                if name is not None and process.info["name"] != name:
                    continue
                if process.status() != psutil.STATUS_ZOMBIE and process.environ().get("SLURM_CONF") == str(self.conf):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def job_processes(self, job_id: str | None = None) -> list[psutil.Process]:
        """Live processes of this cluster's jobs (of ``job_id`` only, if given), found by their
        environment: everything a job started, the helpers of its ranks included."""
        found = []
        for process in self._of_this_cluster():
            try:
                job = process.environ().get("SLURM_JOB_ID")
            except psutil.NoSuchProcess:
                continue
            if job is not None and job_id in (None, job):
                found.append(process)
        return found
