"""Measurement helpers shared by the benchmarks: a one-rank process group, fair timing, memory."""

from __future__ import annotations

import json
import platform as host
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_moh import patches, platform


def setup_one_rank(seed: int = 0, threads: int | None = None) -> torch.device:
    """Platform, a one-rank process group and megatron's model-parallel state; ``threads`` sets
    torch's CPU threads."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    device = platform.setup()
    patches.install_all()
    platform.single_process_defaults()
    if threads:
        torch.set_num_threads(threads)
    store = tempfile.mkdtemp(prefix="moh-bench-")
    platform.init_process_group(0, 1, init_method=f"file://{store}/rendezvous")
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    return device


def _sync() -> None:
    """Wait for queued GPU work, whichever device the step ran on (nothing to wait for without CUDA)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_medians(steps: list[Callable[[], None]], repeats: int,
                        warmup: int) -> tuple[list[float], list[float]]:
    """Median wall-clock and process-CPU seconds of each step; the steps take turns in every round
    so that drift in the machine's speed hits them alike. On a CPU shared with other jobs, CPU time
    is the steadier measure of work at one thread (waiting for a core does not add to it)."""
    for step in steps:
        for _ in range(warmup):
            step()
    wall: list[list[float]] = [[] for _ in steps]
    cpu: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            _sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            _sync()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def memory_bytes(step: Callable[[], None]) -> int:
    """Peak CUDA memory of one step on a GPU; on CPU the bytes autograd saves for backward."""
    if platform.device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def memory_kind() -> str:
    """What `memory_bytes` measures here."""
    return "peak CUDA memory" if platform.device().type == "cuda" else "saved activations"


def write_report(name: str, report: dict, out: Path | None = None) -> Path:
    """JSON under benchmarks/results/, stamped with machine, versions and date."""
    report = {"benchmark": name, "device": platform.device().type, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "host": host.node(), "date": time.strftime("%Y-%m-%d"),
              "memory_kind": memory_kind(), **report}
    out = out or Path(__file__).parent / "results" / f"{name}_{platform.device().type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out
