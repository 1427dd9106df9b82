"""Finding, verifying and pre-flight checking megatron ``torch_dist`` checkpoints.

Saving and resuming are megatron.training's own (``--save``, ``--load``, ``--save-interval``,
``--exit-*``), made safe and exact by `megatron_moh.patches.checkpointing`; every read here refuses
to run without those patches (`megatron_moh.patches.install_all`). This module answers
"is this checkpoint usable, and by this run?" before any process group starts: a ``--load`` that
cannot work (missing, partial, damaged, another model shape or vocabulary, distributed-optimizer
state that cannot be resharded) is refused with one line (`check_load`). `verify_checkpoint`
checks the data against the CRC-32s it was saved with, for training and the tools alike.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_moh.layout import MoHLayout, moe_layer_pattern
from megatron_moh.patches import checkpointing

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message (one line) says why and what to do."""


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
    checkpointing.require_safe_loading()
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - a refused class, a truncated or foreign file
        raise CheckpointError(f"{path}/.metadata cannot be read safely: {first_line(err)}") from None
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
    checkpointing.require_safe_loading()
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
                                      f"{first_line(err)}") from None
            raise CheckpointError(f"{checkpoint_path}: its common state does not load: {first_line(err)}") from None


def first_line(err: BaseException) -> str:
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
# Verifying the data against its checksums
#
# A .distcp file holds one torch.save zip archive per item (a tensor shard, a pickled object),
# back to back; each record of an archive carries the CRC-32 torch.save computed. torch's reader
# loads an item by offset and never checks them, so damaged bytes would be trained on.


@dataclass(frozen=True)
class DataItem:
    """One archive of a checkpoint: which state it holds (a shard of it: the byte range tells
    shards apart) and where its bytes are."""

    name: str
    file: str
    offset: int
    length: int


def data_items(path: str | os.PathLike) -> list[DataItem]:
    """The archives of the torch_dist checkpoint directory ``path``, in the order of their files."""
    checkpointing.require_safe_loading()
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(path)).read_metadata().storage_data
    items = [DataItem(index.fqn, info.relative_path, info.offset, info.length) for index, info in storage.items()]
    return sorted(items, key=lambda item: (item.file, item.offset))


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of a file, as a seekable file of their own."""

    def __init__(self, file: Path, start: int, length: int) -> None:
        self._file = open(file, "rb", buffering=0)
        self._start, self._length, self._position = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + position)
        return self._position

    def readinto(self, buffer: Any) -> int:
        size = max(0, min(len(buffer), self._length - self._position))
        done = os.preadv(self._file.fileno(), [memoryview(buffer)[:size]], self._start + self._position)
        self._position += done
        return done

    def close(self) -> None:
        self._file.close()
        super().close()


_BLOCK = 1 << 23  # bytes read at a time: memory stays bounded whatever the size of an item


def _check_item(path: Path, item: DataItem) -> int:
    """Read ``item``'s archive record by record, as zipfile checks each against its CRC-32;
    return the bytes checked (0 for an archive saved without CRCs)."""
    try:
        with _Window(path / item.file, item.offset, item.length) as window, zipfile.ZipFile(window) as archive:
            records = archive.infolist()
            if not any(record.CRC for record in records):
                return 0  # saved with torch.serialization.set_crc32_options(False): nothing to check against
            for record in records:
                with archive.open(record) as data:
                    while data.read(_BLOCK):
                        pass
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile raises several kinds on damaged bytes
        what = "does not match the CRC-32 saved with it" if "CRC" in str(err) else "is not a whole torch.save archive"
        raise CheckpointError(f"{path / item.file} is damaged: {item.name} (its bytes {item.offset}-"
                              f"{item.offset + item.length}) {what} ({first_line(err)}): restore the file from a copy, "
                              f"or use an earlier checkpoint") from None
    return sum(record.file_size for record in records)


def verify_checkpoint(path: str | os.PathLike, *, optimizer: bool = True, part: int = 0, parts: int = 1,
                      threads: int | None = None) -> int:
    """Check the data of the torch_dist checkpoint directory ``path`` against the CRC-32s saved
    with it, reading each item in blocks; raise CheckpointError (one line naming the file and the
    item) at the first damaged one. Returns the bytes checked.

    ``optimizer=False`` skips the optimizer state (for loads that do not read it). The items are
    shared out by size among ``parts`` callers, so that the ranks of a job read the checkpoint
    once between them: this one checks share ``part``, on ``threads`` threads (zlib's CRC-32
    releases the GIL)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        return 0  # megatron's legacy format: no archives to check
    items = [item for item in data_items(path) if optimizer or not item.name.startswith("optimizer.")]
    loads, mine = [0] * parts, []
    for item in sorted(items, key=lambda item: -item.length):
        least = loads.index(min(loads))
        loads[least] += item.length
        if least == part:
            mine.append(item)
    mine.sort(key=lambda item: (item.file, item.offset))
    pool = ThreadPoolExecutor(threads or min(4, len(os.sched_getaffinity(0))), thread_name_prefix="verify-checkpoint")
    try:
        return sum(pool.map(lambda item: _check_item(path, item), mine))
    finally:
        pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Refusing a --load that cannot work


