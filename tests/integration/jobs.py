"""Whole training jobs as a scheduler sees them: pretrain_moh.py under torchrun in its own session,
its log read while it runs, its process tree signalled at once, and what it leaves behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
# megatron's log line of one training iteration: (iteration, "lm loss" exactly as printed)
ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|")
SAVED = re.compile(r"successfully saved checkpoint from iteration\s+(\d+) ")
LOADED = re.compile(r"loading distributed checkpoint from \S+ at iteration (\d+)")
EXACT_LOSS = re.compile(r"exact loss: rank (\d+) iteration (\d+) (\S+)")  # recording_entry.py
EXIT_MESSAGE = "exiting program after receiving SIGTERM."


def losses(text: str) -> dict[int, str]:
    """Iteration -> lm loss as megatron printed it (the last occurrence wins)."""
    return {int(it): value for it, value in ITERATION.findall(text)}


def exact_losses(text: str) -> dict[tuple[int, int], float]:
    """(rank, iteration) -> that rank's micro-batch loss, as recording_entry.py prints it."""
    return {(int(rank), int(it)): float(value) for rank, it, value in EXACT_LOSS.findall(text)}


def is_gone(process: psutil.Process) -> bool:
    """Exited (a zombie waiting for whoever adopted it counts: it holds no memory and runs nothing)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def survivors(processes: list[psutil.Process], timeout: float) -> list[str]:
    """Wait up to ``timeout`` s for ``processes`` to exit; SIGKILL those that did not (a test
    stops what it starts) and describe them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(map(is_gone, processes)):
        time.sleep(0.2)
    left = []
    for process in processes:
        if not is_gone(process):
            try:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
                process.kill()
            except psutil.NoSuchProcess:
                pass
    return left


class Job:
    """``torchrun --nproc-per-node N ENTRY argv`` in a new session, output in ``log``; ENTRY is
    pretrain_moh.py or a script that calls its main()."""

    def __init__(self, nproc: int, argv: list[str], log: Path, entry: str = "pretrain_moh.py") -> None:
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 entry, *argv],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.launcher = psutil.Process(self.process.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of ``pattern`` in the log, once it appears."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"the job exited ({self.process.returncode}) before /{pattern}/:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no /{pattern}/ in the job's log after {timeout:.0f} s:\n{self.text()[-3000:]}")

    def tree(self) -> list[psutil.Process]:
        """torchrun and every process under it (ranks, their helpers)."""
        try:
            return [self.launcher, *self.launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_every_process(self, sig: signal.Signals) -> list[psutil.Process]:
        """What SLURM does to a job step: ``sig`` to each of its processes, torchrun, ranks and
        helpers alike (torchrun then forwards it once more with killpg). Returns the processes."""
        tree = self.tree()
        for process in tree:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        return tree

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill whatever is left of the job (a failed test's cleanup)."""
        survivors(self.tree(), timeout=0)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
