"""The ``--save`` directory of a training run: one run at a time, and room for the next checkpoint.

* **One run per directory.** Rank 0 holds an exclusive ``flock`` on ``SAVE/.megatron-moh.lock``
  for the whole run and writes who holds it (host, pid, SLURM job) into the file. Two runs on one
  directory would otherwise interleave their checkpoints without a word. The operating system
  releases the lock when its process dies, however it dies (``kill -9`` included), so a dead run
  never blocks the next. On NFS the lock is a server-side lock that the server drops when the
  holding node stops renewing its lease (NFSv4: 90 s by default); Lustre needs the ``flock`` mount
  option (without it, or on a filesystem without locks, the run goes on with a warning). A SLURM
  requeue of the same job finds the lock free, or, when the previous node was lost and its lease
  has not expired yet, waits for it (`SAME_JOB_WAIT`), since one job never runs twice at a time.
* **Room.** A checkpoint is about as large as the one before it: a run that resumes checks at
  start-up that the disk has that much free (rather than failing after training), and every save
  checks it before it writes (`megatron_moh.patches.checkpointing`, which also names a full disk
  when a save fails on one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_moh.checkpoint import RELEASE, TRACKER, CheckpointError
from megatron_moh.outputs import free_bytes, human_bytes

LOCK_NAME = ".megatron-moh.lock"
# How long a requeued SLURM job waits for the lock its own previous run held on a lost node.
SAME_JOB_WAIT = 300.0
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class SaveDirInUse(CheckpointError):
    """Another live run holds the ``--save`` directory."""


def _holder(handle: int) -> dict:
    try:
        return json.loads(os.pread(handle, 4096, 0) or b"{}")
    except ValueError:
        return {}  # the holder is still writing it


def _describe(holder: dict) -> str:
    if not holder:
        return "another run"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"a run on host {holder.get('host')} (pid {holder.get('pid')}{job}, since {holder.get('since')})"


@contextlib.contextmanager
def held(save: str | None, rank: int = 0, same_job_wait: float | None = None) -> Iterator[None]:
    """Hold ``save`` for this run while the block runs (rank 0 does; the other ranks belong to
    its run). Raises SaveDirInUse, naming the holder, when another live run holds it."""
    if save is None or rank != 0:
        yield
        return
    Path(save).mkdir(parents=True, exist_ok=True)
    handle = os.open(Path(save) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(handle, save, SAME_JOB_WAIT if same_job_wait is None else same_job_wait)
        yield
    finally:
        os.close(handle)  # releases the lock


def _acquire(handle: int, save: str, same_job_wait: float) -> None:
    job = os.environ.get("SLURM_JOB_ID")
    deadline = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(handle)
            if job and holder.get("slurm_job") == job and holder.get("host") != socket.gethostname():
                # this job's previous run, on a node that was lost: its lease will expire
                deadline = deadline or time.monotonic() + same_job_wait
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
            raise SaveDirInUse(f"--save {save} is in use by {_describe(holder)}: two runs would overwrite each "
                               f"other's checkpoints; wait for it to end, or choose another --save") from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            print(f"warning: --save {save} does not support file locks ({err.strerror}; on Lustre mount it with "
                  f"-o flock): nothing stops a second run from writing there too", file=sys.stderr)
            return
    record = dict(host=socket.gethostname(), pid=os.getpid(), slurm_job=job,
                  since=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.ftruncate(handle, 0)
    os.pwrite(handle, json.dumps(record).encode(), 0)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """The size of one checkpoint directory, in bytes."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def newest_checkpoint(*directories: str | None) -> Path | None:
    """The checkpoint named by the tracker of the first of ``directories`` that has one."""
    for directory in filter(None, directories):
        tracker = Path(directory) / TRACKER
        text = tracker.read_text().strip() if tracker.is_file() else ""
        path = Path(directory) / (RELEASE if text == RELEASE else f"iter_{int(text):07d}" if text.isdigit() else "")
        if text and path.is_dir():
            return path
    return None


def room_problem(save: str, what: str, like: Path | None) -> str | None:
    """Why ``what`` (a checkpoint about the size of the checkpoint ``like``) will not fit in
    ``save``, or None when it fits or nothing is known of its size."""
    if like is None:
        return None
    needed, free = checkpoint_bytes(like), free_bytes(save)
    if free >= needed:
        return None
    return (f"no space left on device: --save {save} has {human_bytes(free)} free and {what} needs about "
            f"{human_bytes(needed)} (as {like.name} took): free space or choose another --save")
