"""megatron's distributed checkpoints, loaded safely and resumed exactly on this stack.

* **Safe loading**: PyTorch's distributed-checkpoint reader unpickles each checkpoint's
  ``.metadata`` with plain ``pickle.load`` and every non-tensor item (common state, RNG states,
  optimizer groups) with ``torch.load(weights_only=False)``; both would run code stored in the
  file. Here ``.metadata`` goes through an unpickler that only builds the checkpoint-metadata
  classes of ``torch.distributed.checkpoint`` (plus torch sizes and dtypes), and non-tensor items
  load with ``weights_only=True`` (megatron-core registers the few classes it stores). Tensor data
  is raw storage and never unpickled.
* **Distributed optimizer with torch AdamW** (megatron's fallback without apex/TE): a fresh
  optimizer has no state to load into, the loaded per-parameter ``step`` was dropped or shared by
  every parameter, and the model-space formats did not carry ``step`` at all. The state is
  pre-filled before megatron builds the loading state dict, loaded under no_grad, and every
  parameter gets its own ``step`` from its param group. Both ``dp_reshardable`` (megatron's
  default) and ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``, needed to change
  TP/PP) then resume exactly.
* **Saves survive the job's signals**: megatron's torch_dist writer sends its results through a
  queue served by a spawned ``multiprocessing`` manager process. That process sits in the rank's
  process group, so the SIGTERM a scheduler sends to every process of a job (and torchrun
  forwards with ``killpg``) killed it, and the save ``--exit-signal-handler`` starts on that very
  signal died with BrokenPipeError. Here the manager ignores SIGTERM and SIGINT from its first
  instruction (it starts with them blocked, and ignores them before it unblocks them) and exits
  when the rank that started it dies (after ``kill -9`` it stayed alive forever, ~1 GB each).
  `start_writer_helper` starts it at start-up, so that no save, the first included, waits for it
  (megatron started it in the first save, where a signal caught it half-started).
* **A full disk is named**: megatron's writer reports a full disk as "Worker failure" (torch.save's
  zip writer as "unexpected pos"); `dist_checkpointing.save` raises OSError ENOSPC with the
  checkpoint's path instead. Before a training save, the disk must have room for a checkpoint the
  size of the last one (`megatron_moh.save_dir`), and a save that fails on a full disk anyway ends
  the run with `DiskFull`, one line. The previous checkpoint stays the tracker's, intact.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import pickle
import signal
import threading
import time
from typing import Any

import torch

from megatron_moh.patches import replace, require, wrap

_METADATA_MODULES = frozenset({
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
})
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)
_SAFE_BUILTINS = frozenset({("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                            ("collections", "OrderedDict"), ("torch.serialization", "_get_layout")})


class MetadataUnpickler(pickle.Unpickler):
    """Builds a distributed checkpoint's ``.metadata`` (dataclasses and enums of
    ``torch.distributed.checkpoint``, torch sizes and dtypes) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module in _METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        elif module == "torch":
            found = getattr(torch, name, None)
            if found is torch.Size or isinstance(found, _TORCH_VALUE_TYPES):
                return found
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint never needs: "
            f"refusing to load it (the file may have been tampered with)"
        )


def _read_metadata_safely(self, *args: Any, **kwargs: Any):
    """FileSystemReader.read_metadata with `MetadataUnpickler` instead of ``pickle.load``."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
        metadata = MetadataUnpickler(stream).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    loaded = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


def _install_safe_loading() -> None:
    import megatron.core  # noqa: F401  (registers megatron's safe globals with torch.serialization)
    from torch.distributed.checkpoint import default_planner, filesystem

    replace(filesystem.FileSystemReader, "read_metadata", _read_metadata_safely,
            why="never unpickle arbitrary classes from a checkpoint's .metadata", params=("self",))
    replace(default_planner.DefaultLoadPlanner, "load_bytes", _load_bytes_weights_only,
            why="non-tensor checkpoint items load with weights_only=True", params=("self", "read_item", "value"))


def require_safe_loading() -> None:
    """Raise `PatchNotInstalled` unless this process reads checkpoints safely: without the patches
    above, torch's reader would unpickle whatever a checkpoint file holds."""
    from torch.distributed.checkpoint import default_planner, filesystem

    require(filesystem.FileSystemReader, "read_metadata")
    require(default_planner.DefaultLoadPlanner, "load_bytes")


