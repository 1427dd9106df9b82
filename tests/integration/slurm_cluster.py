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
    """None when this machine can run the cluster (installing SLURM and munge from the
    distribution if missing), else why not: no root (the daemons, and installing them, need it)
    or no apt-get. The test is then skipped with that reason. An installation that fails where it
    should work (CI is root with apt) raises."""
    if os.geteuid() != 0:
        return "a SLURM cluster (slurmctld, slurmd and munged, and installing them) needs root"
    if all(os.access(daemon, os.X_OK) for daemon in DAEMONS) and shutil.which("sbatch"):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and this system has no apt-get to install slurm-wlm and munge"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:  # stale or empty package lists (a fresh CI image)
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}")
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, timeout: float) -> bool:
    """Whether ``check()`` came true within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


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
        if not _wait(self.socket.exists, 20):
            raise RuntimeError(f"munged did not start (log: {self.munge_dir}/munged.log)")
        self._daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._daemon(["/usr/sbin/slurmd", "-D", "-f", str(self.conf)], "slurmd")
        if not _wait(lambda: self.node_state() == "IDLE", 60):
            raise RuntimeError(f"node {self.node} did not become idle (logs in {self.root})")

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
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...). Asked up to three
        times: on a loaded machine scontrol now and then loses its connection (SIGPIPE)."""
        for _ in range(3):
            done = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                                  text=True, timeout=60)
            if done.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", done.stdout))
            time.sleep(1)
        raise RuntimeError(f"scontrol show job {job_id} failed ({done.returncode}): {done.stderr.strip()}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons (slurmd before slurmctld, munged last) and anything
        of a job left over; whatever happened before."""
        if self.daemons:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=60)
            _wait(lambda: not self.job_processes(), 20)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self.daemons.clear()
        for process in self.job_processes():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def job_processes(self, job_id: str | None = None) -> list[psutil.Process]:
        """Live processes of this cluster's jobs (of ``job_id`` only, if given), found by their
        environment (SLURM_CONF and SLURM_JOB_ID): everything a job started, the helpers of its
        ranks included."""
        found = []
        for process in psutil.process_iter():
            try:
                env = process.environ()
                if process.status() == psutil.STATUS_ZOMBIE or env.get("SLURM_CONF") != str(self.conf):
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "SLURM_JOB_ID" in env and job_id in (None, env["SLURM_JOB_ID"]):
                found.append(process)
        return found
