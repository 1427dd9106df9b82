"""Hugging Face checkpoint directories: writing ``moh_llama`` (or plain Llama) exports, reading
Llama / MoH-Llama checkpoints for import.

Exports are ``moh_llama`` checkpoints whose configuration and modeling files (megatron_moh/hf)
travel with the weights, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads them anywhere transformers 5 is installed. A model whose gates are all exactly 1 can also
be exported as a plain ``LlamaForCausalLM`` with no custom code (`save_dense_hf_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from megatron_moh.conversion import ConversionError, hf_generation
from megatron_moh.conversion.hf_configs import (
    LLAMA_FAMILY,
    MoHLayout,
    dense_llama_config,
    megatron_config_kwargs,
    megatron_model_kwargs,
)
from megatron_moh.conversion.hf_tokenizer import load_export_tokenizer
from megatron_moh.conversion.weights import hf_to_megatron
from megatron_moh.hf.configuration_moh import MoHLlamaConfig

HF_CODE_DIR = Path(__file__).parent.parent / "hf"
HF_CODE_FILES = ("configuration_moh.py", "modeling_moh.py")

def _build_on_meta(model_class: type, config: Any, state_dict: dict[str, Tensor]) -> torch.nn.Module:
    """A model holding ``state_dict``'s tensors without allocating (or initialising) its own."""
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConversionError(f"state dict does not fit the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; convert it with megatron_to_hf and the same config")
    if tied:
        model.tie_weights()
    # Non-persistent buffers (RoPE frequencies, of any rope_type) stayed on the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def _write(model: torch.nn.Module, out_dir: Path, tokenizer_model_path: str | os.PathLike | None,
           max_shard_size: int | str, generation: dict[str, Any] | None) -> Path:
    """Weights and config, the tokenizer (sentencepiece model or Hugging Face directory) and the
    generation settings; the config's special ids are the imported model's, else the tokenizer's."""
    tokenizer = None
    if tokenizer_model_path is not None:
        if not Path(tokenizer_model_path).exists():
            raise ConversionError(f"tokenizer model {tokenizer_model_path} does not exist: pass the sentencepiece "
                                  f".model file or Hugging Face tokenizer directory the model was trained with")
        tokenizer = load_export_tokenizer(str(tokenizer_model_path), model.config.vocab_size)
    ids = hf_generation.special_token_ids(generation, tokenizer)
    for name, value in ids.items():
        setattr(model.config, name, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    hf_generation.write_generation_files(out_dir, generation, ids)
    return out_dir


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_state_dict: dict[str, Tensor],
    hf_config: MoHLlamaConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a ``moh_llama`` checkpoint: config.json (with auto_map), the two modeling files,
    safetensors weights (sharded above ``max_shard_size``), generation_config.json and, given a
    sentencepiece model or Hugging Face tokenizer directory, the tokenizer with the same ids; the
    generation settings of an imported model (`hf_generation`) as they were. Loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)``."""
    from megatron_moh.hf.modeling_moh import MoHLlamaForCausalLM

    out_dir = Path(out_dir)
    model = _build_on_meta(MoHLlamaForCausalLM, hf_config, hf_state_dict)
    type(hf_config).register_for_auto_class("AutoConfig")
    MoHLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _write(model, out_dir, tokenizer_model_path, max_shard_size, generation)
    # save_pretrained copies the files of the classes registered above; make sure both are there
    # even if the classes were loaded from elsewhere (e.g. transformers' remote-code cache).
    for name in HF_CODE_FILES:
        if not (out_dir / name).exists():
            shutil.copy(HF_CODE_DIR / name, out_dir / name)
    return out_dir


def save_dense_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_state_dict: dict[str, Tensor],
    hf_config: MoHLlamaConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a plain ``LlamaForCausalLM`` checkpoint (no custom code), as `save_hf_checkpoint`
    does. Exact only because it refuses (ValueError) any model whose gates are not all exactly 1."""
    from transformers import LlamaForCausalLM

    config = dense_llama_config(hf_config)
    state = {k: v for k, v in hf_state_dict.items() if not k.endswith("self_attn.router.weight")}
    routers = [v for k, v in hf_state_dict.items() if k.endswith("self_attn.router.weight")]
    if any(v.numel() for v in routers):
        raise ConversionError("the router weights are not empty although every head is shared: "
                              "convert the state dict with the same config")
    model = _build_on_meta(LlamaForCausalLM, config, state)
    return _write(model, Path(out_dir), tokenizer_model_path, max_shard_size, generation)


# --------------------------------------------------------------------------------------------
# Reading checkpoints


class MegatronImport(NamedTuple):
    """What a Hugging Face checkpoint becomes on the megatron side."""

    state_dict: dict[str, Tensor]
    config_kwargs: dict[str, Any]  # for megatron_moh.model.llama_moh_config
    model_kwargs: dict[str, Any]  # for megatron_moh.model.build_gpt_model


def load_hf_config(checkpoint_dir: str | os.PathLike) -> Any:
    """A Llama-family (`LLAMA_FAMILY`) or MoH-Llama config from ``checkpoint_dir`` without running
    its remote code."""
    from transformers import AutoConfig

    path = Path(checkpoint_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} does not exist: pass a Hugging Face checkpoint directory")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type == MoHLlamaConfig.model_type:
        return MoHLlamaConfig.from_pretrained(checkpoint_dir)
    if model_type not in LLAMA_FAMILY:
        raise ConversionError(f"model_type={model_type!r} in {path} is not supported: only "
                              f"{', '.join(map(repr, LLAMA_FAMILY))} and 'moh_llama' checkpoints import")
    return AutoConfig.from_pretrained(checkpoint_dir)


def load_hf_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"no model.safetensors(.index.json) in {checkpoint_dir}: save the model "
                              f"with safe_serialization (the transformers 5 default)")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(checkpoint_dir / name))
    return state


def import_hf_checkpoint(
    checkpoint: str | os.PathLike | tuple[dict[str, Tensor], Any],
    layout: MoHLayout | str | None = None,
    backend: str = "local",
) -> MegatronImport:
    """A Llama (with ``layout``) or MoH-Llama (``layout=None``) checkpoint -> megatron state dict
    and the builder's keyword arguments. ``checkpoint``: a directory, or ``(state_dict, config)``.

    A learned router absent from the checkpoint starts at zero (see the module docstring for what
    that means for the gates); the query-norm router has no weights.
    """
    if isinstance(checkpoint, tuple):
        state, hf_config = checkpoint
        state = dict(state)
    else:
        hf_config = load_hf_config(checkpoint)
        state = load_hf_state_dict(checkpoint)
    config_kwargs = megatron_config_kwargs(hf_config, layout)
    model_kwargs = megatron_model_kwargs(hf_config)
    if config_kwargs["moh_router"] == "learned":
        fields = {k: v for k, v in config_kwargs.items() if k.startswith("moh_")}
        rows = MoHLlamaConfig(num_attention_heads=hf_config.num_attention_heads,
                              hidden_size=hf_config.hidden_size, **fields).moh_router_rows
        dtype = state["model.embed_tokens.weight"].dtype
        for i in range(hf_config.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.router.weight"
            if key not in state:
                state[key] = torch.zeros(rows, hf_config.hidden_size, dtype=dtype)
    return MegatronImport(hf_to_megatron(state, hf_config, backend=backend), config_kwargs, model_kwargs)