def _torch_adam_fallback(optimizer: Any) -> bool:
    """Whether a distributed optimizer wraps plain torch Adam(W), megatron's fallback without apex/TE."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


@torch.no_grad()
def _prefill_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter the state tensors torch Adam(W) keeps, so a loading state dict can
    be built (megatron's distributed optimizer reads them); the checkpoint overwrites them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param)


def _prefilled(sharded_state_dict: Any) -> Any:
    @functools.wraps(sharded_state_dict)
    def sharded_state_dict_prefilled(self, model_sharded_state_dict={}, is_loading=False,  # noqa: B006 - megatron's own signature
                                     sharding_type=None, metadata=None):
        if is_loading and _torch_adam_fallback(self.optimizer) and not self.optimizer.state:
            _prefill_adam_state(self.optimizer)
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

    return sharded_state_dict_prefilled


def _own_steps(load_state_dict: Any) -> Any:
    @functools.wraps(load_state_dict)
    def load_state_dict_with_own_steps(self, state_dict):
        with torch.no_grad():  # main params are views of leaf tensors
            load_state_dict(self, state_dict)
        if _torch_adam_fallback(self.optimizer):
            # megatron gives every parameter the SAME step tensor (from the param groups); torch
            # Adam increments each parameter's step in place, so it would advance N times a step.
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

    return load_state_dict_with_own_steps


def _except_step(set_states: Any) -> Any:
    @functools.wraps(set_states)
    def set_states_except_step(self, model_param, tensors):
        if _torch_adam_fallback(self.optimizer):
            # The step comes from the param groups (load_state_dict); the per-parameter state in
            # the checkpoint has none (model-space formats) or the pre-fill's placeholder.
            tensors = dict(tensors, step=None)
        return set_states(self, model_param, tensors)

    return set_states_except_step


def _install_distributed_optimizer_fixes() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    why = "exact resume of the distributed optimizer with torch Adam(W)"
    wrap(DistributedOptimizer, "sharded_state_dict", _prefilled, why=why,
         params=("self", "model_sharded_state_dict", "is_loading", "sharding_type", "metadata"))
    wrap(DistributedOptimizer, "load_state_dict", _own_steps, why=why, params=("self", "state_dict"))
    wrap(DistributedOptimizer, "_set_main_param_and_optimizer_states", _except_step, why=why,
         params=("self", "model_param", "tensors"))


def _exit_with_parent(parent: int) -> None:
    """Poll the parent pid and end this process once it changes (the parent died and this one was
    reparented). Polling, not prctl(PR_SET_PDEATHSIG): that fires when the *thread* that started
    the process ends, which would kill a manager started from a short-lived thread."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


_SHELTERED = {signal.SIGTERM, signal.SIGINT}


def shelter_helper(parent: int) -> None:
    """Initializer of a helper process: outlive the job's SIGTERM/SIGINT (the rank decides when
    to stop, and shuts its helpers down itself), but not the rank ``parent`` that started it. The
    helper starts with them blocked (`_sheltered_start`); one that came meanwhile is dropped."""
    for sig in _SHELTERED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SHELTERED)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def _sheltered_start(manager: Any) -> None:
    """Start ``manager``'s process with SIGTERM/SIGINT blocked from its first instruction until its
    initializer ignores them: a signal to the job while the helper imports would kill it. Here they
    only wait: the blocked mask is inherited by the child, and this thread's signals are delivered
    once it has started."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SHELTERED)
    try:
        manager.start(initializer=shelter_helper, initargs=(os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _sheltered_queue(get_write_results_queue: Any) -> Any:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    @functools.wraps(get_write_results_queue)
    def get_write_results_queue_sheltered(mp_mode: str = "spawn"):
        if filesystem_async._results_queue is None:
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=filesystem_async.mp.get_context(mp_mode))
            _sheltered_start(manager)
            filesystem_async._results_queue = manager.Queue()  # what the original creates and returns
        return get_write_results_queue(mp_mode)

    return get_write_results_queue_sheltered


def start_writer_helper() -> None:
    """Start the torch_dist writer's helper process now, at start-up, rather than in the first save
    (idempotent; needs `install`)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue()


