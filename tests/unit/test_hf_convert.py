"""Megatron <-> Hugging Face weight and config maps, and the checkpoint writers' refusals."""

import json

import pytest
import torch

from megatron_moh.conversion import ConversionError
from megatron_moh.conversion.hf_configs import (
    MEGATRON_LLAMA3_ROPE,
    dense_llama_config,
    is_dense,
    megatron_config_kwargs,
    megatron_model_kwargs,
    moh_hf_config,
    rope_parameters,
)
from megatron_moh.conversion.hf_files import (
    import_hf_checkpoint,
    load_hf_state_dict,
    save_dense_hf_checkpoint,
    save_hf_checkpoint,
)
from megatron_moh.conversion.weights import hf_to_megatron, megatron_to_hf
from megatron_moh.layout import MoHLayout
from megatron_moh.model import build_gpt_model, llama_moh_config
from megatron_moh.hf import MoHLlamaConfig
from tests.helpers import tiny_config
from tests.hf_support import VARIANTS

VOCAB, MAX_SEQ = 128, 64


def _megatron_state(cfg, tied=False):
    torch.manual_seed(0)
    model = build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=MAX_SEQ,
                            share_embeddings_and_output_weights=tied)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("variant", ["learned-weighted-2stage", "query_norm-binary"])
@pytest.mark.parametrize("tied", [False, True])
def test_megatron_hf_megatron_round_trip_is_bit_identical(variant, tied):
    cfg = tiny_config(**VARIANTS[variant])
    state = _megatron_state(cfg, tied)
    hf_state = megatron_to_hf(state, cfg)
    assert ("model.layers.0.self_attn.router.weight" in hf_state) == (cfg.moh_router == "learned")
    assert ("lm_head.weight" in hf_state) == (not tied)
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    assert hf_state["model.layers.1.self_attn.q_proj.weight"].shape == (heads * d, cfg.hidden_size)
    assert hf_state["model.layers.1.self_attn.k_proj.weight"].shape == (groups * d, cfg.hidden_size)
    back = hf_to_megatron(hf_state, cfg)
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    # The result loads into a fresh megatron model as is.
    fresh = build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=MAX_SEQ,
                            share_embeddings_and_output_weights=tied)
    fresh.load_state_dict(back, strict=True)


def test_qkv_split_follows_megatron_group_layout():
    """Query head h reads key/value head h // (heads / groups), as megatron's per-group rows say."""
    cfg = tiny_config()
    state = _megatron_state(cfg)
    d, per_group = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    hf_state = megatron_to_hf(state, cfg)
    q = hf_state["model.layers.0.self_attn.q_proj.weight"]
    k = hf_state["model.layers.0.self_attn.k_proj.weight"]
    v = hf_state["model.layers.0.self_attn.v_proj.weight"]
    group_rows = (per_group + 2) * d
    for g in range(cfg.num_query_groups):
        block = qkv[g * group_rows : (g + 1) * group_rows]
        assert torch.equal(block[: per_group * d], q[g * per_group * d : (g + 1) * per_group * d])
        assert torch.equal(block[per_group * d : (per_group + 1) * d], k[g * d : (g + 1) * d])
        assert torch.equal(block[(per_group + 1) * d :], v[g * d : (g + 1) * d])


def test_transformer_engine_norm_names_are_read_and_written():
    cfg = tiny_config()
    state = _megatron_state(cfg)
    te_state = hf_to_megatron(megatron_to_hf(state, cfg), cfg, backend="te")
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te_state
    assert "decoder.layers.0.pre_mlp_layernorm.weight" not in te_state
    assert hf_to_megatron(megatron_to_hf(te_state, cfg), cfg).keys() == state.keys()


