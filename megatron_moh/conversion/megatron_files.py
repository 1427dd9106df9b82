"""megatron torch_dist checkpoints one tensor at a time, from one process: a save that makes each
tensor when the writer asks for it, and a load of a few named tensors.

Both work from the sharded state dict of a model on the meta device (`whole_model.build_model` with
``meta=True``), which says every tensor's checkpoint key, global shape, offset and dtype without
memory. The save is megatron's (`dist_checkpointing.save`: common state, content metadata,
metadata.json) with the sharded part written by torch's `FileSystemWriter` with one thread, which
resolves one write item, writes it and drops it before the next (megatron's own writer resolves all
of them first), one file per checkpoint key. Items come in the state dict's order, so the pieces
megatron's SwiGLU factory cuts one ``linear_fc1`` into come one after the other and the tensor is
made once.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from queue import Queue
from typing import Any

import torch
from torch import Tensor

from megatron_moh.checkpoint import CheckpointError, first_line


class _Pieces:
    """Makes the data of each write item (checkpoint key, global offset) from the whole TP=1 tensor
    of its state-dict name, keeping only the last tensor made."""

    def __init__(self, model_state: dict[str, Any], produce: Callable[[str], Tensor]):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        self.produce = produce
        self.pieces: dict[tuple[str, tuple[int, ...]], tuple[str, Any, int]] = {}
        for name, item in list(model_state.items()):
            if isinstance(item, ShardedTensorFactory):  # what dist_checkpointing.save would build
                model_state[name] = built = item.build()
                for index, piece in enumerate(built):
                    self.pieces[piece.key, tuple(piece.global_offset)] = (name, item, index)
            elif isinstance(item, ShardedTensor):
                self.pieces[item.key, tuple(item.global_offset)] = (name, None, 0)
        self.name: str | None = None
        self.tensor: Tensor | None = None

    def __call__(self, key: str, offset: tuple[int, ...]) -> Tensor:
        name, factory, index = self.pieces[key, offset]
        if name != self.name:
            self.name, self.tensor = name, None  # let the previous tensor go before making the next
            self.tensor = self.produce(name)
        if factory is None:
            return self.tensor
        return dataclasses.replace(factory, data=self.tensor).build()[index].data


def _producing_strategy(pieces: _Pieces) -> Any:
    """A `TorchDistSaveShardedStrategy` whose writer asks ``pieces`` for each tensor's data."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as save_pyt
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    class Planner(MCoreSavePlanner):
        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            expected = write_item.tensor_data
            tensor = pieces(write_item.index.fqn, tuple(write_item.index.offset))
            sizes = tuple(expected.chunk.sizes)
            if tensor.dtype != expected.properties.dtype or (1,) * (len(sizes) - tensor.dim()) + tensor.shape != sizes:
                raise CheckpointError(f"{write_item.index.fqn} at {tuple(write_item.index.offset)} came as "
                                      f"{tensor.dtype} {list(tensor.shape)}, but the checkpoint expects "
                                      f"{expected.properties.dtype} {list(sizes)}")
            return tensor.reshape(sizes)  # with the prepended layer axis

    class Writer(FileSystemWriter):
        @property
        def checkpoint_id(self) -> str:  # pickled into .metadata: a str, as megatron's writer stores it
            return str(self.path)

        def write_data(self, plan: Any, planner: Any) -> Any:
            """One file per checkpoint key (the objects in the first), then torch's own write path:
            torch's writer keeps the last tensor it wrote of each key until its file is done, which in
            one file would hold the embedding, the output layer and one of each layer's tensors to the
            end."""
            files: dict[str, list] = {}
            for item in plan.items:
                files.setdefault("" if item.type == WriteItemType.BYTE_IO else item.index.fqn, []).append(item)
            queue: Queue = Queue()
            for i, items in enumerate(files.values()):
                name = f"{plan.storage_data.prefix}{i}.distcp"
                queue.put((self.fs.concat_path(self.path, name), name, items))
            try:
                return self._write_data(planner, queue)
            except BaseException as err:
                # A failed write (a full disk) leaves a memoryview of an object's BytesIO in these
                # frames; Python 3.12.1's garbage collector can free the BytesIO first and crash at
                # exit. Clearing the frames releases the view now, in order.
                traceback.clear_frames(err.__traceback__)
                raise

    class Strategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            planner = Planner(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)
            save_pyt(mcore_to_pyt_state_dict(flat, False), planner=planner,
                     storage_writer=Writer(checkpoint_dir, thread_count=1))

    return Strategy()


def save_produced(state: dict[str, Any], checkpoint_dir: str | os.PathLike, produce: Callable[[str], Tensor],
                  content_metadata: dict[str, Any] | None = None) -> None:
    """`dist_checkpointing.save` of ``state`` (what megatron.training's ``generate_state_dict``
    gives for one model chunk on the meta device), asking ``produce(name)`` for the whole TP=1
    tensor of each state-dict name of ``state["model"]`` when the writer reaches it."""
    from megatron.core import dist_checkpointing

    strategy = _producing_strategy(_Pieces(state["model"], produce))
    dist_checkpointing.save(state, str(checkpoint_dir), sharded_strategy=strategy, content_metadata=content_metadata)


def _sharded_tensors(sharded: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    """(state-dict name, ShardedTensor) of each tensor or factory piece, on whatever device."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for name, item in sharded.items():
        if isinstance(item, ShardedTensorFactory):
            yield from ((name, piece) for piece in item.build())
        elif isinstance(item, ShardedTensor):
            yield name, item


def check_holds(path: Path, sharded: dict[str, Any]) -> None:
    """Refuse (one line, before any data is read) a checkpoint that lacks a tensor of the model
    ``sharded`` describes, or holds it with another global shape."""
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    for name, piece in _sharded_tensors(sharded):
        found = stored.get(piece.key)
        if found is None:
            raise CheckpointError(f"{path} has no {piece.key} (for {name}): it does not hold the model its own "
                                  f"arguments describe")
        if tuple(found.global_shape) != tuple(piece.global_shape):
            raise CheckpointError(f"{path} holds {piece.key} as {list(found.global_shape)}, but the model its own "
                                  f"arguments describe has {list(piece.global_shape)}")


def load_tensors(path: Path, sharded: dict[str, Any], names: Iterable[str]) -> dict[str, Tensor]:
    """The whole (TP=1) tensors ``names`` of the checkpoint at ``path`` (saved at any TP/PP),
    given the model's sharded state dict on the meta device; only those tensors are read.

    Each tensor (each piece of a factory-split one, a view of the whole) is asked for with its layer
    axis as a dimension of its own rather than a prepended one: megatron turns prepended axes into a
    torch ShardedTensor that must list every layer's shard, which one process asking for one layer
    cannot do."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    whole, request = {}, {}
    for name in names:
        item = sharded[name]
        whole[name] = torch.empty_like(item.data, device="cpu")
        filled = dataclasses.replace(item, data=whole[name])
        for i, piece in enumerate(filled.build() if isinstance(item, ShardedTensorFactory) else [filled]):
            shape = (1,) * piece.prepend_axis_num + tuple(piece.local_shape)
            request[f"{name}.{i}"] = dataclasses.replace(piece, data=piece.data.view(shape), local_shape=shape,
                                                         prepend_axis_num=0)
    try:  # access integrity spans whole tensors' shards; this reads a few layers' shards only
        dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    except Exception as err:  # noqa: BLE001 - megatron's messages are long; keep the first line
        raise CheckpointError(f"{path} does not load into the model its own arguments describe: "
                              f"{first_line(err)}") from err
    return whole
