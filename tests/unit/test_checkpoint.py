"""A --load whose MoE layout differs from the run's is refused; the same layout written two ways
(an MoE frequency or its 0/1 list; MoE settings of a model without experts) is not. Damaged
checkpoint data is refused by its CRC-32s, naming the file and the item."""

from argparse import Namespace

import pytest
import torch

from megatron_moh import checkpoint
from megatron_moh.checkpoint import compare_model_args

DENSE = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_experts=None, moe_ffn_hidden_size=None,
             moe_layer_freq=1, moe_router_topk=2, moe_shared_expert_intermediate_size=None,
             moe_shared_expert_gate=False)
MOE = dict(DENSE, num_experts=4, moe_ffn_hidden_size=32)


def test_same_moe_layout_written_two_ways_loads():
    assert compare_model_args(Namespace(**MOE), Namespace(**dict(MOE, moe_layer_freq=[1, 1, 1, 1]))) == []
    assert compare_model_args(Namespace(**dict(MOE, moe_layer_freq=2)),
                              Namespace(**dict(MOE, moe_layer_freq=[1, 0, 1, 0]))) == []
    assert compare_model_args(Namespace(**DENSE), Namespace(**dict(DENSE, moe_router_topk=4))) == []


def test_other_moe_layout_is_refused():
    assert compare_model_args(Namespace(**DENSE), Namespace(**MOE)) == [
        "num_experts=None in the checkpoint but 4 here", "moe_ffn_hidden_size=None in the checkpoint but 32 here",
        "moe_layer_freq=None in the checkpoint but [1, 1, 1, 1] here",
        "moe_router_topk=None in the checkpoint but 2 here"]
    assert compare_model_args(Namespace(**MOE), Namespace(**dict(MOE, moe_layer_freq=2))) == [
        "moe_layer_freq=[1, 1, 1, 1] in the checkpoint but [1, 0, 1, 0] here"]
    assert compare_model_args(Namespace(**MOE), Namespace(**dict(MOE, moe_shared_expert_intermediate_size=64))) == [
        "moe_shared_expert_intermediate_size=None in the checkpoint but 64 here"]


# --------------------------------------------------------------------------------------------
# The data is verified against the CRC-32s saved with it


@pytest.fixture
def saved(tmp_path):
    """A torch_dist checkpoint (megatron's writer) of a few tensors, and the tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    generator = torch.Generator().manual_seed(0)
    tensors = {"embedding.word_embeddings.weight": torch.randn(512, 64, generator=generator),
               "decoder.weight": torch.randn(64, 64, generator=generator),
               "optimizer.state.exp_avg.decoder.weight": torch.randn(64, 64, generator=generator)}
    (tmp_path / "iter").mkdir()
    sharded = {key: ShardedTensor.from_rank_offsets(key, value.clone()) for key, value in tensors.items()}
    dist_checkpointing.save(sharded, str(tmp_path / "iter"))
    return tmp_path / "iter", tensors


def _item(path, name):
    return next(item for item in checkpoint.data_items(path) if item.name == name)


def _load(path, tensors):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    empty = {key: ShardedTensor.from_rank_offsets(key, torch.empty_like(value)) for key, value in tensors.items()}
    return dist_checkpointing.load(empty, str(path))


def test_a_whole_checkpoint_passes_and_the_ranks_share_the_work(saved):
    path, tensors = saved
    data = sum(value.numel() * 4 for value in tensors.values())
    checked = checkpoint.verify_checkpoint(path)
    assert data < checked < data + 4096  # every tensor's bytes, and the archives' small records
    assert sum(checkpoint.verify_checkpoint(path, part=part, parts=3) for part in range(3)) == checked
    assert checkpoint.verify_checkpoint(path, optimizer=False) < checked - 64 * 64 * 4


@pytest.mark.parametrize("damage", ["flipped bytes", "replaced rows"])
def test_damaged_data_is_refused_naming_the_file_and_the_item(damage, saved):
    """What issue 17 did to checkpoints: random bytes written into the middle of an item; 512
    embedding rows replaced by finite random floats. torch's reader loads both without a word."""
    path, tensors = saved
    name = "embedding.word_embeddings.weight"
    item = _item(path, name)
    file = path / item.file
    data = bytearray(file.read_bytes())
    if damage == "flipped bytes":
        middle = item.offset + item.length // 2
        data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    else:
        rows = tensors[name].numpy().tobytes()
        start = data.index(rows, item.offset)
        random_rows = torch.rand(512, 64, generator=torch.Generator().manual_seed(1))  # finite, like real weights
        data[start:start + len(rows)] = random_rows.numpy().tobytes()
    file.write_bytes(bytes(data))
    assert not torch.equal(_load(path, tensors)[name], tensors[name])  # what megatron would train on
    expected = (f"{file} is damaged: {name} (its bytes {item.offset}-{item.offset + item.length}) does not match "
                f"the CRC-32 saved with it (Bad CRC-32 for file 'archive/data/0'): restore the file from a copy, or "
                f"use an earlier checkpoint")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.verify_checkpoint(path)
    assert str(refused.value) == expected
    shares = []
    for part in range(2):  # exactly one rank of two finds it
        try:
            checkpoint.verify_checkpoint(path, part=part, parts=2)
        except checkpoint.CheckpointError:
            shares.append(part)
    assert len(shares) == 1


def test_a_damaged_archive_structure_is_refused(saved):
    path, _ = saved
    item = _item(path, "decoder.weight")
    file = path / item.file
    data = bytearray(file.read_bytes())
    data[item.offset:item.offset + 4] = b"JUNK"  # the first record's header
    file.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"decoder.weight \(its bytes .*\) is not a whole torch.save "
                                                         r"archive"):
        checkpoint.verify_checkpoint(path)


def test_archives_saved_without_crcs_are_not_refused(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    torch.serialization.set_crc32_options(False)
    try:
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(8))}, str(tmp_path))
    finally:
        torch.serialization.set_crc32_options(True)
    assert checkpoint.verify_checkpoint(tmp_path) == 0  # nothing to check against
