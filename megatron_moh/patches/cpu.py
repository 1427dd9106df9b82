"""megatron-core and megatron.training on the CPU with gloo.

megatron assumes CUDA in a few hundred places (current device, streams, events, the
model-parallel "CUDA" RNG tracker, literal ``device="cuda"`` tensors, ``Tensor.type()`` strings).
`install` redirects all of them, so TP, SP, PP, DP, EP (both MoE token dispatchers), the
distributed optimizer, distributed checkpoints and ``megatron.training`` run on a laptop.
`megatron_moh.platform` decides when; `megatron_moh.patches.install_all` installs it then.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_moh.patches import replace, wrap

_MODE: "_CudaToCpu | None" = None


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

    def record_event(self, *args: Any, **kwargs: Any) -> "_NoStream":
        # megatron's all-to-all token dispatcher synchronizes on the event a stream records.
        return _NoStream()

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _returning(value: Any) -> Any:
    """A new function per replaced attribute: torch.compile keeps a rule per torch function and
    refuses one object standing in for several of them."""
    return lambda *args, **kwargs: value


def _cpu_rng_get(device: Any = "cuda", *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    no_cuda = "no GPU: megatron must see the CPU"
    replace(cuda, "is_available", lambda: False, why=no_cuda, params=())
    # megatron.training initialises model parallelism and seeds only when it counts a device.
    replace(cuda, "device_count", lambda: 1, why="megatron.training initialises only when it counts a device",
            params=())
    # Most of megatron passes device=torch.cuda.current_device(); code running inside autograd
    # backward escapes the function mode, so the device itself must be the CPU.
    replace(cuda, "current_device", lambda: torch.device("cpu"), why="tensors megatron places go to the CPU",
            params=())
    for name in ("set_device", "synchronize", "reset_peak_memory_stats"):
        replace(cuda, name, _returning(None), why="nothing to select or wait for on the CPU", params=("device",))
    replace(cuda, "empty_cache", _returning(None), why="no CUDA cache", params=())
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        replace(cuda, name, _returning(0), why="megatron's memory report", params=("device",))
    replace(cuda, "memory_stats", lambda *a, **k: {}, why="megatron's memory report", params=("device",))
    replace(cuda, "Stream", _NoStream, why="CPU work is synchronous")
    replace(cuda, "Event", _NoStream, why="CPU work is synchronous")
    replace(cuda, "current_stream", lambda *a, **k: _NoStream(), why="CPU work is synchronous", params=("device",))
    replace(cuda, "default_stream", lambda *a, **k: _NoStream(), why="CPU work is synchronous", params=("device",))
    replace(cuda, "stream", lambda *a, **k: contextlib.nullcontext(), why="CPU work is synchronous",
            params=("stream",))
    replace(cuda, "is_current_stream_capturing", lambda: False, why="no CUDA graphs on the CPU", params=())
    replace(cuda.nvtx, "range_push", _returning(None), why="no profiler ranges on the CPU", params=("msg",))
    replace(cuda.nvtx, "range_pop", _returning(None), why="no profiler ranges on the CPU", params=())
    # The model-parallel "CUDA" RNG tracker forks the CPU generator instead.
    rng = "the model-parallel CUDA RNG tracker uses the CPU generator"
    replace(cuda, "get_rng_state", _cpu_rng_get, why=rng, params=("device",))
    replace(cuda.random, "get_rng_state", _cpu_rng_get, why=rng, params=("device",))
    replace(cuda, "set_rng_state", _cpu_rng_set, why=rng, params=("new_state", "device"))
    replace(cuda.random, "set_rng_state", _cpu_rng_set, why=rng, params=("new_state", "device"))
    replace(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(seed), why=rng, params=("seed",))
    replace(cuda, "manual_seed_all", lambda seed: None, why="torch.manual_seed already seeded the CPU",
            params=("seed",))


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.training import arguments, training

    rng = "the model-parallel CUDA RNG tracker uses the CPU generator"
    replace(mp_random, "_get_cuda_rng_state",
            lambda *a, clone=False, **k: torch.get_rng_state().clone() if clone else torch.get_rng_state(),
            why=rng, params=("device", "clone"))
    replace(mp_random, "_set_cuda_rng_state", _cpu_rng_set, why=rng, params=("new_state", "device"))

    def allow_no_cuda(initialize_megatron: Any) -> Any:
        @functools.wraps(initialize_megatron)
        def initialize_on_cpu(*args: Any, **kwargs: Any) -> Any:
            return initialize_megatron(*args, **{**kwargs, "allow_no_cuda": True})

        return initialize_on_cpu

    # pretrain() calls the name it imported into megatron.training.training.
    wrap(training, "initialize_megatron", allow_no_cuda, why="megatron.training asserts CUDA otherwise",
         params=("allow_no_cuda",))
    # With TP > 1 validate_args asks the GPU for its architecture.
    replace(arguments, "get_device_arch_version", lambda: 0, why="no GPU architecture on the CPU", params=())

    # On the CPU the "CUDA" generator that dropout draws from IS the CPU generator, which a
    # DataLoader also draws its base seed from when its iterator is made. A resumed run makes its
    # iterators after restoring the checkpoint's RNG state, an uninterrupted run before the first
    # step, so dropout masks would differ after a resume. Making the iterators without consuming
    # the generator keeps a resumed run on the uninterrupted run's random stream.
    def without_drawing(build_iterators: Any) -> Any:
        @functools.wraps(build_iterators)
        def build_iterators_without_drawing(*args: Any, **kwargs: Any) -> Any:
            with torch.random.fork_rng(devices=[]):
                return build_iterators(*args, **kwargs)

        return build_iterators_without_drawing

    wrap(training, "build_train_valid_test_data_iterators", without_drawing,
         why="exact resume with dropout on the CPU", params=("build_train_valid_test_datasets_provider",))

    # The all-to-all MoE token dispatcher turns its split sizes into numpy arrays when it moves
    # them off the GPU; on the CPU nothing moves, and torch.distributed refuses tensors as sizes.
    def numpy_on_cpu(move: Any) -> Any:
        @functools.wraps(move)
        def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.detach().numpy().copy()
            return move(tensor, as_numpy, record_stream)

        return maybe_move_tensor_to_cpu

    wrap(token_dispatcher, "maybe_move_tensor_to_cpu", numpy_on_cpu,
         why="the all-to-all MoE dispatcher on the CPU", params=("tensor", "as_numpy", "record_stream"))


def install() -> None:
    """Redirect megatron's CUDA-only calls to the CPU for the life of the process (idempotent)."""
    global _MODE
    if _MODE is not None:
        return
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # megatron.training asserts this for TP on pre-Blackwell GPUs; CPU work is synchronous anyway.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # stays active for the life of the process