def effective_arg(args: Any, field: str) -> Any:
    """The value of ``field`` that the model ``args`` (a run's or a checkpoint's arguments)
    describes builds with, whatever defaults or equivalent spellings the arguments use."""
    value = getattr(args, field, None)
    if field == "num_query_groups" and (value is None or not getattr(args, "group_query_attention", False)):
        return args.num_attention_heads
    if field == "kv_channels" and value is None:
        return args.hidden_size // args.num_attention_heads
    if field in MoHLayout.field_names():
        return MoHLayout.of(args).resolved(args.num_attention_heads).as_fields()[field]
    if field == "moe_shared_expert_gate":  # whether a gated shared expert exists
        return bool(value and getattr(args, "num_experts", None)
                    and getattr(args, "moe_shared_expert_intermediate_size", None))
    if field.startswith("moe_") and not getattr(args, "num_experts", None):
        return None  # no MoE layers: megatron ignores the MoE settings
    if field == "moe_layer_freq" and isinstance(value, int):
        return [int(moe) for moe in moe_layer_pattern(value, args.num_layers)]
    return value


# Fields that fix the shapes or the function of the saved weights.
MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "padded_vocab_size", "normalization", "swiglu", "add_bias_linear", "add_qkv_bias",
    "qk_layernorm", "untie_embeddings_and_output_weights", "position_embedding_type",
    "moh_dense_baseline", *MoHLayout.field_names(),
    "num_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_topk", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
)


