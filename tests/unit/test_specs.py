"""The MoH layer specs with MoE MLPs: which layers get megatron-core's MoE layer (against megatron's
own GPT decoder spec), and the checkpoint keys an MoE layer's norms get."""

import pytest

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_moh.layout import moe_layer_pattern
from megatron_moh.model import build_gpt_model
from megatron_moh.specs import block_spec
from tests.helpers import tiny_config

MOE = dict(num_moe_experts=4, moe_ffn_hidden_size=32)


@pytest.mark.parametrize("freq", [1, 2, 3, [1, 1, 0, 1], [0, 1, 0, 0]])
def test_moe_layers_are_the_ones_megatron_picks(freq):
    cfg = tiny_config(num_layers=4, moe_layer_freq=freq, **MOE)
    megatron = [spec.submodules.mlp.func is MoELayer for spec in get_gpt_decoder_layer_specs(cfg, False)]
    assert moe_layer_pattern(cfg.moe_layer_freq, cfg.num_layers) == megatron
    built = block_spec(cfg).submodules.layer_specs
    assert [getattr(layer.submodules.mlp, "func", None) is MoELayer for layer in built] == megatron


def test_dense_model_has_no_moe_layer():
    built = block_spec(tiny_config(num_layers=3)).submodules.layer_specs
    assert not any(getattr(layer.submodules.mlp, "func", None) is MoELayer for layer in built)


@pytest.mark.parametrize("freq,message", [(0, "--moe-layer-freq 0 must be at least 1"),
                                          ([1, 0], "for each of the 4 layers"), ([1, 2, 0, 1], "must give 0")])
def test_bad_moe_layer_freq_is_one_line(freq, message):
    with pytest.raises(ValueError, match=message):
        moe_layer_pattern(freq, 4)


def test_moe_layer_keeps_its_pre_mlp_norm_key():
    """A dense layer's pre-MLP norm is saved under the fused linear_fc1 name (as Transformer Engine
    names it); an MoE layer has no fused fc1, so its norm keeps its own key in both backends."""
    model = build_gpt_model(tiny_config(num_layers=2, moe_layer_freq=[1, 0], **MOE), vocab_size=64,
                            max_sequence_length=16)
    keys = {entry.key for entry in model.sharded_state_dict().values()}  # the keys in the checkpoint
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys
    assert {"decoder.layers.0.mlp.router.weight", "decoder.layers.0.mlp.experts.experts.linear_fc1.weight"} <= keys
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any(key.startswith("decoder.layers.1.pre_mlp_layernorm") for key in keys)
    assert not any(key.startswith("decoder.layers.0.mlp.linear_fc1") for key in keys)
