"""Fail-fast checks of data blends, splits and the indexed datasets they name.

Everything here raises `DataError` with one line a user can act on, before megatron builds
anything. A dataset on disk is a prefix: ``<prefix>.bin``, ``<prefix>.idx`` and, when
`megatron_moh.data.preprocess` wrote it, ``<prefix>.meta.json`` naming its tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy

from megatron_moh import tokenizer as tok

META_SUFFIX = ".meta.json"


class DataError(ValueError):
    """A one-line, user-fixable problem with data paths, blends or their tokenizer."""


def dataset_files(prefix: str) -> list[str]:
    """The files of the indexed dataset at `prefix`: ``.bin``, ``.idx`` and the meta file."""
    return [f"{prefix}.bin", f"{prefix}.idx", f"{prefix}{META_SUFFIX}"]


def parse_blend(blend: str | Sequence[Any]) -> tuple[list[str], list[float] | None]:
    """Split a Megatron-style blend into ``(prefixes, weights or None)``, rejecting bad weights.

    Accepts ``["0.7", "a", "0.3", "b"]``, ``["a", "b"]``, the same as one whitespace-separated
    string, or megatron's ``(["a", "b"], [0.7, 0.3])``. Weights need not sum to 1 (megatron
    normalises them) but must be finite and positive.
    """
    if isinstance(blend, str):
        blend = blend.split()
    if (
        isinstance(blend, tuple) and len(blend) == 2 and isinstance(blend[0], (list, tuple))
    ):
        prefixes = [str(p) for p in blend[0]]
        weights = None if blend[1] is None else [_weight(w, p) for w, p in zip(blend[1], prefixes)]
        if weights is not None and len(weights) != len(prefixes):
            raise DataError(f"the blend has {len(prefixes)} paths but {len(blend[1])} weights; "
                            "give one weight per path")
        return prefixes, _checked_weights(prefixes, weights)
    items = [str(item) for item in blend]
    if not items:
        raise DataError("the data blend is empty; pass --data-path PREFIX or WEIGHT PREFIX ...")
    numeric = [_is_number(item) for item in items]
    if not any(numeric):
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise DataError(
            f"cannot read the blend {' '.join(items)!r}: give WEIGHT PREFIX pairs "
            "(e.g. 0.7 data/a 0.3 data/b) or only prefixes"
        )
    prefixes = items[1::2]
    weights = [_weight(w, p) for w, p in zip(items[0::2], prefixes)]
    return prefixes, _checked_weights(prefixes, weights)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _weight(value: Any, prefix: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise DataError(f"weight {value!r} for {prefix} is not a number") from None
    if not math.isfinite(weight):
        raise DataError(f"weight {value!r} for {prefix} is not finite; use a positive number")
    if weight < 0:
        raise DataError(f"weight {value!r} for {prefix} is negative; weights must be positive")
    if weight == 0:
        raise DataError(
            f"weight 0 for {prefix}: a dataset cannot be drawn 0 times; drop it from the blend"
        )
    return weight


def _checked_weights(prefixes: list[str], weights: list[float] | None) -> list[float] | None:
    if len(set(prefixes)) != len(prefixes):
        dup = next(p for p in prefixes if prefixes.count(p) > 1)
        raise DataError(
            f"{dup} appears twice in the blend; list each dataset once with its total weight"
        )
    return weights


def parse_split(split: str) -> list[float]:
    """``"98,2,0"`` -> normalised train/valid/test fractions; one-line error if impossible."""
    parts = [p.strip() for p in re.split(r"[,/]", split) if p.strip()]
    if not 1 <= len(parts) <= 3 or not all(_is_number(p) for p in parts):
        raise DataError(
            f"split {split!r} is not up to three numbers; use e.g. 98,2,0 (train,valid,test)"
        )
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataError(
            f"split {split!r} needs non-negative numbers with a positive sum, e.g. 98,2,0"
        )
    return [v / sum(values) for v in values]


def read_meta(prefix: str) -> dict[str, Any] | None:
    """The ``<prefix>.meta.json`` that `preprocess_documents` writes, if present."""
    path = f"{prefix}{META_SUFFIX}"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def max_token_id(prefix: str) -> int:
    """Largest token id stored in an indexed dataset: from its meta file, else by scanning .bin."""
    meta = read_meta(prefix)
    if meta and "max_token_id" in meta:
        return int(meta["max_token_id"])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(prefix, mmap=True).index.dtype
    tokens = numpy.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    chunk = 1 << 24
    return max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)


def validate_data(
    blend: str | Sequence[Any],
    tokenizer: Any = None,
    *,
    vocab_size: int | None = None,
    split: str | None = None,
) -> tuple[list[str], list[float] | None]:
    """Check a blend before training; return ``(prefixes, weights)`` or raise one-line `DataError`.

    Checks: weights are usable, every prefix has its ``.bin`` and ``.idx``, no stored token id
    reaches the vocabulary size (`vocab_size`, default ``tokenizer.vocab_size``), the data was made
    by this tokenizer when its meta file says which, and `split` is a valid split string.
    """
    prefixes, weights = parse_blend(blend)
    if split is not None:
        parse_split(split)
    for prefix in prefixes:
        _check_prefix_exists(prefix)
        _check_index(prefix)
    limit = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None)
    fingerprint = tok.vocab_fingerprint(tokenizer) if tokenizer is not None else None
    for prefix in prefixes:
        if limit is not None:
            highest = max_token_id(prefix)
            if highest >= limit:
                raise DataError(
                    f"vocabulary size mismatch: {prefix} holds token id {highest} but the "
                    f"tokenizer/model vocabulary has only {limit} ids; use the tokenizer the data "
                    "was made with or re-run tools/preprocess_data.py with this one"
                )
        made_by = (read_meta(prefix) or {}).get("vocab_fingerprint")
        if fingerprint and made_by and made_by != fingerprint:
            raise DataError(
                f"{prefix} was tokenized with a different tokenizer (vocabulary {made_by}) than "
                f"the one given (vocabulary {fingerprint}); train with the tokenizer the data was "
                "made with or re-run tools/preprocess_data.py with this one"
            )
    return prefixes, weights


def _check_prefix_exists(prefix: str) -> None:
    if prefix.endswith((".bin", ".idx")) and os.path.isfile(prefix):
        raise DataError(f"data path {prefix} includes the suffix; pass the prefix {prefix[:-4]}")
    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
    if len(missing) == 2:
        raise DataError(
            f"no dataset at {prefix}: {prefix}.bin and {prefix}.idx not found; create them with "
            f"tools/preprocess_data.py --output-prefix {prefix} (a data path is the prefix "
            "without .bin/.idx)"
        )
    if missing:
        raise DataError(f"{missing[0]} is missing beside its pair; re-run tools/preprocess_data.py "
                        f"--output-prefix {prefix} --overwrite")


_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's indexed dataset, version 1
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents


def _check_index(prefix: str) -> None:
    """The ``.idx`` is megatron's index, whole, and describes exactly the ``.bin`` beside it (read
    here from its documented layout: megatron's reader fails on a damaged file with a bare assert)."""
    from megatron.core.datasets.indexed_dataset import DType

    redo = f"re-run tools/preprocess_data.py --output-prefix {prefix} --overwrite"
    idx = f"{prefix}.idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as handle:
        head = handle.read(_INDEX_HEADER.size)
    if len(head) < _INDEX_HEADER.size:
        raise DataError(f"{idx} is not a readable megatron index (only {size} bytes: truncated); {redo}")
    magic, version, code, sequences, documents = _INDEX_HEADER.unpack(head)
    try:
        item = DType.size(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        item = None
    if magic != _INDEX_MAGIC or version != 1 or item is None:
        raise DataError(f"{idx} is not a readable megatron index (wrong header: damaged or another format); {redo}")
    expected = _INDEX_HEADER.size + sequences * (4 + 8) + documents * 8
    if size != expected:
        raise DataError(f"{idx} is not a readable megatron index ({size} bytes where its header implies {expected}: "
                        f"truncated or damaged); {redo}")
    if not sequences:
        return
    lengths = numpy.fromfile(idx, dtype=numpy.int32, count=sequences, offset=_INDEX_HEADER.size)
    last = _INDEX_HEADER.size + 4 * sequences + 8 * (sequences - 1)
    last_pointer = numpy.fromfile(idx, dtype=numpy.int64, count=1, offset=last)
    described = int(last_pointer[0]) + int(lengths[-1]) * item
    actual = os.path.getsize(f"{prefix}.bin")
    if actual != described:
        raise DataError(f"{prefix}.bin has {actual} bytes but its index describes {described} (one of the pair is "
                        f"truncated or from another run); {redo}")