def _install_sheltered_writer() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    wrap(filesystem_async, "get_write_results_queue", _sheltered_queue, params=("mp_mode",),
         why="the checkpoint writer's manager process survives the job's SIGTERM and dies with its rank")


class DiskFull(OSError):
    """A checkpoint did not fit on the disk of ``--save``; the message (one line) says what to do."""


def _full_disk_named(save: Any) -> Any:
    @functools.wraps(save)
    def save_naming_a_full_disk(sharded_state_dict, checkpoint_dir, *args: Any, **kwargs: Any):
        from megatron_moh.outputs import ran_out_of_space

        try:
            return save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        except BaseException as err:  # torch's CheckpointException is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)) or not ran_out_of_space(err, checkpoint_dir):
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint_dir)) from err

    return save_naming_a_full_disk


def _on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank: all of them decide alike, so that none waits in a save
    that the others skip."""
    from megatron_moh import platform

    found = torch.tensor([int(flag)], device=platform.device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return bool(found.item())


def _room_checked(save_checkpoint: Any) -> Any:
    @functools.wraps(save_checkpoint)
    def save_checkpoint_with_room(iteration, *args: Any, **kwargs: Any):
        from megatron.training import get_args

        from megatron_moh import outputs, save_dir

        run = get_args()
        if kwargs.get("non_persistent_ckpt") or run.save is None:
            return save_checkpoint(iteration, *args, **kwargs)
        problem = None
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:  # one look at the disk
            problem = save_dir.room_problem(run.save, f"the checkpoint of iteration {iteration}",
                                            save_dir.newest_checkpoint(run.save, run.load))
        if _on_any_rank(problem is not None):
            raise DiskFull(errno.ENOSPC, problem or f"no space left on device: rank 0 found --save {run.save} too "
                                                    f"full for the checkpoint of iteration {iteration}")
        try:
            return save_checkpoint(iteration, *args, **kwargs)
        except OSError as err:
            if err.errno not in outputs.FULL:
                raise
            last = save_dir.newest_checkpoint(run.save)
            kept = f"the last checkpoint, {last.name}, is intact" if last else "no checkpoint was saved"
            raise DiskFull(errno.ENOSPC, f"{outputs.no_space(run.save)}: the checkpoint of iteration {iteration} "
                                         f"did not fit in --save; {kept}: free space or choose another --save, "
                                         f"then resume") from None

    return save_checkpoint_with_room


def _install_full_disk_checks() -> None:
    from megatron.core import dist_checkpointing
    from megatron.training import training

    wrap(dist_checkpointing, "save", _full_disk_named, params=("sharded_state_dict", "checkpoint_dir"),
         why="a save that fails on a full disk says so (megatron's writer reports only 'Worker failure')")
    wrap(training, "save_checkpoint", _room_checked, params=("iteration", "model", "optimizer"),
         why="a save checks for room first, and a full disk ends the run in one line")


def install() -> None:
    """Safe loading, exact distributed-optimizer resume, saves that survive the job's signals and
    report a full disk (idempotent; `megatron_moh.patches.install_all` calls it before the first
    checkpoint is read or written)."""
    _install_safe_loading()
    _install_distributed_optimizer_fixes()
    _install_sheltered_writer()
    _install_full_disk_checks()
