"""Hugging Face checkpoint directories: writing ``moh_llama`` (or plain Llama) exports, reading
Llama / MoH-Llama checkpoints for import, one tensor at a time both ways.

Exports are ``moh_llama`` checkpoints whose configuration and modeling files (megatron_moh/hf)
travel with the weights, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads them anywhere transformers 5 is installed. A model whose gates are all exactly 1 can also
be exported as a plain ``LlamaForCausalLM`` with no custom code (`save_dense_hf_checkpoint`).

`write_hf_checkpoint` is the one writer: it takes the weights' shapes and dtypes up front and asks
for each tensor as it writes it, so a converter can make them one at a time. It writes what
``save_pretrained`` writes (config with ``auto_map``, generation config, modeling files, shards
split as transformers splits them, and their index) without holding the model. `plan_hf_import`
is the one reader: it checks a checkpoint's tensors from the safetensors headers (names, shapes,
dtypes) through the weight maps before any data is read, and makes each megatron tensor on demand.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from megatron_moh.conversion import ConversionError, hf_generation
from megatron_moh.conversion.hf_configs import (
    LLAMA_FAMILY,
    dense_llama_config,
    megatron_config_kwargs,
    megatron_model_kwargs,
)
from megatron_moh.conversion.hf_tokenizer import load_export_tokenizer
from megatron_moh.conversion.safetensors_io import TensorInfo, read_header, read_tensor, write_file
from megatron_moh.conversion.weights import TensorMap, hf_to_megatron, tensor_maps
from megatron_moh.hf.configuration_moh import MoHLlamaConfig
from megatron_moh.layout import MoHLayout

HF_CODE_DIR = Path(__file__).parent.parent / "hf"
HF_CODE_FILES = ("configuration_moh.py", "modeling_moh.py")
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def _meta(tensor: Tensor) -> Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _model_on_meta(model_class: type, config: Any, specs: dict[str, Tensor]) -> torch.nn.Module:
    """A model holding meta tensors of ``specs``' shapes and dtypes: transformers' own answer to
    which tensors it saves, in which order, and to the config's dtype and parameter count, without
    memory. ConversionError if ``specs`` does not fit the config."""
    with torch.device("meta"):
        model = model_class(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    expected = model.state_dict()
    missing = [k for k in expected if k not in specs and k not in tied]
    unexpected = [k for k in specs if k not in expected]
    wrong = [f"{k} {tuple(specs[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in specs and specs[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ConversionError(f"state dict does not fit the config: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, other shapes {wrong[:3]}; convert it with megatron_to_hf and the "
                              f"same config")
    model.load_state_dict(specs, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model


def _save_config(model: torch.nn.Module, out_dir: Path) -> None:
    """config.json, generation_config.json and, for a class registered for the auto classes, its
    modeling files, as ``save_pretrained`` writes them."""
    from transformers.dynamic_module_utils import custom_object_save

    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    if model.is_remote_code():
        custom_object_save(model, out_dir, config=model.config)
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def write_weights(out_dir: Path, specs: dict[str, Tensor], produce: Callable[[str], Tensor],
                   max_shard_size: int | str, parameters: int) -> None:
    """The safetensors shards (split where transformers splits them) and, if more than one, their
    index as transformers writes it; each tensor is asked for as its turn comes."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        specs, filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        write_file(out_dir / filename, {name: specs[name] for name in names}, produce)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": parameters, **split.metadata}, "weight_map": split.tensor_to_filename}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_config: MoHLlamaConfig,
    specs: dict[str, Tensor],
    produce: Callable[[str], Tensor],
    dense: bool = False,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a ``moh_llama`` checkpoint (``dense=True``: a plain ``LlamaForCausalLM``) whose tensors
    ``specs`` describes (Hugging Face names -> tensors of the right shape and dtype, meta ones do)
    and ``produce(name)`` makes: only the tensor being written is held. What the files hold: see
    `save_hf_checkpoint`. Everything about the weights is checked before anything is written."""
    from transformers import LlamaForCausalLM

    from megatron_moh.hf.modeling_moh import MoHLlamaForCausalLM

    tokenizer = None
    if tokenizer_model_path is not None:
        if not Path(tokenizer_model_path).exists():
            raise ConversionError(f"tokenizer model {tokenizer_model_path} does not exist: pass the sentencepiece "
                                  f".model file or Hugging Face tokenizer directory the model was trained with")
        tokenizer = load_export_tokenizer(str(tokenizer_model_path), hf_config.vocab_size)
    if generation is not None or tokenizer is not None:  # else the ids hf_config holds
        hf_config = copy.deepcopy(hf_config)
        for name, value in hf_generation.special_token_ids(generation, tokenizer).items():
            setattr(hf_config, name, value)
    specs = {name: _meta(tensor) for name, tensor in specs.items()}
    if dense:
        config = dense_llama_config(hf_config)
        routers = [name for name in specs if name.endswith("self_attn.router.weight")]
        if any(specs[name].numel() for name in routers):
            raise ConversionError("the router weights are not empty although every head is shared: "
                                  "convert the state dict with the same config")
        model = _model_on_meta(LlamaForCausalLM, config, {k: v for k, v in specs.items() if k not in routers})
    else:
        model = _model_on_meta(MoHLlamaForCausalLM, hf_config, specs)
        type(hf_config).register_for_auto_class("AutoConfig")
        MoHLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    _save_config(model, out_dir)
    if generation is not None:
        hf_generation.write_generation_files(out_dir, generation)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    weights = {name: _meta(tensor) for name, tensor in model.state_dict().items() if name not in tied}
    write_weights(out_dir, weights, produce, max_shard_size, model.num_parameters())
    if not dense:
        # custom_object_save copies the files of the classes registered above; make sure both are
        # there even if the classes were loaded from elsewhere (e.g. transformers' remote-code cache).
        for name in HF_CODE_FILES:
            if not (out_dir / name).exists():
                shutil.copy(HF_CODE_DIR / name, out_dir / name)
    return out_dir


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_state_dict: dict[str, Tensor],
    hf_config: MoHLlamaConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a ``moh_llama`` checkpoint: config.json (with auto_map), the two modeling files,
    safetensors weights (sharded above ``max_shard_size``), generation_config.json and, given a
    sentencepiece model or Hugging Face tokenizer directory, the tokenizer with the same ids. Loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)``."""
    return write_hf_checkpoint(out_dir, hf_config, hf_state_dict, hf_state_dict.__getitem__,
                               tokenizer_model_path=tokenizer_model_path, max_shard_size=max_shard_size)


