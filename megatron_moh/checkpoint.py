"""Checkpoints of MoH runs: megatron.training's ``torch_dist`` format, resumed exactly, loaded
safely, resharded, and converted to and from Hugging Face.

Saving and resuming are megatron.training's own (``--save``, ``--load``, ``--save-interval``,
``--exit-*``); this module makes them hold for this project:

* `install` (idempotent, called from ``pretrain_moh.py``'s argument checks and by the tools):

  - **safe loading**: PyTorch's distributed-checkpoint reader unpickles each checkpoint's
    ``.metadata`` with plain ``pickle.load`` and every non-tensor item (common state, RNG
    states, optimizer groups) with ``torch.load(weights_only=False)``; both would run code
    stored in the file. Here ``.metadata`` goes through an unpickler that only builds the
    checkpoint-metadata classes of ``torch.distributed.checkpoint`` (plus torch sizes and
    dtypes), and non-tensor items load with ``weights_only=True`` (megatron-core registers
    the few classes it stores). Tensor data is raw storage and never unpickled.
  - **distributed optimizer with torch AdamW** (megatron's fallback without apex/TE): a fresh
    optimizer has no state to load into, the loaded per-parameter ``step`` was dropped or
    shared by every parameter, and the model-space formats did not carry ``step`` at all. The
    state is pre-filled before megatron builds the loading state dict, loaded under no_grad,
    and every parameter gets its own ``step`` from its param group. Both
    ``dp_reshardable`` (megatron's default) and ``fully_reshardable``
    (``--dist-ckpt-optim-fully-reshardable``, needed to change TP/PP) then resume exactly.

* `check_load`: a ``--load`` that cannot work (missing, partial, another model shape or
  vocabulary, distributed-optimizer state that cannot be resharded) is refused with one line
  before any process group starts.

* `load_model` / `export_hf` / `import_hf`: a checkpoint at any TP/PP as one whole model in one
  process, the Hugging Face export of it, and a Hugging Face Llama / MoH-Llama as a megatron
  checkpoint that ``pretrain_moh.py --load DIR --finetune`` continues from.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"

_INSTALLED = False


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message (one line) says why and what to do."""


# --------------------------------------------------------------------------------------------
# Safe loading


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
    from torch.distributed.checkpoint import default_planner, filesystem

    import megatron.core  # noqa: F401  (registers megatron's safe globals with torch.serialization)

    filesystem.FileSystemReader.read_metadata = _read_metadata_safely
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only


# --------------------------------------------------------------------------------------------
# Distributed optimizer with torch AdamW


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


def _install_distributed_optimizer_fixes() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    load_state_dict = DistributedOptimizer.load_state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(sharded_state_dict)
    def sharded_state_dict_prefilled(self, model_sharded_state_dict={}, is_loading=False,  # noqa: B006
                                     sharding_type=None, metadata=None):
        if is_loading and _torch_adam_fallback(self.optimizer) and not self.optimizer.state:
            _prefill_adam_state(self.optimizer)
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

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

    @functools.wraps(set_states)
    def set_states_except_step(self, model_param, tensors):
        if _torch_adam_fallback(self.optimizer):
            # The step comes from the param groups (load_state_dict); the per-parameter state in
            # the checkpoint has none (model-space formats) or the pre-fill's placeholder.
            tensors = dict(tensors, step=None)
        return set_states(self, model_param, tensors)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict_prefilled
    DistributedOptimizer.load_state_dict = load_state_dict_with_own_steps
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_except_step


