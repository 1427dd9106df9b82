"""Train/valid/test GPT datasets from megatron-core: the one path for training and tests.

`build_gpt_datasets` hands a checked blend to megatron-core's BlendedMegatronDatasetBuilder with
GPTDataset (or MockGPTDataset); ``megatron_moh.train.datasets_provider`` only maps megatron's
parsed arguments onto it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from megatron_moh.data.validation import DataError, parse_blend, parse_split, validate_data

SPLITS = ("train", "valid", "test")
# A blend as megatron-core takes it: dataset prefixes and their weights (None: by size).
MegatronBlend = tuple[list[str], list[float] | None]


def build_gpt_datasets(
    blend: str | Sequence[Any] | None,
    tokenizer: Any,
    *,
    sequence_length: int,
    num_samples: Sequence[int | None],
    split: str | None = "98,2,0",
    blend_per_split: Sequence[str | Sequence[Any] | None] | None = None,
    mock: bool = False,
    seed: int = 1234,
    path_to_cache: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    validate: bool = True,
    **config_kwargs: Any,
) -> tuple[Any, Any, Any]:
    """Train/valid/test datasets (None for an empty split) from megatron-core's builder.

    Data comes from `blend`, cut into train/valid/test by `split`, or from `blend_per_split`
    (one blend or None per split, with ``split=None``), or, with `mock`, from MockGPTDataset.
    A blend is any form `parse_blend` reads, megatron's ``(prefixes, weights)`` included.
    `num_samples` is ``(train, valid, test)`` sample counts; a weighted blend needs each split it
    builds counted. `validate` runs `validate_data` on every blend first (files, vocabulary,
    split); pass False when the caller has already checked them. Deterministic for a given
    `seed`. Extra keyword arguments (e.g. ``mid_level_dataset_surplus``) go to
    ``GPTDatasetConfig``. Must be called on every rank when a process group exists (the builder
    builds on rank 0 first and then barriers); `is_built_on_rank` says which ranks need the data
    (default: all).
    """
    blend = _checked_blend(blend, tokenizer, split, validate)
    if blend_per_split is not None:
        blend_per_split = [_checked_blend(b, tokenizer, None, validate) for b in blend_per_split]
    _check_sample_counts(blend, blend_per_split, split, num_samples)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=sequence_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **config_kwargs,
    )
    builder = BlendedMegatronDatasetBuilder(
        MockGPTDataset if mock else GPTDataset,
        list(num_samples),
        is_built_on_rank or (lambda: True),
        config,
    )
    train, valid, test = builder.build()
    return train, valid, test


def _checked_blend(
    blend: str | Sequence[Any] | None, tokenizer: Any, split: str | None, validate: bool
) -> MegatronBlend | None:
    if blend is None:
        return None
    if validate:
        return validate_data(blend, tokenizer, split=split)
    return parse_blend(blend)


def _check_sample_counts(
    blend: MegatronBlend | None,
    blend_per_split: list[MegatronBlend | None] | None,
    split: str | None,
    num_samples: Sequence[int | None],
) -> None:
    """A weighted blend cannot be drawn an unknown number of times: say so in one line before
    megatron's builder asserts."""
    if len(num_samples) != 3:
        raise DataError(f"num_samples={list(num_samples)} needs three counts: (train, valid, test)")
    if all(n is not None for n in num_samples):
        return
    if blend_per_split is not None:
        weighted = [b is not None and b[1] is not None for b in blend_per_split]
    elif blend is not None and blend[1] is not None and split is not None:
        weighted = [fraction > 0 for fraction in parse_split(split)]
    else:
        return
    unset = [name for name, n, w in zip(SPLITS, num_samples, weighted) if w and n is None]
    if unset:
        raise DataError(f"a weighted blend needs a sample count for the {unset[0]} split; "
                        "set it (e.g. from --train-iters x global batch size)")
