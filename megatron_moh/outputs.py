"""Where the tools write: checked before any work, cleaned up after a failure, shared like
``save_pretrained`` shares what it writes; a full disk named as such."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # the disk, or the user's quota on it


def _nearest_existing(path: str | os.PathLike) -> Path:
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be created or written (its nearest existing ancestor is a file, or not
    writable), or None when it can."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def describe_os_error(err: OSError) -> str:
    """An OSError as one line that names the path (``[Errno 2] ...`` says neither what nor where)."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in FULL and err.filename:
        return f"{no_space(err.filename)}: free space or write elsewhere"
    return f"{where}{(err.strerror or str(err)).lower()}"


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Directories created on the way to ``path`` are removed again if the block fails, so a
    failed run leaves no empty output directories behind."""
    first_new = None
    probe = Path(path).absolute()
    while not probe.exists():
        first_new, probe = probe, probe.parent
    try:
        yield
    except BaseException:
        if first_new is not None and first_new.is_dir():
            shutil.rmtree(first_new, ignore_errors=True)
        raise


def share_like_umask(directory: str | os.PathLike) -> None:
    """Give ``directory`` and everything in it the permissions the user's umask gives new files
    (a scratch directory from ``tempfile.mkdtemp`` is private: 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)



def free_bytes(path: str | os.PathLike) -> int:
    """Bytes this user may still write on the filesystem of ``path`` (or of its nearest existing
    ancestor)."""
    return shutil.disk_usage(_nearest_existing(path)).free


def human_bytes(size: float) -> str:
    """``size`` bytes as people write it (decimal units, as ``df -H``)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def no_space(path: str | os.PathLike) -> str:
    """The start of a one-line report that ``path`` ran out of room."""
    return f"no space left on device: {path} ({human_bytes(free_bytes(path))} free now)"


def ran_out_of_space(err: BaseException, path: str | os.PathLike, probe: int = 1 << 20) -> bool:
    """Whether a write under ``path`` that failed with ``err`` found the disk (or this user's quota
    on it) full: by the errno or its words anywhere in the exception's chain (safetensors raises
    its own error with the OS's words), else by writing ``probe`` bytes there, since some writers
    lose both (torch.save's zip writer says "unexpected pos"; megatron's checkpoint writer passes on
    only "Worker failure")."""
    words = [os.strerror(code) for code in FULL]
    seen: BaseException | None = err
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno in FULL) or any(word in str(seen) for word in words):
            return True
        seen = seen.__cause__ or seen.__context__
    directory = _nearest_existing(path)
    if not directory.is_dir():
        directory = directory.parent
    try:
        with tempfile.TemporaryFile(dir=directory) as handle:
            handle.write(b"\0" * probe)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as probe_err:
        return probe_err.errno in FULL
    return False