def test_incomplete_or_foreign_state_dicts_are_refused():
    cfg = tiny_config()
    state = _megatron_state(cfg)
    partial = {k: v for k, v in state.items() if not k.startswith("decoder.layers.1.")}
    with pytest.raises(ConversionError, match="state dict has no 'decoder.layers.1"):
        megatron_to_hf(partial, cfg)
    with pytest.raises(ConversionError, match="have no counterpart"):
        megatron_to_hf({**state, "decoder.layers.0.self_attention.linear_proj.bias": torch.zeros(64)}, cfg)
    with pytest.raises(ConversionError, match="does not match the config"):
        megatron_to_hf(state, tiny_config(num_query_groups=2))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_maps_round_trip(variant):
    cfg = tiny_config(**VARIANTS[variant], layernorm_epsilon=1e-6)
    hf_cfg = moh_hf_config(cfg, VOCAB, MAX_SEQ, rotary_base=500000, tie_embeddings=True, eos_token_id=2)
    assert isinstance(hf_cfg, MoHLlamaConfig) and hf_cfg.model_type == "moh_llama"
    assert hf_cfg.rope_parameters["rope_theta"] == 500000.0 and hf_cfg.rms_norm_eps == 1e-6
    kwargs = megatron_config_kwargs(hf_cfg)
    again = llama_moh_config(**kwargs)
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                  "ffn_hidden_size", "layernorm_epsilon", "moh_num_shared_heads", "moh_topk", "moh_router",
                  "moh_gate", "moh_two_stage", "moh_attention_impl"):
        assert getattr(again, field) == getattr(cfg, field), field
    assert megatron_model_kwargs(hf_cfg) == dict(
        vocab_size=VOCAB, max_sequence_length=MAX_SEQ, rotary_base=500000.0,
        share_embeddings_and_output_weights=True)


@pytest.mark.parametrize("fields,message", [
    (dict(moh_router="hash"), "moh_router='hash' is unknown"),
    (dict(moh_topk=5), "moh_topk=5 must be between 1 and the 4 routed heads"),
    (dict(moh_router="query_norm", moh_two_stage=True), "moh_two_stage needs the learned router"),
    (dict(moh_num_shared_heads=9, moh_topk=0), "moh_num_shared_heads=9 must be between 0"),
    (dict(moh_qkv_bias=True, attention_bias=True), "moh_qkv_bias adds q/k/v biases but attention_bias already "
                                                   "biases q, k, v and o: set one of them"),
])
def test_bad_hf_config_is_one_clear_line(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        MoHLlamaConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, **fields)
    assert "\n" not in str(err.value)


def test_non_llama_megatron_config_is_refused():
    with pytest.raises(ConversionError, match="normalization must be 'RMSNorm'"):
        moh_hf_config(tiny_config(normalization="LayerNorm"), VOCAB, MAX_SEQ)


def _plain_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=MAX_SEQ,
                  rms_norm_eps=1e-5)
    return LlamaConfig(**{**fields, **overrides})


def test_plain_llama_import_needs_a_layout_and_supports_the_published_one():
    llama = _plain_llama_config()
    with pytest.raises(ConversionError, match="has no MoH layout: pass layout="):
        megatron_config_kwargs(llama)
    published = megatron_config_kwargs(llama, "published")
    assert (published["moh_num_shared_heads"], published["moh_topk"], published["moh_router"],
            published["moh_gate"]) == (4, 2, "query_norm", "binary")
    dense = megatron_config_kwargs(llama, "dense")
    assert (dense["moh_num_shared_heads"], dense["moh_topk"]) == (8, 0)
    with pytest.raises(ConversionError, match="layout='nope' is unknown"):
        megatron_config_kwargs(llama, "nope")


# --------------------------------------------------------------------------------------------
# The Llama family: q/k norms, q/k/v biases, Llama-3.1 RoPE scaling, tied embeddings

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


