"""A checkpoint saved at any TP/PP/VPP as one whole model in one process (megatron's
distributed checkpointing reshards on load), for the conversion and analysis tools; or as a
weightless model on the meta device, whose (sharded) state dict says what a checkpoint holds without
memory, for the converters that move one tensor at a time (megatron_moh.conversion.megatron_files)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_moh.checkpoint import CheckpointError, find_checkpoint, first_line, read_common_state, verify_checkpoint


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-rank gloo group with TP=1/PP=1 model parallelism for the conversion tools; reuses
    one that already exists (e.g. a test session's), refusing any other layout."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_moh import platform

    created = not torch.distributed.is_initialized()
    if created:
        platform.setup()
        store = tempfile.mkdtemp(prefix="moh-convert-pg-")
        platform.init_process_group(0, 1, init_method=f"file://{store}/rendezvous")
    elif torch.distributed.get_world_size() != 1:
        raise CheckpointError("checkpoint conversion runs in one process, but this one is part of a "
                              f"{torch.distributed.get_world_size()}-rank group")
    initialised = parallel_state.model_parallel_is_initialized()
    if not initialised:
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        if not initialised:
            parallel_state.destroy_model_parallel()
        if created:
            torch.distributed.destroy_process_group()
            shutil.rmtree(store, ignore_errors=True)


def one_process_args(saved: argparse.Namespace) -> argparse.Namespace:
    """A copy of a run's arguments for the same model as one TP=1/PP=1 chunk on this machine."""
    from megatron_moh import platform

    args = argparse.Namespace(**vars(saved))
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = None
    args.num_layers_per_virtual_pipeline_stage = None
    args.context_parallel_size = 1
    args.expert_model_parallel_size = 1
    args.expert_tensor_parallel_size = 1
    args.sequence_parallel = False
    args.use_cpu_initialization = True
    args.perform_initialization = False  # the checkpoint overwrites every weight
    args.fp8 = None
    args.recompute_granularity = None
    args.recompute_method = None
    args.recompute_num_layers = None
    args.transformer_impl = "local" if platform.cpu_requested() else args.transformer_impl
    return args


class _OnMeta(TorchFunctionMode):
    """Tensors created with an explicit ``device=`` (megatron passes the current CUDA device, or
    the CPU) go to the meta device too; `torch.device("meta")` covers those created without."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_model(args: argparse.Namespace, meta: bool = False) -> torch.nn.Module:
    """The whole GPT (one TP=1/PP=1 chunk) that ``args`` describe, weights uninitialised
    (``meta=True``: every tensor on the meta device, so no memory at any size)."""
    from megatron_moh.model import model_from_args

    if not meta:
        return model_from_args(one_process_args(args))
    with torch.device("meta"), _OnMeta():
        return model_from_args(one_process_args(args))


def checkpoint_model(load_dir: str | os.PathLike, meta: bool = False) -> tuple[Path, argparse.Namespace,
                                                                               torch.nn.Module, dict]:
    """(path of ``load_dir``'s current checkpoint, the saving run's arguments, the TP=1/PP=1 model
    they describe, built as `build_model` builds it, and its sharded state dict for that checkpoint);
    the model's data is verified against its checksums first, so damage is refused, never converted."""
    _, path = find_checkpoint(load_dir)
    verify_checkpoint(path, optimizer=False)
    state = read_common_state(path)
    saved = state.get("args")
    if saved is None:
        raise CheckpointError(f"{path} stores no run arguments: it was not saved by megatron.training")
    model = build_model(saved, meta=meta)
    return path, saved, model, model.sharded_state_dict(metadata=dict(state.get("content_metadata") or {}))


def load_model(load_dir: str | os.PathLike) -> tuple[torch.nn.Module, argparse.Namespace]:
    """The model of ``load_dir``'s current checkpoint, saved at any TP/PP/VPP, as one TP=1/PP=1
    GPTModel in this process (megatron's distributed checkpointing reshards), and the saving run's
    arguments; the model's data is verified against its checksums first. Needs `single_process_group`
    (or an equivalent one-rank group)."""
    from megatron.core import dist_checkpointing

    path, saved, model, sharded = checkpoint_model(load_dir)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as err:  # noqa: BLE001 - megatron's messages are long; keep the first line
        raise CheckpointError(f"{path} does not load into the model its own arguments describe: "
                              f"{first_line(err)}") from err
    model.load_state_dict({key: loaded[key] for key in sharded}, strict=True)  # drop the common state
    return model.eval(), saved