def save_dense_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_state_dict: dict[str, Tensor],
    hf_config: MoHLlamaConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a plain ``LlamaForCausalLM`` checkpoint (no custom code). Exact only because it
    refuses (ValueError) any model whose gates are not all exactly 1."""
    return write_hf_checkpoint(out_dir, hf_config, hf_state_dict, hf_state_dict.__getitem__, dense=True,
                               tokenizer_model_path=tokenizer_model_path, max_shard_size=max_shard_size)


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


def hf_tensor_infos(checkpoint_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, from its index and the files'
    headers: where each lies, its dtype and shape. No tensor data is read."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / INDEX_NAME
    if not index.exists():
        if (checkpoint_dir / WEIGHTS_NAME).exists():
            return read_header(checkpoint_dir / WEIGHTS_NAME)
        raise ConversionError(f"no {WEIGHTS_NAME}(.index.json) in {checkpoint_dir}: save the model "
                              f"with safe_serialization (the transformers 5 default)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConversionError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
    infos: dict[str, TensorInfo] = {}
    for name in files:
        if not (checkpoint_dir / name).is_file():
            raise ConversionError(f"{index} names {name}, which is not in {checkpoint_dir}")
        for tensor, info in read_header(checkpoint_dir / name).items():
            if weight_map.get(tensor) != name:
                raise ConversionError(f"{checkpoint_dir / name} holds {tensor!r}, which {index.name} puts in "
                                      f"{weight_map.get(tensor)}: the index and the files disagree")
            infos[tensor] = info
    missing = [tensor for tensor in weight_map if tensor not in infos]
    if missing:
        raise ConversionError(f"{index.name} puts {missing[0]!r} in {weight_map[missing[0]]}, whose header does "
                              f"not hold it ({len(missing)} such): the index and the files disagree")
    return {tensor: infos[tensor] for tensor in weight_map}


def load_hf_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    return {name: read_tensor(info) for name, info in hf_tensor_infos(checkpoint_dir).items()}


@dataclass(frozen=True)
class HFImportPlan:
    """A Llama / MoH-Llama checkpoint as the megatron tensors it becomes, checked (names, shapes,
    dtypes) but not yet read: `produce` makes one at a time."""

    config_kwargs: dict[str, Any]  # for megatron_moh.model.llama_moh_config
    model_kwargs: dict[str, Any]  # for megatron_moh.model.build_gpt_model
    specs: dict[str, Tensor]  # megatron name -> meta tensor of its shape and dtype
    maps: dict[str, TensorMap]  # each name a megatron tensor goes by (either backend's) -> its map
    read: Callable[[str], Tensor]  # Hugging Face name -> tensor

    def produce(self, name: str) -> Tensor:
        """The megatron tensor ``name``, from the Hugging Face tensors it is made of (only those are read)."""
        m = self.maps[name]
        return m.to_megatron([self.read(hf_name) for hf_name in m.hf])


def _zero_routers(hf_config: Any, config_kwargs: dict[str, Any], specs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The learned-router weights a checkpoint lacks, as meta tensors: they start at zero."""
    if config_kwargs["moh_router"] != "learned":
        return {}
    fields = {k: v for k, v in config_kwargs.items() if k.startswith("moh_")}
    rows = MoHLlamaConfig(num_attention_heads=hf_config.num_attention_heads,
                          hidden_size=hf_config.hidden_size, **fields).moh_router_rows
    embedding = specs.get("model.embed_tokens.weight")
    dtype = torch.float32 if embedding is None else embedding.dtype  # no embedding: refused below
    keys = (f"model.layers.{i}.self_attn.router.weight" for i in range(hf_config.num_hidden_layers))
    return {key: torch.empty(rows, hf_config.hidden_size, dtype=dtype, device="meta")
            for key in keys if key not in specs}


