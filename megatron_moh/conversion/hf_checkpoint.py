"""megatron checkpoint -> Hugging Face directory (`export_hf`) and back (`import_hf`), plus the
``pretrain_moh.py`` flags that continue-tune an imported model (`finetune_flags`).

Both move one tensor at a time, so memory does not grow with the model: the megatron side is a
model on the meta device whose sharded state dict names what the checkpoint holds
(`megatron_files`), the Hugging Face side safetensors headers and shards (`hf_files`), and each
tensor goes through the weight maps (`weights`) when the writer reaches it: import reads only the
Hugging Face tensors that make the megatron tensor being written, export reads one layer of the
megatron checkpoint at a time. Both refuse bad input with one line before any work (names, shapes
and dtypes are checked from the headers and the checkpoint's metadata through the same maps), and
write through a scratch directory that replaces the output only once everything is written, so a
failed conversion leaves nothing half-written and never replaces an existing directory without
``overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_moh.checkpoint import RELEASE, TRACKER, CheckpointError, effective_arg, read_checkpoint_args
from megatron_moh.conversion import ConversionError, hf_generation
from megatron_moh.conversion.hf_configs import dense_llama_config, megatron_config_kwargs, moh_hf_config
from megatron_moh.conversion.hf_tokenizer import load_export_tokenizer
from megatron_moh.conversion.hf_files import HFImportPlan, load_hf_config, plan_hf_import, write_hf_checkpoint
from megatron_moh.conversion.megatron_files import check_holds, load_tensors, save_produced
from megatron_moh.conversion.weights import EXTRA_STATE_SUFFIX, VOCAB_TENSORS, megatron_to_hf, tensor_maps
from megatron_moh.conversion.whole_model import build_model, checkpoint_model, one_process_args, single_process_group
from megatron_moh.layout import MoHConfigError, MoHLayout
from megatron_moh.outputs import removed_on_failure, share_like_umask, unwritable_reason
from megatron_moh.tokenizer import HUGGINGFACE_TYPE, SENTENCEPIECE_TYPES, TokenizerError, check_tokenizer_model



def _fresh_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir`` as a Path, refusing (before any work) to replace an existing one unless asked,
    or one that cannot be written."""
    out = Path(out_dir)
    reason = unwritable_reason(out)
    if reason:
        raise CheckpointError(f"--out {out}: {reason}: choose a directory you can write to")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists: pass --overwrite to replace it, or choose another directory")
    return out


