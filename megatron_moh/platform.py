"""Where megatron-moh runs: CUDA + NCCL on GPUs, or CPU + gloo everywhere else.

megatron-core assumes CUDA in a few hundred places (current device, streams, events, the
model-parallel "CUDA" RNG tracker, literal ``device="cuda"`` tensors, ``Tensor.type()`` strings).
`use_cpu()` redirects all of them in one place so the whole stack (TP, SP, PP, DP, the
distributed optimizer, distributed checkpoints, ``megatron.training``) runs on a laptop with
gloo. It is applied automatically when no GPU is visible, or on request with ``MOH_CPU=1``.
This is the only module of the project that names cuda, nccl or gloo.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU_MODE: "_CudaToCpu | None" = None


def cpu_requested() -> bool:
    """True when the run must use the CPU: no usable GPU, or ``MOH_CPU=1``."""
    if os.environ.get("MOH_CPU", "0") not in ("", "0"):
        return True
    return not _real_cuda_is_available()


def _real_cuda_is_available() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a CUDA build with no driver
        return False


def device() -> torch.device:
    """The device tensors of this process live on."""
    if _CPU_MODE is not None or cpu_requested():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def distributed_backend() -> str:
    """The torch.distributed backend that matches `device()`."""
    return "gloo" if (_CPU_MODE is not None or cpu_requested()) else "nccl"


def setup(force_cpu: bool | None = None) -> torch.device:
    """Pick the device for this process; on CPU, redirect megatron-core's CUDA calls.

    Call once at start-up, before megatron builds anything.
    """
    # The megatron-core wheel ships its compiled dataset helpers but no Makefile: megatron.training
    # would try to rebuild them with `make` at start-up and fail.
    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None
    if force_cpu or (force_cpu is None and cpu_requested()):
        use_cpu()
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return device()


def single_process_defaults() -> None:
    """Let plain ``python script.py`` run as a one-rank job (torchrun sets these itself)."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_process_group(rank: int, world_size: int, init_method: str | None = None, **kwargs: Any) -> None:
    """`torch.distributed.init_process_group` with the backend of this platform."""
    torch.distributed.init_process_group(
        backend=distributed_backend(),
        rank=rank,
        world_size=world_size,
        init_method=init_method,
        **kwargs,
    )


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int device means a CUDA ordinal to torch's factory functions.
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites literal CUDA device arguments (``device="cuda"``, ``.cuda()``) to the CPU and makes
    ``Tensor.type()`` report CUDA names (megatron compares parameter types with
    ``'torch.cuda.FloatTensor'``). A mode is inactive while it handles a call, so work nested in
    ``Tensor.backward`` is not rewritten; megatron's backward code uses ``current_device()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event on the CPU: work is synchronous, so every
    wait, record and synchronize is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _cpu_rng_get(device: Any = "cuda", *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def use_cpu() -> None:
    """Redirect megatron-core's CUDA-only calls to the CPU (idempotent)."""
    global _CPU_MODE
    if _CPU_MODE is not None:
        return
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # megatron.training asserts this for TP on pre-Blackwell GPUs; CPU work is synchronous anyway.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    cuda = torch.cuda
    cuda.is_available = lambda: False
    # megatron.training initialises model parallelism and seeds only when it counts a device.
    cuda.device_count = lambda: 1
    # Most of megatron passes device=torch.cuda.current_device(); code running inside autograd
    # backward escapes the function mode below, so the device itself must be the CPU.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.is_current_stream_capturing = lambda: False
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.memory_stats = lambda *a, **k: {}
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    # The model-parallel "CUDA" RNG tracker forks the CPU generator instead.
    cuda.get_rng_state = _cpu_rng_get
    cuda.random.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = _cpu_rng_set
    cuda.random.set_rng_state = _cpu_rng_set
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed already seeded the CPU

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, clone=False, **k: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = _cpu_rng_set

    _use_cpu_in_megatron_training()
    _CPU_MODE = _CudaToCpu()
    _CPU_MODE.__enter__()  # stays active for the life of the process


def _use_cpu_in_megatron_training() -> None:
    """The few CUDA-only spots of megatron.training (its loop, arguments and initialisation)."""
    from megatron.training import arguments, initialize, training

    original_initialize = initialize.initialize_megatron

    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original_initialize(*args, **kwargs)

    training.initialize_megatron = initialize_megatron
    arguments.get_device_arch_version = lambda: 0

    # On the CPU the "CUDA" generator that dropout draws from IS the CPU generator, which a
    # DataLoader also draws its base seed from when its iterator is made. A resumed run makes its
    # iterators after restoring the checkpoint's RNG state, an uninterrupted run before the first
    # step, so dropout masks would differ after a resume. Making the iterators without consuming
    # the generator keeps a resumed run on the uninterrupted run's random stream.
    build_iterators = training.build_train_valid_test_data_iterators

    def build_iterators_without_drawing(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return build_iterators(*args, **kwargs)

    training.build_train_valid_test_data_iterators = build_iterators_without_drawing
