"""Every replacement of a torch / megatron attribute goes through megatron_moh.patches: the list
below is the whole surface a dependency upgrade can break, and each target must still exist."""

import importlib
import types

import pytest

from megatron_moh import metrics, patches
from megatron_moh.patches import PatchTargetMissing, checkpointing, installed, replace, wrap

CPU = [
    "torch.cuda.is_available", "torch.cuda.device_count", "torch.cuda.current_device", "torch.cuda.set_device",
    "torch.cuda.synchronize", "torch.cuda.reset_peak_memory_stats", "torch.cuda.empty_cache",
    "torch.cuda.memory_allocated", "torch.cuda.max_memory_allocated", "torch.cuda.memory_reserved",
    "torch.cuda.max_memory_reserved", "torch.cuda.memory_stats", "torch.cuda.Stream", "torch.cuda.Event",
    "torch.cuda.current_stream", "torch.cuda.default_stream", "torch.cuda.stream",
    "torch.cuda.is_current_stream_capturing", "torch.cuda.nvtx.range_push", "torch.cuda.nvtx.range_pop",
    "torch.cuda.get_rng_state", "torch.cuda.random.get_rng_state", "torch.cuda.set_rng_state",
    "torch.cuda.random.set_rng_state", "torch.cuda.manual_seed", "torch.cuda.manual_seed_all",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.training.training.initialize_megatron",
    "megatron.training.arguments.get_device_arch_version",
    "megatron.training.training.build_train_valid_test_data_iterators",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
]
MEGATRON_TRAINING = [
    "megatron.core.datasets.utils.compile_helpers",
    "megatron.core.rerun_state_machine.RerunStateMachine.should_checkpoint_and_exit",
    "megatron.training.training.train_step",
]
CHECKPOINTING = [
    "torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata",
    "torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.sharded_state_dict",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
    "megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue",
    "megatron.core.dist_checkpointing.save",
    "megatron.training.training.save_checkpoint",
]
METRICS = ["megatron.training.training.training_log", "megatron.training.training.num_floating_point_operations"]
EVERY_TARGET = CPU + MEGATRON_TRAINING + CHECKPOINTING + METRICS


def _resolve(target: str):
    """The object a dotted target names today, found by import and attribute walk."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            owner = getattr(owner, name)
        return owner
    raise AssertionError(f"cannot import any prefix of {target}")


def test_every_patch_is_listed_and_in_place():
    # conftest ran platform.setup(force_cpu=True); the rest is what pretrain_moh.py installs.
    checkpointing.install()
    metrics.install()
    targets = [patch.target for patch in installed()]
    assert sorted(targets) == sorted(EVERY_TARGET)
    for patch in installed():
        assert _resolve(patch.target) is patch.replacement, patch.target
        assert patch.original is not patch.replacement and patch.why


def test_installing_twice_changes_nothing():
    from megatron.training import training

    metrics.install()
    log = training.training_log
    metrics.install()
    checkpointing.install()
    assert training.training_log is log
    assert log.__wrapped__ is patches.original(training, "training_log")  # wrapped once, not twice


def test_a_renamed_target_fails_loudly():
    owner = types.ModuleType("upstream")
    owner.renamed = lambda x: x
    with pytest.raises(PatchTargetMissing, match="upstream.gone does not exist"):
        replace(owner, "gone", lambda: None, why="test")
    assert not hasattr(owner, "gone")


def test_a_changed_signature_fails_loudly():
    owner = types.ModuleType("upstream")
    owner.step = lambda model, batch: None
    with pytest.raises(PatchTargetMissing, match=r"takes \('model', 'batch'\)"):
        wrap(owner, "step", lambda f: f, why="test", params=("batch",))
