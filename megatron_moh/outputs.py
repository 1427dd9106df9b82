"""Where the tools write: checked before any work, cleaned up after a failure, shared like
``save_pretrained`` shares what it writes."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be created or written (its nearest existing ancestor is a file, or not
    writable), or None when it can."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def describe_os_error(err: OSError) -> str:
    """An OSError as one line that names the path (``[Errno 2] ...`` says neither what nor where)."""
    where = f"{err.filename}: " if err.filename else ""
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
