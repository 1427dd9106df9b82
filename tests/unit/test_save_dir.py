"""One run per --save directory: a live holder refuses a second run in one line naming it (host,
pid, SLURM job); a holder killed with SIGKILL does not block the next run; a requeued SLURM job
waits for its own previous run's lock; the room check measures the last checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_moh import save_dir

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import socket, sys, time
from megatron_moh import save_dir
socket.gethostname = lambda: sys.argv[2]  # where the holder says it runs
with save_dir.held(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """``start(save, host, job)``: a process on this machine that holds ``save`` (recording
    ``host`` and SLURM job ``job``) until killed, with SIGKILL, at teardown at the latest."""
    started = []

    def start(save: Path, host: str = socket.gethostname(), job: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        if job:
            env["SLURM_JOB_ID"] = job
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(save), host], env=env, stdout=subprocess.PIPE,
                                   text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "holding"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def _try_to_hold(save: Path, **kwargs) -> str | None:
    """The refusal a run would get, or None after holding ``save`` and letting it go."""
    try:
        with save_dir.held(str(save), **kwargs):
            return None
    except save_dir.SaveDirInUse as err:
        return str(err)


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path, holder, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    save = tmp_path / "ckpt"
    first = holder(save, job="41")
    message = _try_to_hold(save)
    assert message.startswith(f"--save {save} is in use by a run on host {socket.gethostname()} (pid {first.pid}, "
                              f"SLURM job 41, since ")
    assert message.endswith("two runs would overwrite each other's checkpoints; wait for it to end, or choose "
                            "another --save")
    assert "\n" not in message
    assert _try_to_hold(save, rank=1) is None  # the other ranks of a run belong to rank 0's


def test_a_killed_holder_does_not_block(tmp_path, holder):
    save = tmp_path / "ckpt"
    first = holder(save)
    assert _try_to_hold(save) is not None
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _try_to_hold(save) is None
    assert _try_to_hold(save) is None  # and the lock went with the block that held it
    assert sorted(p.name for p in save.iterdir()) == [save_dir.LOCK_NAME]


@pytest.mark.slow
def test_a_requeued_slurm_job_waits_for_its_lost_run(tmp_path, holder, monkeypatch):
    """The previous run of this very job held the lock on another node, which was lost: the lock
    is only waiting for its lease to expire (here: the holder is killed while the requeue waits)."""
    save = tmp_path / "ckpt"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    other_job = holder(save, host="lost-node", job="76")
    assert "SLURM job 76" in _try_to_hold(save, same_job_wait=60)  # another job: refused at once
    other_job.kill()
    other_job.wait()
    lost = holder(save, host="lost-node", job="77")
    threading.Timer(1.0, lost.kill).start()
    assert _try_to_hold(save, same_job_wait=60) is None
    same_host = holder(save, job="77")  # the same job twice at once on this node: a live second run
    assert f"pid {same_host.pid}" in _try_to_hold(save, same_job_wait=60)


def test_room_is_measured_on_the_last_checkpoint(tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    (save / "iter_0000004").mkdir(parents=True)
    (save / "iter_0000004" / "__0_0.distcp").write_bytes(b"x" * 5000)
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    assert save_dir.newest_checkpoint(None, str(tmp_path / "empty"), str(save)) == save / "iter_0000004"
    assert save_dir.room_problem(str(save), "the next checkpoint", save / "iter_0000004") is None
    monkeypatch.setattr(save_dir, "free_bytes", lambda path: 4000)
    assert save_dir.room_problem(str(save), "the next checkpoint", save / "iter_0000004") == (
        f"no space left on device: --save {save} has 4.0 KB free and the next checkpoint needs about 5.0 KB (as "
        f"iter_0000004 took): free space or choose another --save")
