"""Run a function on N gloo ranks for a test.

Workers are forked from a forkserver that imported torch and megatron once, so a distributed
case costs well under a second instead of a fresh ~10 s import, and no worker is forked from the
pytest process itself (forking a large, threaded process can deadlock). Every launch has a
timeout; a worker's exception fails the test with its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

_PRELOAD = ["tests.worker_preload"]
_CTX: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def _worker(fn: Callable, rank: int, world_size: int, init_file: str, queue, args, kwargs) -> None:
    try:
        import torch
        from torch.utils._pytree import tree_map

        from megatron_moh import patches, platform

        platform.setup(force_cpu=True)
        patches.install_all()
        torch.set_num_threads(1)
        platform.init_process_group(rank, world_size, init_method=f"file://{init_file}")
        result = tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                          fn(rank, world_size, *args, **kwargs))
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = 240, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` CPU/gloo ranks; return
    the per-rank results (picklable) in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, init_file, queue, args, kwargs))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = pickle.loads(payload)
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    break
        except Exception as exc:  # noqa: BLE001 - queue.Empty on timeout, reported below
            errors.append(f"timed out after {timeout}s waiting for workers ({exc!r})")
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("distributed worker failed: " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
