"""Conversion one tensor at a time: the safetensors reader and writer against the safetensors library,
the Hugging Face writer against ``save_pretrained``, and import-hf / export-hf holding one tensor (one
layer) at a time while giving the in-process maps' result bit for bit."""

import argparse
import json
import re
import weakref
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_moh.checkpoint import CheckpointError
from megatron_moh.conversion import ConversionError, hf_checkpoint, hf_files
from megatron_moh.conversion.hf_configs import dense_llama_config, moh_hf_config
from megatron_moh.conversion.megatron_files import check_holds
from megatron_moh.conversion.hf_files import (
    import_hf_checkpoint,
    load_hf_state_dict,
    plan_hf_import,
    save_dense_hf_checkpoint,
    save_hf_checkpoint,
)
from megatron_moh.conversion.safetensors_io import read_header, read_tensor, write_file
from megatron_moh.conversion.weights import VOCAB_TENSORS
from megatron_moh.conversion.whole_model import build_model, checkpoint_model, load_model, single_process_group
from megatron_moh.hf import MoHLlamaForCausalLM
from tests.helpers import tiny_config

TENSORS = {
    "bf16": torch.randn(5, 7).to(torch.bfloat16),
    "fp32": torch.randn(3),
    "fp16": torch.randn(2, 3, 4).to(torch.float16),
    "int64": torch.tensor(7),
    "bool": torch.tensor([True, False, True]),
    "empty": torch.empty(0, 8),
}


def test_streaming_writer_is_read_by_the_safetensors_library(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, {name: t.to("meta") for name, t in TENSORS.items()}, TENSORS.__getitem__)
    assert (int.from_bytes(path.read_bytes()[:8], "little") % 8) == 0
    with safe_open(path, "pt") as file:
        assert file.metadata() == {"format": "pt"} and list(file.keys()) == sorted(TENSORS)
        for name, tensor in TENSORS.items():
            read = file.get_tensor(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def test_reader_reads_what_the_safetensors_library_writes(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    infos = read_header(path)
    assert set(infos) == set(TENSORS)
    for name, tensor in TENSORS.items():
        read = read_tensor(infos[name])
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def test_a_tensor_unlike_its_header_is_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"^bf16 came as torch.float32 \[5, 7\], but the header"):
        write_file(tmp_path / "x.safetensors", {"bf16": TENSORS["bf16"].to("meta")}, lambda name: torch.zeros(5, 7))


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[:4], "is not a safetensors file (its header length is unreadable)"),
    (lambda data: data[:8] + b"{not json" + data[17:], "is not a safetensors file (its header is not JSON)"),
    (lambda data: data[:-10], "does not fit its data_offsets"),
])
def test_damaged_files_are_refused_in_one_line(tmp_path, damage, message):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConversionError, match=re.escape(message)) as err:
        read_header(path)
    assert "\n" not in str(err.value)


def _files(directory):
    return {p.name: p for p in directory.iterdir()}