def plan_hf_import(
    checkpoint: str | os.PathLike | tuple[dict[str, Tensor], Any],
    layout: MoHLayout | str | None = None,
    backend: str = "local",
) -> HFImportPlan:
    """A Llama (with ``layout``) or MoH-Llama (``layout=None``) checkpoint -> the megatron tensors it
    becomes, every name and shape checked through the weight maps (ConversionError) from the
    safetensors headers alone. ``checkpoint``: a directory, or ``(state_dict, config)``.

    A learned router absent from the checkpoint starts at zero (see hf_configs for what that means
    for the gates); the query-norm router has no weights.
    """
    hf_config = checkpoint[1] if isinstance(checkpoint, tuple) else load_hf_config(checkpoint)
    config_kwargs = megatron_config_kwargs(hf_config, layout)
    model_kwargs = megatron_model_kwargs(hf_config)
    if isinstance(checkpoint, tuple):
        state = checkpoint[0]
        specs, read = {name: _meta(tensor) for name, tensor in state.items()}, state.__getitem__
    else:
        infos = hf_tensor_infos(checkpoint)
        specs = {name: info.meta() for name, info in infos.items()}

        def read(name: str) -> Tensor:
            return read_tensor(infos[name])

    for name, spec in specs.items():
        if not spec.is_floating_point():
            raise ConversionError(f"{name!r} is {spec.dtype}: only floating-point weights convert")
    routers = _zero_routers(hf_config, config_kwargs, specs)
    megatron = hf_to_megatron({**specs, **routers}, hf_config, backend=backend)
    maps = {name: m for m in tensor_maps(hf_config, backend) if m.megatron in megatron for name in m.names}

    def read_or_zero(name: str) -> Tensor:
        return torch.zeros(routers[name].shape, dtype=routers[name].dtype) if name in routers else read(name)

    return HFImportPlan(config_kwargs, model_kwargs, megatron, maps, read_or_zero)


def import_hf_checkpoint(
    checkpoint: str | os.PathLike | tuple[dict[str, Tensor], Any],
    layout: MoHLayout | str | None = None,
    backend: str = "local",
) -> MegatronImport:
    """A Llama (with ``layout``) or MoH-Llama (``layout=None``) checkpoint -> megatron state dict
    and the builder's keyword arguments, all in memory (`plan_hf_import` made whole).
    ``checkpoint``: a directory, or ``(state_dict, config)``."""
    plan = plan_hf_import(checkpoint, layout, backend)
    return MegatronImport({name: plan.produce(name) for name in plan.specs}, plan.config_kwargs, plan.model_kwargs)