def install() -> None:
    """Safe loading and exact distributed-optimizer resume for megatron's checkpoints (idempotent;
    call before the first checkpoint is read)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _install_safe_loading()
    _install_distributed_optimizer_fixes()
    _INSTALLED = True


# --------------------------------------------------------------------------------------------
# Finding and reading checkpoints


def find_checkpoint(load_dir: str | os.PathLike) -> tuple[int | str, Path]:
    """The checkpoint ``load_dir``'s tracker names: (iteration or 'release', its directory).

    Raises CheckpointError when there is none, or when it is incomplete (a save that did not
    finish: no ``.metadata``, or a data file shorter than the metadata says).
    """
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"{load_dir} does not exist: pass a directory that a run saved to with --save")
    tracker = load_dir / TRACKER
    if not tracker.is_file():
        saved = sorted(p.name for p in load_dir.glob("iter_*"))
        hint = (f" ({', '.join(saved[:3])} exist but no save finished)" if saved else "")
        raise CheckpointError(f"{load_dir} holds no checkpoint: {TRACKER} is missing{hint}")
    text = tracker.read_text().strip()
    if text == RELEASE:
        which: int | str = RELEASE
        path = load_dir / RELEASE
    elif text.isdigit():
        which = int(text)
        path = load_dir / f"iter_{which:07d}"
    else:
        raise CheckpointError(f"{tracker} reads {text!r}, not an iteration: a save was interrupted while "
                              f"updating it; write the iteration of the newest complete iter_* directory into it")
    _check_complete(path)
    return which, path


def _check_complete(path: Path) -> None:
    """A torch_dist checkpoint directory whose save finished: metadata present, data files whole."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing although {TRACKER} names it: the checkpoint was "
                              f"moved or deleted")
    if not (path / "metadata.json").is_file():
        if any(path.glob("mp_rank_*")):
            return  # megatron's legacy 'torch' format: megatron checks it itself
        raise CheckpointError(f"{path} is not a torch_dist checkpoint (no metadata.json)")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is incomplete (no .metadata): its save did not finish")
    install()
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - a refused class, a truncated or foreign file
        raise CheckpointError(f"{path}/.metadata cannot be read safely: {_first_line(err)}") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            have = file.stat().st_size if file.is_file() else "no"
            raise CheckpointError(f"{path} is incomplete: {name} has {have} bytes of the {size} its "
                                  f"metadata lists (truncated or deleted)")


def read_common_state(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's common (non-tensor) state, read safely: ``args``, ``iteration``,
    ``content_metadata``, ... Works without a process group."""
    install()
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... assuming ... a single process"
        try:
            return dist_checkpointing.load_common_state_dict(str(checkpoint_path))
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - torch wraps the reader's error
            if "Weights only load failed" in str(err):
                raise CheckpointError(f"{checkpoint_path} stores an object that weights-only loading refuses, "
                                      f"so it was not loaded (the file may have been tampered with): "
                                      f"{_first_line(err)}") from None
            raise CheckpointError(f"{checkpoint_path}: its common state does not load: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    """The first informative line of a (possibly many-line) exception message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:  # torch's weights-only error names the refused global on a later line
        if "Unsupported global" in line:
            return line.split(". Please")[0]
    return lines[0] if lines else type(err).__name__


def read_checkpoint_args(load_dir: str | os.PathLike) -> argparse.Namespace:
    """The arguments of the run that saved ``load_dir``'s current checkpoint."""
    _, path = find_checkpoint(load_dir)
    args = read_common_state(path).get("args")
    if args is None:
        raise CheckpointError(f"{path} stores no run arguments: it was not saved by megatron.training")
    return args


# --------------------------------------------------------------------------------------------
# Refusing a --load that cannot work


def _effective(args: Any, field: str) -> Any:
    value = getattr(args, field, None)
    if field == "num_query_groups" and (value is None or not getattr(args, "group_query_attention", False)):
        return args.num_attention_heads
    if field == "kv_channels" and value is None:
        return args.hidden_size // args.num_attention_heads
    if field == "moh_two_stage":
        return bool(value)
    return value


# Fields that fix the shapes or the function of the saved weights.
MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "padded_vocab_size", "normalization", "swiglu", "add_bias_linear", "add_qkv_bias",
    "qk_layernorm", "untie_embeddings_and_output_weights", "position_embedding_type",
    "moh_dense_baseline", "moh_num_shared_heads", "moh_topk", "moh_router", "moh_gate", "moh_two_stage",
)