def compare_model_args(saved: Any, current: Any) -> list[str]:
    """Human-readable differences between the model a checkpoint holds and the one ``current``
    builds (empty when they match)."""
    problems = []
    for field in MODEL_FIELDS:
        if field.startswith("moh_") and not hasattr(saved, field):
            continue  # a megatron GPT saved without this project: its weights may still fit
        before, now = effective_arg(saved, field), effective_arg(current, field)
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
    directory (the first launch of an auto-resuming job), or when ``--pretrained-checkpoint``
    names one (megatron fine-tunes from it, which is checked instead); anywhere else megatron
    would silently start from random weights.
    """
    load = getattr(args, "load", None)
    if load is None:
        return
    save = getattr(args, "save", None)
    pretrained = getattr(args, "pretrained_checkpoint", None)
    auto_resume = save is not None and Path(save).resolve() == Path(load).resolve()
    if auto_resume and not (Path(load) / TRACKER).exists() and pretrained is None:
        return
    from_pretrained = False
    try:
        which, path = find_checkpoint(load)
    except CheckpointError as err:
        if pretrained is None:
            raise CheckpointError(f"--load {err}") from None
        try:  # megatron then fine-tunes from it
            which, path = find_checkpoint(pretrained)
        except CheckpointError as err:
            raise CheckpointError(f"--pretrained-checkpoint {err}") from None
        from_pretrained = True
    step = getattr(args, "ckpt_step", None)
    if step:  # megatron loads this iteration instead of the tracker's
        which, path = step, path.parent / f"iter_{step:07d}"
        _check_complete(path)
    # megatron reads the optimizer state unless told not to, or from a release checkpoint
    optimizer = not (getattr(args, "finetune", False) or getattr(args, "no_load_optim", False) or which == RELEASE)
    verify_checkpoint(path, optimizer=optimizer, part=getattr(args, "rank", 0), parts=getattr(args, "world_size", 1))
    state = read_common_state(path)
    saved = state.get("args")
    if saved is None:
        return
    problems = compare_model_args(saved, args)
    finetune = getattr(args, "finetune", False) or from_pretrained or which == RELEASE
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
        _check_schedule(path, saved, args)


def _check_optimizer_reshard(path: Path, state: dict, saved: Any, args: Any) -> None:
    """Refuse optimizer state that megatron-core cannot load into this run's optimizer or layout."""
    if getattr(args, "no_load_optim", False) or "optimizer" not in state:
        return
    sharding = (state.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    saved_dist = bool(getattr(saved, "use_distributed_optimizer", False))
    now_dist = bool(args.use_distributed_optimizer)
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


def _lr_schedule(args: Any) -> dict[str, Any]:
    """The values megatron's OptimizerParamScheduler compares on load, as megatron derives them."""
    gbs = args.global_batch_size
    if args.train_iters:
        decay = (args.lr_decay_iters or args.train_iters) * gbs
        wd_steps = args.train_iters * gbs
        warmup = args.lr_warmup_iters * gbs
    else:
        decay = args.lr_decay_samples or args.train_samples
        wd_steps = args.train_samples
        warmup = args.lr_warmup_samples
    if getattr(args, "lr_warmup_fraction", None) is not None:
        warmup = args.lr_warmup_fraction * decay
    return {"learning rate": args.lr, "minimum learning rate": args.min_lr, "warmup steps": warmup,
            "decay steps": decay, "decay style": args.lr_decay_style,
            "weight decay": (args.start_weight_decay, args.end_weight_decay, args.weight_decay_incr_style, wd_steps)}


# The flags behind each scheduler value, for the message.
_SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction", "lr_decay_iters",
                   "lr_decay_samples", "train_iters", "train_samples", "global_batch_size", "lr_decay_style",
                   "weight_decay", "start_weight_decay", "end_weight_decay", "weight_decay_incr_style")


def _check_schedule(path: Path, saved: Any, args: Any) -> None:
    """Resuming with another learning-rate schedule trips a bare assertion in megatron's scheduler
    after start-up; say which flag differs and how to choose a schedule instead."""
    if args.no_load_optim or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    try:
        before, now = _lr_schedule(saved), _lr_schedule(args)
    except (AttributeError, TypeError):
        return  # a run saved without these arguments: megatron decides
    if before == now:
        return
    if saved.lr_decay_iters == saved.train_iters and args.lr_decay_iters is None:
        saved = argparse.Namespace(**{**vars(saved), "lr_decay_iters": None})  # megatron filled it in
    changed = [f"--{name.replace('_', '-')} {getattr(saved, name, None)} -> {getattr(args, name, None)}"
               for name in _SCHEDULE_FLAGS if getattr(saved, name, None) != getattr(args, name, None)]
    raise CheckpointError(
        f"--load {path} continues another learning-rate schedule ({', '.join(changed) or 'derived values differ'}): "
        f"pass --override-opt_param-scheduler to follow this run's flags, or --use-checkpoint-opt_param-scheduler "
        f"to keep the checkpoint's schedule")
