"""Where megatron-moh runs: CUDA + NCCL on GPUs, or CPU + gloo everywhere else.

The CPU is chosen when no GPU is visible, or on request with ``MOH_CPU=1``; megatron's CUDA-only
calls are then redirected by `megatron_moh.patches.cpu`, which `megatron_moh.patches.install_all`
installs after `setup` chose the CPU. This module and that one are the only ones of the project
that name cuda, nccl or gloo.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron_moh import patches

_CPU_CHOSEN = False


def cpu_requested() -> bool:
    """True when the run must use the CPU: no usable GPU, or ``MOH_CPU=1``."""
    if os.environ.get("MOH_CPU", "0") not in ("", "0"):
        return True
    return not _real_cuda_is_available()


def _real_cuda_is_available() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a CUDA build with no driver raises several kinds
        return False


def on_cpu() -> bool:
    """Whether this process runs on the CPU: `setup` chose it, or no GPU is usable."""
    return _CPU_CHOSEN or cpu_requested()


def device() -> torch.device:
    """The device tensors of this process live on."""
    if on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def distributed_backend() -> str:
    """The torch.distributed backend that matches `device()`."""
    return "gloo" if on_cpu() else "nccl"


def setup(force_cpu: bool | None = None) -> torch.device:
    """Choose the device for this process: the CPU (``force_cpu``, or no usable GPU; a choice that
    stays for the life of the process), or this rank's GPU.

    Call once at start-up, then `megatron_moh.patches.install_all`.
    """
    global _CPU_CHOSEN
    if force_cpu or (force_cpu is None and on_cpu()):
        _CPU_CHOSEN = True
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return device()


def single_process_defaults() -> None:
    """Let plain ``python script.py`` run as a one-rank job (torchrun sets these itself). Port 0: the
    rank's store binds a port the OS picks as it opens it (no other rank connects), so runs started
    together cannot race for one, as they could for a free port probed beforehand."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")


def init_process_group(rank: int, world_size: int, init_method: str | None = None, **kwargs: Any) -> None:
    """`torch.distributed.init_process_group` with the backend of this platform; on the CPU only
    once megatron's CUDA calls are redirected (`megatron_moh.patches.install_all`)."""
    if on_cpu():
        patches.require(torch.cuda, "current_device")
    torch.distributed.init_process_group(
        backend=distributed_backend(),
        rank=rank,
        world_size=world_size,
        init_method=init_method,
        **kwargs,
    )