@contextlib.contextmanager
def _written_atomically(out: Path) -> Iterator[Path]:
    """A scratch directory beside ``out`` that replaces ``out`` only once everything is written, so
    a failed conversion leaves no half-written output (and an overwritten one stays intact, and no
    directory it had to create stays behind). The result is shared as the user's umask says."""
    with removed_on_failure(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            yield scratch
            share_like_umask(scratch)
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

    args = one_process_args(args)
    if getattr(args, "moh_dense_baseline", False):
        MoHLayout.preset("dense", args.num_attention_heads).set_on(args)
    return core_transformer_config_from_args(args, MoHTransformerConfig)


def _export_tokenizer(saved: argparse.Namespace, tokenizer_model: str | os.PathLike | None) -> str | None:
    """The tokenizer to export: ``tokenizer_model`` if given, else the run's own sentencepiece model
    or Hugging Face tokenizer directory (None for runs without one, e.g. NullTokenizer)."""
    if tokenizer_model is not None:
        if not Path(tokenizer_model).exists():
            raise CheckpointError(f"--tokenizer-model {tokenizer_model} does not exist")
        return str(tokenizer_model)
    kind = getattr(saved, "tokenizer_type", None)
    stored = getattr(saved, "tokenizer_model", None)
    if kind in (HUGGINGFACE_TYPE, *SENTENCEPIECE_TYPES):
        if not stored or not Path(stored).exists():
            raise CheckpointError(f"the run's tokenizer ({kind}, {stored}) is not on this machine: pass "
                                  f"--tokenizer-model with its sentencepiece .model file or Hugging Face directory")
        return str(stored)
    return None


# Run settings outside the TransformerConfig that a Hugging Face Llama cannot express.
_NOT_LLAMA = (
    ("position_embedding_type", lambda value: value != "rope", "position_embedding_type must be 'rope'"),
    ("rotary_percent", lambda value: value != 1.0, "rotary_percent must be 1.0"),
    ("rotary_seq_len_interpolation_factor", bool, "rotary_seq_len_interpolation_factor must be unset"),
    ("apply_residual_connection_post_layernorm", bool, "apply_residual_connection_post_layernorm must be off"),
)


def _check_llama_positions(saved: argparse.Namespace) -> None:
    for field, bad, what in _NOT_LLAMA:
        if bad(getattr(saved, field, None)):
            raise CheckpointError(f"this run is not Llama-shaped: {what} for a Hugging Face export")


def _check_dense_mlp(saved: argparse.Namespace) -> None:
    """The Hugging Face model has Llama's dense MLP: an MoE run is refused before any work."""
    if getattr(saved, "num_experts", None):
        raise CheckpointError(f"this run has MoE MLP layers (--num-experts {saved.num_experts}), which the Hugging "
                              f"Face export does not support yet: keep training and evaluating it with "
                              f"pretrain_moh.py")


class _LayerByLayer:
    """The Hugging Face tensors of a megatron checkpoint by name, reading one layer (or one tensor
    outside the layers) of the checkpoint at a time and holding only that one's tensors: the writer
    asks in the Hugging Face model's order, layer after layer."""

    def __init__(self, path: Path, sharded: dict[str, Any], specs: dict[str, Tensor], config: Any):
        self.path, self.sharded = path, sharded
        self.maps = {m: next(name for name in m.names if name in specs)
                     for m in tensor_maps(config) if any(name in specs for name in m.names)}
        self.by_hf = {name: m for m in self.maps for name in m.hf}
        self.group: Any = None
        self.tensors: dict[str, Tensor] = {}

    @staticmethod
    def _group(m: Any) -> Any:
        return m.megatron if m.layer is None else m.layer

    def __call__(self, hf_name: str) -> Tensor:
        group = self._group(self.by_hf[hf_name])
        if group != self.group:
            self.group, self.tensors = group, {}
            members = {m: name for m, name in self.maps.items() if self._group(m) == group}
            loaded = load_tensors(self.path, self.sharded, members.values())
            for m, name in members.items():
                self.tensors.update(m.to_hf(loaded.pop(name)))
        return self.tensors.pop(hf_name)


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
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise CheckpointError(f"--max-shard-size {max_shard_size!r} is not a size: use e.g. 5GB, 500MB, or a "
                              f"number of bytes") from None
    out = _fresh_output_dir(out_dir, overwrite)
    saved = read_checkpoint_args(load_dir)
    _check_dense_mlp(saved)
    _check_llama_positions(saved)
    tokenizer = _export_tokenizer(saved, tokenizer_model)
    generation = hf_generation.read(load_dir)
    try:
        hf_config = moh_hf_config(
            _model_config(saved), vocab_size=saved.padded_vocab_size,
            max_position_embeddings=saved.max_position_embeddings, rotary_base=saved.rotary_base,
            tie_embeddings=not saved.untie_embeddings_and_output_weights,
            rope_scaling_factor=saved.rope_scaling_factor if getattr(saved, "use_rope_scaling", False) else None,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)  # unless the tokenizer or the import says
        if dense:
            dense_llama_config(hf_config)
        if tokenizer is not None:  # checked now, before any weight is read
            load_export_tokenizer(tokenizer, saved.padded_vocab_size)
    except (ConversionError, TokenizerError) as err:
        raise CheckpointError(str(err)) from None
    with single_process_group():
        path, _, model, sharded = checkpoint_model(load_dir, meta=True)
        check_holds(path, sharded)
        specs = {k: v for k, v in model.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}
        try:
            hf_specs = megatron_to_hf(specs, model.config)
        except ConversionError as err:
            raise CheckpointError(str(err)) from None
        with _written_atomically(out) as scratch:
            write_hf_checkpoint(scratch, hf_config, hf_specs, _LayerByLayer(path, sharded, specs, model.config),
                                dense=dense, max_shard_size=max_shard_size, tokenizer_model_path=tokenizer,
                                generation=generation)
    return out


def _import_args(hf_config: Any, config_kwargs: dict, model_kwargs: dict, hf_dir: Path, tensor_parallel: int,
                 pipeline_parallel: int, divisible_by: int, dtype: torch.dtype) -> argparse.Namespace:
    """The arguments a pretrain_moh.py run of this model at the given layout would save: megatron's
    parse of the flags `finetune_flags` renders for it."""
    from megatron.training.arguments import validate_args

    from megatron_moh.arguments import parse_megatron_args

    c, m = config_kwargs, model_kwargs
    if not float(m["rotary_base"]).is_integer():
        raise CheckpointError(f"rope_theta={m['rotary_base']} is not an integer, which megatron's --rotary-base "
                              f"needs: this model cannot be trained with pretrain_moh.py")
    tokenizer = (dict(tokenizer_type=HUGGINGFACE_TYPE, tokenizer_model=str(hf_dir.resolve()))
                 if _has_tokenizer(hf_dir) else dict(tokenizer_type="NullTokenizer", vocab_size=hf_config.vocab_size))
    described = argparse.Namespace(
        **{field: c[field] for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                         "num_query_groups", "kv_channels", "qk_layernorm", "add_qkv_bias")},
        **{field: c[field] for field in MoHLayout.field_names()},
        group_query_attention=True, layernorm_epsilon=c["layernorm_epsilon"],
        max_position_embeddings=m["max_sequence_length"], rotary_base=m["rotary_base"],
        use_rope_scaling=bool(m.get("rope_scaling")), rope_scaling_factor=m.get("rope_scaling_factor"),
        untie_embeddings_and_output_weights=not m["share_embeddings_and_output_weights"],
        make_vocab_size_divisible_by=divisible_by, tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        **tokenizer)
    argv = [*finetune_flags(described), "--seq-length", str(m["max_sequence_length"]), "--micro-batch-size", "1",
            "--ckpt-format", "torch_dist"]
    args = parse_megatron_args(argv, validate=False)
    args.rank, args.world_size = 0, tensor_parallel * pipeline_parallel
    args.rotary_base = m["rotary_base"]
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    args.padded_vocab_size = calculate_padded_vocab_size(hf_config.vocab_size, divisible_by, tensor_parallel,
                                                         logging_enabled=False)
    return args