def compare_model_args(saved: Any, current: Any) -> list[str]:
    """Human-readable differences between the model a checkpoint holds and the one ``current``
    builds (empty when they match)."""
    problems = []
    for field in MODEL_FIELDS:
        if field.startswith("moh_") and not hasattr(saved, field):
            continue  # a megatron GPT saved without this project: its weights may still fit
        before, now = _effective(saved, field), _effective(current, field)
        if before != now:
            problems.append(f"{field}={before!r} in the checkpoint but {now!r} here")
    return problems


def _file_digest(path: Any) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_load(args: argparse.Namespace) -> None:
    """Raise CheckpointError (one line) if ``args.load`` cannot be loaded by this run.

    A ``--load`` directory with no checkpoint is fine only when it is also the ``--save``
    directory (the first launch of an auto-resuming job); anywhere else megatron would silently
    start from random weights. Also installs `install`'s hooks.
    """
    install()
    load = getattr(args, "load", None)
    if load is None:
        return
    save = getattr(args, "save", None)
    auto_resume = save is not None and Path(save).resolve() == Path(load).resolve()
    if auto_resume and not (Path(load) / TRACKER).exists():
        return
    try:
        which, path = find_checkpoint(load)
    except CheckpointError as err:
        pretrained = getattr(args, "pretrained_checkpoint", None)
        if pretrained is None:
            raise CheckpointError(f"--load {err}") from None
        which, path = find_checkpoint(pretrained)
    step = getattr(args, "ckpt_step", None)
    if step:  # megatron loads this iteration instead of the tracker's
        which, path = step, path.parent / f"iter_{step:07d}"
        _check_complete(path)
    state = read_common_state(path)
    saved = state.get("args")
    if saved is None:
        return
    problems = compare_model_args(saved, args)
    finetune = getattr(args, "finetune", False) or which == RELEASE
    saved_tokenizer = _file_digest(getattr(saved, "tokenizer_model", None))
    current_tokenizer = _file_digest(getattr(args, "tokenizer_model", None))
    if saved_tokenizer and current_tokenizer and saved_tokenizer != current_tokenizer:
        problems.append(f"tokenizer model {args.tokenizer_model} is not the checkpoint's "
                        f"({saved.tokenizer_model}): another vocabulary")
    if not finetune and getattr(saved, "tokenizer_type", None) != getattr(args, "tokenizer_type", None):
        problems.append(f"tokenizer_type={saved.tokenizer_type!r} in the checkpoint but {args.tokenizer_type!r} here")
    if problems:
        hint = ""
        if any(p.startswith("padded_vocab_size") for p in problems):
            hint = (" (the padded vocabulary is the tokenizer's size rounded up to a multiple of "
                    "--make-vocab-size-divisible-by x TP: pick --make-vocab-size-divisible-by so both match)")
        raise CheckpointError(f"--load {path} holds another model: {'; '.join(problems)}{hint}")
    if not finetune:
        _check_optimizer_reshard(path, state, saved, args)