@pytest.mark.parametrize("factor", [8.0, 32.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_megatron_rope_scaling_is_transformers_llama3(factor, head_dim):
    """megatron's --use-rope-scaling frequencies equal transformers' rope_type 'llama3' with the
    parameters export writes (the same float32 operations: bit for bit), and megatron's fixed
    constants are the ones `MEGATRON_LLAMA3_ROPE` declares."""
    import inspect

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    defaults = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    assert {key: defaults[key].default for key in MEGATRON_LLAMA3_ROPE} == MEGATRON_LLAMA3_ROPE
    megatron = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=500000, rope_scaling=True,
                               rope_scaling_factor=factor, use_cpu_initialization=True).inv_freq
    hf_config = _plain_llama_config(hidden_size=8 * head_dim, num_attention_heads=8,
                                    rope_parameters=rope_parameters(500000, factor))
    hf, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    assert scale == 1.0 and torch.equal(megatron, hf)
    unscaled = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=500000,
                               use_cpu_initialization=True).inv_freq
    assert (megatron == unscaled).any() and (megatron < unscaled).any()  # high kept, low slowed


def test_llama_family_config_maps_round_trip():
    cfg = tiny_config(qk_layernorm=True, add_qkv_bias=True)
    hf_cfg = moh_hf_config(cfg, VOCAB, MAX_SEQ, rotary_base=500000, tie_embeddings=True, rope_scaling_factor=32)
    assert (hf_cfg.moh_qk_norm, hf_cfg.moh_qkv_bias, hf_cfg.attention_bias) == (True, True, False)
    assert hf_cfg.rope_parameters == dict(LLAMA3_ROPE, factor=32.0)
    kwargs = megatron_config_kwargs(hf_cfg)
    assert (kwargs["qk_layernorm"], kwargs["add_qkv_bias"]) == (True, True)
    assert megatron_model_kwargs(hf_cfg) == dict(
        vocab_size=VOCAB, max_sequence_length=MAX_SEQ, rotary_base=500000.0, share_embeddings_and_output_weights=True,
        rope_scaling=True, rope_scaling_factor=32.0)
    with pytest.raises(ConversionError, match=r"^a plain Llama has no q/k/v biases \(moh_qkv_bias\) and no q/k norms "
                       r"\(moh_qk_norm\): export it without --dense \(as moh_llama\)$"):
        dense_llama_config(moh_hf_config(tiny_config(qk_layernorm=True, add_qkv_bias=True, moh_num_shared_heads=8,
                                                     moh_topk=0, moh_router="query_norm"), VOCAB, MAX_SEQ))


def test_llama_family_megatron_hf_megatron_round_trip_is_bit_identical():
    cfg = tiny_config(qk_layernorm=True, add_qkv_bias=True, moh_router="query_norm")
    state = _megatron_state(cfg, tied=True)
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith(("layernorm.weight", "linear_qkv.bias")):
                tensor.uniform_(0.5, 1.5)
    hf_state = megatron_to_hf(state, cfg)
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    qkv_bias = state["decoder.layers.1.self_attention.linear_qkv.bias"].view(groups, -1)
    q, k, v = qkv_bias.split([heads // groups * d, d, d], dim=1)  # each query group: its q, k, v rows
    for name, rows in zip("qkv", (q, k, v)):
        assert torch.equal(hf_state[f"model.layers.1.self_attn.{name}_proj.bias"], rows.reshape(-1)), name
    assert torch.equal(hf_state["model.layers.0.self_attn.k_norm.weight"],
                       state["decoder.layers.0.self_attention.k_layernorm.weight"])
    back = hf_to_megatron(hf_state, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], tensor) for key, tensor in state.items())