def _same_directories(first, second):
    """Same files; equal JSON, code and tensors (the safetensors bytes may be laid out otherwise)."""
    assert _files(first).keys() == _files(second).keys()
    for name, path in _files(first).items():
        other = second / name
        if name.endswith(".json"):
            assert path.read_text() == other.read_text(), name
        elif name.endswith(".py"):
            assert path.read_bytes() == other.read_bytes(), name
        else:
            with safe_open(path, "pt") as a, safe_open(other, "pt") as b:
                assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
                for key in a.keys():
                    assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_writer_writes_what_save_pretrained_writes(tmp_path, tied, dense):
    """Same files, config.json, generation_config.json, modeling files, shards and index."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config(moh_num_shared_heads=8, moh_topk=0, moh_router="query_norm") if dense else tiny_config()
    # Without a tokenizer or an imported model's settings the export knows no special ids (not Llama-2's 1 and 2).
    hf_config = moh_hf_config(cfg, 128, 64, tie_embeddings=tied, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    if dense:
        model = LlamaForCausalLM(dense_llama_config(hf_config)).to(torch.bfloat16)
    else:
        model = MoHLlamaForCausalLM(hf_config).to(torch.bfloat16)
        type(hf_config).register_for_auto_class("AutoConfig")
        MoHLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(tmp_path / "reference", max_shard_size="40KB")
    writer = save_dense_hf_checkpoint if dense else save_hf_checkpoint
    writer(tmp_path / "ours", model.state_dict(), hf_config, max_shard_size="40KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    _same_directories(tmp_path / "reference", tmp_path / "ours")


# --------------------------------------------------------------------------------------------
# import-hf and export-hf, one tensor at a time

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)


def _llama_dir(root, vocab, **fields):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(vocab)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA, **fields)).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(root, max_shard_size="100KB")
    return root


class Alive:
    """Counts the tensors a function returns that are still alive, and the most at once."""

    def __init__(self):
        self.now = self.most = 0

    def track(self, tensor):
        self.now += 1
        self.most = max(self.most, self.now)
        weakref.finalize(tensor, self.gone)
        return tensor

    def gone(self):
        self.now -= 1


def test_import_gives_the_in_process_maps_result_with_the_vocabulary_padded(tmp_path):
    """300 rows padded to 512 (128 x TP=2), new rows zero; every other tensor as the maps make it."""
    hf = _llama_dir(tmp_path / "hf", vocab=300)
    out = hf_checkpoint.import_hf(hf, tmp_path / "ckpt", layout="dense", tensor_parallel=2)
    with single_process_group():
        model, _ = load_model(out)
    expected = import_hf_checkpoint(hf, "dense").state_dict
    got = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        want = expected[name]
        assert tensor.dtype == want.dtype == torch.bfloat16, name
        if name in VOCAB_TENSORS:
            assert tensor.shape[0] == 512 and not tensor[300:].any()
            tensor = tensor[:300]
        assert torch.equal(tensor, want), name


def test_round_trip_holds_one_tensor_then_one_layer_at_a_time(tmp_path, monkeypatch):
    """import-hf reads each Hugging Face tensor once and holds at most q, k and v at a time; export-hf
    reads each megatron tensor once, one layer (or one tensor outside the layers) per read; the
    round trip gives back every tensor bit for bit."""
    hf = _llama_dir(tmp_path / "hf", vocab=256)
    reads, held = Counter(), Alive()

    def read(info):
        reads[info.path.name, info.start] += 1
        return held.track(read_tensor(info))

    monkeypatch.setattr(hf_files, "read_tensor", read)
    out = hf_checkpoint.import_hf(hf, tmp_path / "ckpt", layout="dense")
    assert len(reads) == len(hf_files.hf_tensor_infos(hf)) and set(reads.values()) == {1}
    assert held.most <= 3, held.most

    loads, layer_tensors = [], Alive()

    def load(path, sharded, names):
        loads.append(list(names))
        return {name: layer_tensors.track(tensor) for name, tensor in load_tensors(path, sharded, loads[-1]).items()}

    load_tensors = hf_checkpoint.load_tensors
    monkeypatch.setattr(hf_checkpoint, "load_tensors", load)
    back = hf_checkpoint.export_hf(out, tmp_path / "back", dense=True)
    loaded = [name for names in loads for name in names]
    assert len(loaded) == len(set(loaded)) == 4 * 6 + 3  # each read once: 6 per layer, embedding, norm, output
    assert all(len({name.split(".")[2] if name.startswith("decoder.layers.") else name for name in names}) == 1
               for names in loads)  # one layer per read
    assert layer_tensors.most <= 6, layer_tensors.most
    original, again = load_hf_state_dict(hf), load_hf_state_dict(back)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) and original[k].dtype == again[k].dtype for k in original)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_export_refuses_a_checkpoint_that_does_not_hold_the_model(tmp_path):
    """From the checkpoint's metadata, before any tensor is read."""
    hf = _llama_dir(tmp_path / "hf", vocab=256)
    out = hf_checkpoint.import_hf(hf, tmp_path / "ckpt", layout="dense")
    with single_process_group():
        path, saved, _, _ = checkpoint_model(out, meta=True)
        for change, message in ((dict(ffn_hidden_size=96), r"holds decoder.layers.mlp.linear_fc1.weight as "
                                 r"\[4, 256, 64\], but the model its own arguments describe has \[4, 192, 64\]$"),
                                (dict(qk_layernorm=True), r"has no decoder.layers.self_attention.q_layernorm.weight "
                                 r"\(for decoder.layers.0.self_attention.q_layernorm.weight\)")):
            other = build_model(argparse.Namespace(**{**vars(saved), **change}), meta=True)
            with pytest.raises(CheckpointError, match=message):
                check_holds(path, other.sharded_state_dict())


# --------------------------------------------------------------------------------------------
# Bad checkpoints: refused from the headers, before any data is read


def _broken(tmp_path, change):
    hf = _llama_dir(tmp_path / "hf", vocab=256, tie_word_embeddings=True)
    state = load_hf_state_dict(hf)
    for path in hf.glob("model*.safetensors*"):
        path.unlink()
    save_file(change(dict(state)), hf / "model.safetensors", metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("change,message", [
    (lambda sd: {**sd, "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)},
     r"^'model.layers.1.mlp.down_proj.weight' has shape \(64, 64\), expected \(64, 128\): the state dict does not "
     r"match the config$"),
    (lambda sd: {k: v for k, v in sd.items() if k != "model.layers.2.self_attn.k_proj.weight"},
     r"^state dict has no 'model.layers.2.self_attn.k_proj.weight': pass every tensor of a Llama checkpoint"),
    (lambda sd: {**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64, dtype=torch.bfloat16)},
     r"^1 Hugging Face tensors have no counterpart \(model.layers.0.self_attn.o_proj.bias, ...\)"),
    (lambda sd: {**sd, "model.norm.weight": torch.ones(64, dtype=torch.int32)},
     r"^'model.norm.weight' is torch.int32: only floating-point weights convert$"),
])
def test_bad_tensors_are_refused_from_the_headers(tmp_path, monkeypatch, change, message):
    hf = _broken(tmp_path, change)
    monkeypatch.setattr(hf_files, "read_tensor", lambda info: pytest.fail("read tensor data"))
    with pytest.raises(ConversionError, match=message):
        plan_hf_import(hf, "dense")


def test_an_index_that_disagrees_with_its_files_is_refused(tmp_path):
    hf = _llama_dir(tmp_path / "hf", vocab=256)
    index = hf / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first, second = sorted(set(content["weight_map"].values()))[:2]
    moved = next(k for k, v in content["weight_map"].items() if v == first)
    index.write_text(json.dumps({**content, "weight_map": {**content["weight_map"], moved: second}}))
    with pytest.raises(ConversionError, match=f"holds '{moved}', which model.safetensors.index.json puts in {second}"):
        plan_hf_import(hf, "dense")
    index.write_text(json.dumps(content))
    (hf / second).unlink()
    with pytest.raises(ConversionError, match=f"names {second}, which is not in"):
        plan_hf_import(hf, "dense")