def _check_optimizer_reshard(path: Path, state: dict, saved: Any, args: Any) -> None:
    """Refuse optimizer state that megatron-core cannot load into this run's optimizer or layout."""
    if getattr(args, "no_load_optim", False) or "optimizer" not in state:
        return
    sharding = (state.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    saved_dist, now_dist = bool(getattr(saved, "use_distributed_optimizer", False)), bool(args.use_distributed_optimizer)
    fresh = "or pass --no-load-optim (the weights load, the optimizer starts fresh)"
    if saved_dist != now_dist:
        raise CheckpointError(
            f"--load {path} was saved {'with' if saved_dist else 'without'} --use-distributed-optimizer and "
            f"megatron-core cannot load its optimizer state into the other optimizer: "
            f"{'add' if saved_dist else 'drop'} --use-distributed-optimizer {fresh}")
    saved_layout = (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size)
    if saved_dist and sharding != "fully_reshardable" and saved_layout != (
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size):
        raise CheckpointError(
            f"--load {path} was saved at TP={saved_layout[0]} PP={saved_layout[1]} with the distributed optimizer in "
            f"megatron's {sharding} format, whose optimizer state only loads at the same TP and PP (any DP): "
            f"load it at TP={saved_layout[0]} PP={saved_layout[1]} {fresh}; runs saved with "
            f"--dist-ckpt-optim-fully-reshardable reshard their optimizer state too")


# --------------------------------------------------------------------------------------------
# One whole model in one process


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


def _one_process_args(saved: argparse.Namespace) -> argparse.Namespace:
    """A copy of a run's arguments for the same model as one TP=1/PP=1 chunk on this machine."""
    from megatron_moh import platform

    args = argparse.Namespace(**vars(saved))
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = None
    args.num_layers_per_virtual_pipeline_stage = None
    args.context_parallel_size = 1
    args.sequence_parallel = False
    args.use_cpu_initialization = True
    args.perform_initialization = False  # the checkpoint overwrites every weight
    args.fp8 = None
    args.recompute_granularity = None
    args.recompute_method = None
    args.recompute_num_layers = None
    args.transformer_impl = "local" if platform.cpu_requested() else args.transformer_impl
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The whole GPT (one TP=1/PP=1 chunk) that ``args`` describe, weights uninitialised."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_moh.builder import build_gpt_model
    from megatron_moh.config import MoHTransformerConfig

    args = _one_process_args(args)
    config = core_transformer_config_from_args(args, MoHTransformerConfig)
    return build_gpt_model(
        config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        backend="te" if args.transformer_impl == "transformer_engine" else "local",
        moh=not getattr(args, "moh_dense_baseline", False),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base,
    )


def load_model(load_dir: str | os.PathLike) -> tuple[torch.nn.Module, argparse.Namespace]:
    """The model of ``load_dir``'s current checkpoint, saved at any TP/PP/VPP, as one TP=1/PP=1
    GPTModel in this process (megatron's distributed checkpointing reshards), and the saving run's
    arguments. Needs `single_process_group` (or an equivalent one-rank group)."""
    from megatron.core import dist_checkpointing

    _, path = find_checkpoint(load_dir)
    state = read_common_state(path)
    saved = state.get("args")
    if saved is None:
        raise CheckpointError(f"{path} stores no run arguments: it was not saved by megatron.training")
    model = build_model(saved)
    metadata = dict(state.get("content_metadata") or {})
    sharded = model.sharded_state_dict(metadata=metadata)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as err:  # noqa: BLE001 - megatron's messages are long; keep the first line
        raise CheckpointError(f"{path} does not load into the model its own arguments describe: "
                              f"{_first_line(err)}") from err
    model.load_state_dict({key: loaded[key] for key in sharded}, strict=True)  # drop the common state
    return model.eval(), saved


# --------------------------------------------------------------------------------------------
# Hugging Face export and import

SENTENCEPIECE_TOKENIZERS = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")


def _fresh_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir`` as a Path, refusing (before any work) to replace an existing one unless asked."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists: pass --overwrite to replace it, or choose another directory")
    return out


@contextlib.contextmanager
def _written_atomically(out: Path) -> Iterator[Path]:
    """A scratch directory beside ``out`` that replaces ``out`` only once everything is written, so
    a failed conversion leaves no half-written output (and an overwritten one stays intact)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield scratch
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _model_config(args: argparse.Namespace):
    """The MoHTransformerConfig of a run's arguments (a dense baseline as an all-shared MoH layout,
    which computes the same function)."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_moh.config import MoHTransformerConfig

    args = _one_process_args(args)
    if getattr(args, "moh_dense_baseline", False):
        args.moh_num_shared_heads, args.moh_topk = args.num_attention_heads, 0
        args.moh_router, args.moh_gate, args.moh_two_stage = "query_norm", "binary", False
    return core_transformer_config_from_args(args, MoHTransformerConfig)