def _has_tokenizer(hf_dir: Path) -> bool:
    return any((hf_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _vocab_divisor(hf_dir: Path, vocab_size: int, requested: int, tensor_parallel: int) -> int:
    """The ``--make-vocab-size-divisible-by`` (a multiple of ``requested``) at which training with
    the directory's tokenizer pads to the same vocabulary as the checkpoint: megatron pads the
    tokenizer's size, which can be below the model's ``vocab_size`` (Qwen2: 151,665 of 151,936)."""
    if not _has_tokenizer(hf_dir):
        return requested
    try:
        check_tokenizer_model(str(hf_dir))
    except TokenizerError as err:
        raise CheckpointError(f"--hf: {err} (or remove its tokenizer files to import without a tokenizer)") from None
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(hf_dir))
    if size > vocab_size:
        raise CheckpointError(f"the tokenizer in {hf_dir} has {size} ids but the model's vocabulary only "
                              f"{vocab_size}: they do not belong together")
    divisor = requested
    while True:  # ends: once divisor x TP >= vocab_size both sizes pad to one multiple
        multiple = divisor * tensor_parallel
        if -(-size // multiple) == -(-vocab_size // multiple):
            return divisor
        divisor += requested


def _check_layout(config_kwargs: dict, tensor_parallel: int, pipeline_parallel: int) -> None:
    heads = config_kwargs["num_attention_heads"]
    try:
        MoHLayout.of(argparse.Namespace(**config_kwargs)).resolved(heads).check(
            heads, config_kwargs["num_query_groups"], tensor_parallel)
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
    ``make_vocab_size_divisible_by`` x TP, new rows zero; raised to a multiple of itself at which
    the directory's tokenizer, if smaller than the vocabulary, pads to the same size in training;
    train with the ``--make-vocab-size-divisible-by`` that the printed flags give), and TP/PP are
    recorded as the run's layout. A learned router starts at zero (see
    megatron_moh.conversion.hf_configs). The model's special token ids, chat template and
    generation config go with the checkpoint (`hf_generation`).
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata, generate_state_dict

    from megatron_moh.hf.configuration_moh import MoHLlamaConfig

    hf_dir = Path(hf_dir)
    out = _fresh_output_dir(out_dir, overwrite)
    try:
        hf_config = load_hf_config(hf_dir)
        is_moh = hf_config.model_type == MoHLlamaConfig.model_type
        if is_moh and layout is not None:
            raise CheckpointError(f"{hf_dir} is a moh_llama checkpoint with its own MoH layout: drop --layout")
        if not is_moh and layout is None:
            raise CheckpointError(f"{hf_dir} is a plain Llama: choose its MoH layout with --layout dense (every "
                                  f"head shared: the same function), published (50% shared, 25% routed-active, "
                                  f"query-norm router) or custom (--moh-* flags)")
        config_kwargs = megatron_config_kwargs(hf_config, layout)
        _check_layout(config_kwargs, tensor_parallel, pipeline_parallel)
        plan = plan_hf_import(hf_dir, layout)
    except ConversionError as err:
        raise CheckpointError(str(err)) from None
    divisor = _vocab_divisor(hf_dir, hf_config.vocab_size, make_vocab_size_divisible_by, tensor_parallel)
    generation = hf_generation.read_hf_model(hf_dir)
    dtype = dtype or plan.specs["embedding.word_embeddings.weight"].dtype
    args = _import_args(hf_config, plan.config_kwargs, plan.model_kwargs, hf_dir, tensor_parallel,
                        pipeline_parallel, divisor, dtype)
    with single_process_group():
        model = build_model(args, meta=True)
        produce = _fitted(plan, model)
        metadata = _build_sharded_state_dict_metadata(args, dp_cp_group=parallel_state.get_data_parallel_group())
        common = generate_state_dict(args, [model], None, None, None, iteration=0,
                                     model_sd_kwargs=dict(metadata=metadata))
        with _written_atomically(out) as scratch:
            (scratch / RELEASE).mkdir()
            save_produced(common, scratch / RELEASE, produce,
                          content_metadata=_clean_metadata_for_serialization(metadata))
            hf_generation.write(scratch, generation)
            (scratch / TRACKER).write_text(RELEASE)
    return out