@pytest.mark.parametrize("family,fields,message", [
    ("llama", dict(attention_bias=True), "llama with attention_bias=True biases o_proj as well as q, k, v: megatron "
     "has Qwen2-style q/k/v biases only (--add-qkv-bias), and an o_proj bias only with --add-bias-linear, which "
     "biases the MLP too"),
    ("qwen3", dict(attention_bias=True), "qwen3 with attention_bias=True biases o_proj as well as q, k, v"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True is not supported: only MLPs without biases convert"),
    ("llama", dict(rope_parameters=dict(LLAMA3_ROPE, low_freq_factor=2.0)),
     "rope_type='llama3' with {'low_freq_factor': 2.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': "
     "8192} is not expressible: megatron's --use-rope-scaling fixes {'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
     "'original_max_position_embeddings': 8192} (only the factor is a flag)"),
    ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
     "rope_type='linear' is not supported by the megatron builder: only default RoPE and Llama-3.1 scaling (llama3) "
     "convert"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
     "qwen2 with sliding-window layers is not supported: only full attention converts (use_sliding_window=False)"),
])
def test_inexpressible_llama_family_configs_are_refused_in_one_line(family, fields, message):
    from transformers import AutoConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, head_dim=8, max_position_embeddings=MAX_SEQ)
    config = AutoConfig.for_model(family, **base, **fields)
    with pytest.raises(ConversionError) as err:
        megatron_config_kwargs(config, "dense")
        megatron_model_kwargs(config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_learned_router_import_starts_at_zero():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llama_cfg = _plain_llama_config()
    state = LlamaForCausalLM(llama_cfg).state_dict()
    layout = MoHLayout(num_shared_heads=4, topk=2, router="learned", gate="weighted", two_stage=True)
    imported = import_hf_checkpoint((state, llama_cfg), layout)
    router = imported.state_dict["decoder.layers.0.self_attention.router.weight"]
    assert router.shape == (4 + 4 + 2, 64) and not router.any()
    model = build_gpt_model(llama_moh_config(**imported.config_kwargs), **imported.model_kwargs)
    model.load_state_dict(imported.state_dict, strict=True)


def test_dense_export_is_refused_for_a_routed_model(tmp_path):
    cfg = tiny_config(moh_router="query_norm")
    hf_cfg = moh_hf_config(cfg, VOCAB, MAX_SEQ)
    assert not is_dense(hf_cfg)
    with pytest.raises(ValueError, match="only a dense model exports as plain Llama") as err:
        save_dense_hf_checkpoint(tmp_path / "dense", megatron_to_hf(_megatron_state(cfg), cfg), hf_cfg)
    assert "\n" not in str(err.value) and "moh_topk=2" in str(err.value)
    assert not (tmp_path / "dense").exists()
    # All heads shared but learned weighted gates h_s * softmax(W_s x) are not exactly 1.
    weighted = moh_hf_config(tiny_config(moh_num_shared_heads=8, moh_topk=0, moh_gate="weighted"), VOCAB, MAX_SEQ)
    with pytest.raises(ValueError, match="only a dense model exports as plain Llama"):
        dense_llama_config(weighted)
    for dense in (dict(moh_router="query_norm"), dict(moh_router="learned", moh_gate="binary")):
        hf_dense = moh_hf_config(tiny_config(moh_num_shared_heads=8, moh_topk=0, **dense), VOCAB, MAX_SEQ)
        assert is_dense(hf_dense)
        plain = dense_llama_config(hf_dense)
        assert plain.model_type == "llama" and not hasattr(plain, "moh_topk")


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_layout(tmp_path, tied):
    cfg = tiny_config()
    hf_cfg = moh_hf_config(cfg, VOCAB, MAX_SEQ, tie_embeddings=tied)
    original = _megatron_state(cfg, tied)
    out = save_hf_checkpoint(tmp_path / "ckpt", megatron_to_hf(original, cfg), hf_cfg,
                                max_shard_size="100KB")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "configuration_moh.py", "modeling_moh.py",
            "model.safetensors.index.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_moh.MoHLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_moh.MoHLlamaForCausalLM"}
    assert config["model_type"] == "moh_llama" and config["moh_router"] == "learned"
    # The modeling files are self-contained: only torch, transformers and each other.
    for name in ("configuration_moh.py", "modeling_moh.py"):
        text = (out / name).read_text()
        assert "megatron" not in "\n".join(line for line in text.splitlines() if line.startswith(("import", "from")))
    reread = load_hf_state_dict(out)
    assert reread.keys() == megatron_to_hf(original, cfg).keys()
    again = import_hf_checkpoint(out)
    assert again.state_dict.keys() == original.keys()
    assert all(torch.equal(again.state_dict[k], original[k]) for k in original)
    assert again.model_kwargs["share_embeddings_and_output_weights"] == tied
    with pytest.raises(ConversionError, match="already has a MoH layout"):
        import_hf_checkpoint(out, layout="dense")