def _export_tokenizer(saved: argparse.Namespace, tokenizer_model: str | os.PathLike | None) -> tuple[str | None, str]:
    """(sentencepiece model or Hugging Face tokenizer directory to export, its kind)."""
    if tokenizer_model is not None:
        path = Path(tokenizer_model)
        if not path.exists():
            raise CheckpointError(f"--tokenizer-model {path} does not exist")
        return str(path), "hf" if path.is_dir() else "sentencepiece"
    kind = getattr(saved, "tokenizer_type", None)
    stored = getattr(saved, "tokenizer_model", None)
    if kind in SENTENCEPIECE_TOKENIZERS or kind == "HuggingFaceTokenizer":
        if not stored or not Path(stored).exists():
            raise CheckpointError(f"the run's tokenizer ({kind}, {stored}) is not on this machine: pass "
                                  f"--tokenizer-model with its sentencepiece .model file")
        return str(stored), "hf" if kind == "HuggingFaceTokenizer" else "sentencepiece"
    return None, "none"


def export_hf(
    load_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dense: bool = False,
    tokenizer_model: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the current checkpoint of ``load_dir`` (saved at any TP/PP) as a Hugging Face
    ``moh_llama`` directory (``dense=True``: a plain Llama, refused unless every gate is 1).

    The embedding and output layer keep megatron's padded vocabulary (``padded_vocab_size``
    rows): the padding rows take part in megatron's softmax, so the exported logits equal
    megatron's. The tokenizer is the run's sentencepiece model unless ``tokenizer_model`` says
    otherwise (none for NullTokenizer runs).
    """
    from megatron_moh import hf_convert as hc

    out = _fresh_output_dir(out_dir, overwrite)
    saved = read_checkpoint_args(load_dir)
    tokenizer, tokenizer_kind = _export_tokenizer(saved, tokenizer_model)
    try:
        hf_config = hc.moh_hf_config(
            _model_config(saved), vocab_size=saved.padded_vocab_size,
            max_position_embeddings=saved.max_position_embeddings, rotary_base=saved.rotary_base,
            tie_embeddings=not saved.untie_embeddings_and_output_weights)
        if dense:
            hc.dense_llama_config(hf_config)
    except hc.ConversionError as err:
        raise CheckpointError(str(err)) from None
    with single_process_group():
        model, saved = load_model(load_dir)
        hf_state = hc.megatron_to_hf(model.state_dict(), model.config)
        writer = hc.save_dense_hf_checkpoint if dense else hc.save_hf_checkpoint
        with _written_atomically(out) as scratch:
            writer(scratch, hf_state, hf_config, max_shard_size=max_shard_size,
                   tokenizer_model_path=tokenizer if tokenizer_kind == "sentencepiece" else None)
            if tokenizer_kind == "hf":
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(tokenizer).save_pretrained(scratch)
    return out


def _import_args(hf_config: Any, config_kwargs: dict, model_kwargs: dict, hf_dir: Path, tensor_parallel: int,
                 pipeline_parallel: int, divisible_by: int, dtype: torch.dtype) -> argparse.Namespace:
    """The arguments a pretrain_moh.py run of this model at the given layout would save."""
    from megatron.training.arguments import parse_args, validate_args

    from megatron_moh.cli import add_moh_args

    has_tokenizer = any((hf_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tokenizer = (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir.resolve())]
                 if has_tokenizer else ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(hf_config.vocab_size)])
    c = config_kwargs
    argv = [
        "--num-layers", c["num_layers"], "--hidden-size", c["hidden_size"], "--ffn-hidden-size", c["ffn_hidden_size"],
        "--num-attention-heads", c["num_attention_heads"], "--group-query-attention",
        "--num-query-groups", c["num_query_groups"], "--kv-channels", c["kv_channels"],
        "--norm-epsilon", c["layernorm_epsilon"], "--max-position-embeddings", model_kwargs["max_sequence_length"],
        "--seq-length", model_kwargs["max_sequence_length"], "--micro-batch-size", 1,
        "--tensor-model-parallel-size", tensor_parallel, "--pipeline-model-parallel-size", pipeline_parallel,
        "--make-vocab-size-divisible-by", divisible_by, "--ckpt-format", "torch_dist",
        "--moh-num-shared-heads", c["moh_num_shared_heads"], "--moh-topk", c["moh_topk"],
        "--moh-router", c["moh_router"], "--moh-gate", c["moh_gate"],
        "--moh-two-stage" if c["moh_two_stage"] else "--no-moh-two-stage",
        *({torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}.get(dtype, [])), *tokenizer,
    ]
    argv_before = sys.argv
    sys.argv = ["pretrain_moh.py", *map(str, argv)]
    try:
        args = parse_args(extra_args_provider=add_moh_args)
    finally:
        sys.argv = argv_before
    args.rank, args.world_size = 0, tensor_parallel * pipeline_parallel
    args.rotary_base = model_kwargs["rotary_base"]
    args.untie_embeddings_and_output_weights = not model_kwargs["share_embeddings_and_output_weights"]
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    args.padded_vocab_size = calculate_padded_vocab_size(hf_config.vocab_size, divisible_by, tensor_parallel,
                                                         logging_enabled=False)
    return args


def _check_layout(config_kwargs: dict, tensor_parallel: int, pipeline_parallel: int) -> None:
    from megatron_moh.config import MoHConfigError, check_moh_config

    layout = argparse.Namespace(**{"moh_attention_impl": "dense", "moh_load_balance_coeff": 0.0, **config_kwargs,
                                   "tensor_model_parallel_size": tensor_parallel})
    try:
        check_moh_config(layout)
    except MoHConfigError as err:
        raise CheckpointError(f"this model cannot run at TP={tensor_parallel}: {err}") from None
    if tensor_parallel < 1 or pipeline_parallel < 1 or config_kwargs["num_layers"] % pipeline_parallel:
        raise CheckpointError(f"PP={pipeline_parallel} does not divide the model's {config_kwargs['num_layers']} "
                              f"layers: choose a pipeline size that does")


def import_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: Any = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    make_vocab_size_divisible_by: int = 128,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face Llama (with ``layout``: 'dense', 'published' or a MoHLayout) or
    MoH-Llama (``layout=None``) directory as a megatron torch_dist checkpoint for continue-tuning
    with ``pretrain_moh.py --load OUT --finetune`` at TP=``tensor_parallel``, PP=``pipeline_parallel``.

    The checkpoint is a megatron *release* checkpoint (tracker 'release': weights only, iteration 0,
    no optimizer or RNG state), written from this one process: torch_dist stores every tensor
    whole-addressable and megatron reshards on load, so it loads at any TP/PP. The chosen TP fixes
    the padded vocabulary (the Llama vocabulary rounded up to a multiple of
    ``make_vocab_size_divisible_by`` x TP, new rows zero; train with the same
    ``--make-vocab-size-divisible-by``), and TP/PP are recorded as the run's layout. A learned
    router starts at zero (see megatron_moh.hf_convert).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata, generate_state_dict

    from megatron_moh import hf_convert as hc
    from megatron_moh.hf.configuration_moh import MoHLlamaConfig

    hf_dir = Path(hf_dir)
    out = _fresh_output_dir(out_dir, overwrite)
    try:
        hf_config = hc.load_hf_config(hf_dir)
        is_moh = hf_config.model_type == MoHLlamaConfig.model_type
        if is_moh and layout is not None:
            raise CheckpointError(f"{hf_dir} is a moh_llama checkpoint with its own MoH layout: drop --layout")
        if not is_moh and layout is None:
            raise CheckpointError(f"{hf_dir} is a plain Llama: choose its MoH layout with --layout dense (every "
                                  f"head shared: the same function), published (50% shared, 25% routed-active, "
                                  f"query-norm router) or custom (--moh-* flags)")
        config_kwargs = hc.megatron_config_kwargs(hf_config, layout)
        _check_layout(config_kwargs, tensor_parallel, pipeline_parallel)
        imported = hc.import_hf_checkpoint(hf_dir, layout)
    except hc.ConversionError as err:
        raise CheckpointError(str(err)) from None
    state = dict(imported.state_dict)
    dtype = dtype or state["embedding.word_embeddings.weight"].dtype
    args = _import_args(hf_config, imported.config_kwargs, imported.model_kwargs, hf_dir, tensor_parallel,
                        pipeline_parallel, make_vocab_size_divisible_by, dtype)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in state:
            rows = state[key]
            state[key] = torch.cat([rows, rows.new_zeros(args.padded_vocab_size - rows.shape[0], rows.shape[1])])
    state = {k: v.to(dtype) for k, v in state.items()}
    with single_process_group():
        model = build_model(args)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"the Hugging Face weights do not fit the model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        metadata = _build_sharded_state_dict_metadata(args, dp_cp_group=parallel_state.get_data_parallel_group())
        common = generate_state_dict(args, [model], None, None, None, iteration=0,
                                     model_sd_kwargs=dict(metadata=metadata))
        with _written_atomically(out) as scratch:
            (scratch / RELEASE).mkdir()
            dist_checkpointing.save(common, str(scratch / RELEASE),
                                    content_metadata=_clean_metadata_for_serialization(metadata))
            (scratch / TRACKER).write_text(RELEASE)
    return out


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def finetune_flags(args: argparse.Namespace) -> list[str]:
    """The pretrain_moh.py flags that build the model ``args`` (a checkpoint's stored arguments)
    describe, at its recorded TP/PP: what ``--load DIR --finetune`` needs besides data and
    training settings. Tied embeddings have no flag of their own (the project's default is
    untied), so for them the list includes --use-checkpoint-args, which restores the setting."""
    flags = ["--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
             "--ffn-hidden-size", args.ffn_hidden_size, "--num-attention-heads", args.num_attention_heads]
    if getattr(args, "group_query_attention", False):
        flags += ["--group-query-attention", "--num-query-groups", args.num_query_groups]
    flags += ["--kv-channels", _effective(args, "kv_channels"), "--max-position-embeddings",
              args.max_position_embeddings, "--rotary-base", _number(args.rotary_base),
              "--norm-epsilon", args.layernorm_epsilon, "--make-vocab-size-divisible-by", args.make_vocab_size_divisible_by,
              "--tensor-model-parallel-size", args.tensor_model_parallel_size,
              "--pipeline-model-parallel-size", args.pipeline_model_parallel_size]
    if getattr(args, "moh_dense_baseline", False):
        flags += ["--moh-dense-baseline"]
    elif hasattr(args, "moh_router"):
        flags += ["--moh-num-shared-heads", args.moh_num_shared_heads, "--moh-topk", args.moh_topk,
                  "--moh-router", args.moh_router, "--moh-gate", args.moh_gate,
                  "--moh-two-stage" if args.moh_two_stage else "--no-moh-two-stage"]
    flags += ["--tokenizer-type", args.tokenizer_type]
    if args.tokenizer_type == "NullTokenizer":
        flags += ["--vocab-size", args.vocab_size]
    elif getattr(args, "tokenizer_model", None):
        flags += ["--tokenizer-model", args.tokenizer_model]
    if getattr(args, "bf16", False):
        flags += ["--bf16"]
    elif getattr(args, "fp16", False):
        flags += ["--fp16"]
    if not args.untie_embeddings_and_output_weights:
        flags += ["--use-checkpoint-args"]
    return [str(flag) for flag in flags]
