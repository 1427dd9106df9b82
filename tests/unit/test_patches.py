"""Every replacement of a torch / megatron attribute goes through megatron_moh.patches: the list
below is the whole surface a dependency upgrade can break, and each target must still exist. Every
upstream body the project copies or mirrors is pinned by a hash of its source (`COPIED`), so an
upgrade that changes one fails at the copy to re-read."""

import hashlib
import importlib
import inspect
import types

import pytest

from megatron_moh import metrics, patches
from megatron_moh.patches import PatchNotInstalled, PatchTargetMissing, checkpointing, installed, replace, wrap

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
    # conftest, an entry point, ran platform.setup(force_cpu=True) and patches.install_all().
    targets = [patch.target for patch in installed()]
    assert sorted(targets) == sorted(EVERY_TARGET)
    for patch in installed():
        assert _resolve(patch.target) is patch.replacement, patch.target
        assert patch.original is not patch.replacement and patch.why


def test_installing_twice_changes_nothing():
    from megatron.training import training

    log = training.training_log
    patches.install_all()
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


def test_code_that_needs_a_patch_fails_loudly_without_it():
    owner = types.ModuleType("upstream")
    owner.read = lambda path: None
    with pytest.raises(PatchNotInstalled, match=r"upstream.read is not patched .*install_all\(\)"):
        patches.require(owner, "read")
    checkpointing.require_safe_loading()  # installed by conftest, as by every entry point


# (upstream body, first 16 hex digits of the sha256 of its source, the project code that copies or
# mirrors it). A megatron-core or torch upgrade that changes the body fails here: re-read the
# project code against the new body, then update the hash.
COPIED = [
    ("megatron.core.transformer.attention.Attention.forward", "b144e903f3ca6d8f",
     "megatron_moh.moh_attention.MoHSelfAttention.forward, which reimplements it (what it honours or refuses: "
     "offloading, inference and KV cache, packed sequences, context parallelism)"),
    ("megatron.core.transformer.dot_product_attention.DotProductAttention.forward", "1450046fe34ea330",
     "megatron_moh.core_attention.SDPAttention.forward, which computes the same function with torch SDPA"),
    ("megatron.training.training.get_optimizer_param_scheduler", "cc15eb37595dd430",
     "megatron_moh.checkpoint._lr_schedule, which derives the scheduler's values as it does"),
    ("torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata", "8586ce344a523602",
     "megatron_moh.patches.checkpointing._read_metadata_safely, its copy with a restricted unpickler"),
    ("torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes", "666701f9808c4bc2",
     "megatron_moh.patches.checkpointing._load_bytes_weights_only, its copy with weights_only=True"),
    ("megatron.training.training.train_step", "68989d425b2300aa",
     "megatron_moh.patches.megatron_training._stop_on_divergence, which reads its result by position "
     "(skipped iteration [1], gradient norm [5])"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue", "e395fb0e86a062e2",
     "megatron_moh.patches.checkpointing._sheltered_queue, which creates the queue it would create"),
    ("megatron.training.training.num_floating_point_operations", "f9ed9b380e17ebd3",
     "megatron_moh.metrics.moh_flops, which takes off the attention core as it counts it"),
    ("megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_layer_specs", "dc7ae76bcb9899a7",
     "megatron_moh.specs.moe_layer_pattern, which reads --moe-layer-freq as it does"),
    ("torch.distributed.checkpoint.filesystem.FileSystemWriter.write_data", "ff3210965b793f60",
     "Writer.write_data in megatron_moh.conversion.megatron_files._producing_strategy, which builds its file "
     "queue"),
    ("torch.distributed.checkpoint.filesystem.FileSystemWriter._write_data", "a16804371a37b032",
     "Writer.write_data in megatron_moh.conversion.megatron_files._producing_strategy, which calls this private "
     "method"),
    ("megatron.core.dist_checkpointing.strategies.torch.TorchDistSaveShardedStrategy.async_save", "76a4d55fe07edb88",
     "Strategy.save in megatron_moh.conversion.megatron_files._producing_strategy, which translates the state "
     "dict as it does"),
]


@pytest.mark.parametrize("target,digest,copy", COPIED, ids=[target.rsplit(".", 2)[-2] + "." + target.rsplit(
    ".", 1)[-1] for target, _, _ in COPIED])
def test_copied_upstream_body_is_unchanged(target, digest, copy):
    owner, name = target.rsplit(".", 1)
    body = inspect.getsource(patches.original(_resolve(owner), name))  # the upstream one, if patched
    found = hashlib.sha256(body.encode()).hexdigest()[:16]
    assert found == digest, f"{target} changed upstream (source hash {found}): re-read {copy}, then update its hash"