def _fitted(plan: HFImportPlan, model: torch.nn.Module) -> Callable[[str], Tensor]:
    """``plan.produce`` for the tensors of ``model`` (on the meta device), in the model's dtype and
    with the vocabulary padded to the model's rows (new rows zero); refuses, before any work, weights
    that do not fit the model."""
    target = {k: v for k, v in model.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    missing = [k for k in target if k not in plan.maps]
    made = {plan.maps[k].megatron for k in target if k in plan.maps}
    unexpected = [k for k in plan.specs if k not in made]
    if missing or unexpected:
        raise CheckpointError(f"the Hugging Face weights do not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, tensor in target.items():
        shape = plan.specs[plan.maps[name].megatron].shape
        padded = name in VOCAB_TENSORS and shape[1:] == tensor.shape[1:] and shape[0] <= tensor.shape[0]
        if shape != tensor.shape and not padded:
            raise CheckpointError(f"the Hugging Face weights do not fit the model: {name} would be {list(shape)}, "
                                  f"the model's is {list(tensor.shape)}")

    def produce(name: str) -> Tensor:
        made = plan.produce(name).to(target[name].dtype)
        rows = target[name].shape[0] - made.shape[0]  # vocabulary padding
        return torch.cat([made, made.new_zeros(rows, *made.shape[1:])]) if rows else made

    return produce


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def finetune_flags(args: argparse.Namespace) -> list[str]:
    """The pretrain_moh.py flags that build the model ``args`` (a checkpoint's stored arguments)
    describe, at its recorded TP/PP: what ``--load DIR --finetune`` needs besides data and
    training settings."""
    flags = ["--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
             "--ffn-hidden-size", args.ffn_hidden_size, "--num-attention-heads", args.num_attention_heads]
    if getattr(args, "group_query_attention", False):
        flags += ["--group-query-attention", "--num-query-groups", args.num_query_groups]
    flags += ["--kv-channels", effective_arg(args, "kv_channels"), "--max-position-embeddings",
              args.max_position_embeddings, "--rotary-base", _number(args.rotary_base),
              "--norm-epsilon", args.layernorm_epsilon,
              *(["--use-rope-scaling", "--rope-scaling-factor", _number(args.rope_scaling_factor)]
                if getattr(args, "use_rope_scaling", False) else []),
              *(["--qk-layernorm"] if getattr(args, "qk_layernorm", False) else []),
              *(["--add-qkv-bias"] if getattr(args, "add_qkv_bias", False) else []),
              "--make-vocab-size-divisible-by", args.make_vocab_size_divisible_by,
              "--tensor-model-parallel-size", args.tensor_model_parallel_size,
              "--pipeline-model-parallel-size", args.pipeline_model_parallel_size]
    if getattr(args, "moh_dense_baseline", False):
        flags += ["--moh-dense-baseline"]
    elif hasattr(args, "moh_router"):
        flags += MoHLayout.of(args).resolved(args.num_attention_heads).flags()
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
        flags += ["--tie-embeddings-and-output-weights"]
    return [str(flag) for flag in flags]
