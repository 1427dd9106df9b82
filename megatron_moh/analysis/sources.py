"""Named token sources for the analysis: ``NAME=PREFIX`` (a megatron indexed dataset) or
``NAME=FILE.txt|.jsonl`` (tokenized on the fly with the checkpoint's tokenizer), checked against
the checkpoint before any model is built, and a reproducible sample of N tokens from each.

A sample is made of whole documents drawn in a random order fixed by a seed (corpora are often
sorted by origin, so the first N tokens would show one corner of them), cut at N tokens; the
drawn document indices are kept so the sample can be rebuilt exactly.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from megatron_moh import tokenizer as tok
from megatron_moh.data import preprocess
from megatron_moh.data.validation import DataError, validate_data

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TokenSource:
    """One ``NAME=SOURCE`` of the command line."""

    name: str
    path: str

    @property
    def is_text(self) -> bool:
        """A text file to tokenize (else the prefix of an indexed dataset)."""
        return self.path.lower().endswith(preprocess.TEXT_SUFFIXES + preprocess.JSONL_SUFFIXES)


@dataclass
class TokenSample:
    """The tokens drawn from one source, and the documents (indices in the source) they came from."""

    source: TokenSource
    tokens: numpy.ndarray
    documents: list[int]


def parse_sources(specs: Sequence[str]) -> list[TokenSource]:
    """``["prose=data/docs", "code=code.txt"]`` -> sources; one-line `DataError` if malformed."""
    sources = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise DataError(f"--data {spec!r} is not NAME=SOURCE; e.g. --data prose=data/docs_text_document "
                            "code=snippets.jsonl")
        if not _NAME.fullmatch(name):
            raise DataError(f"--data name {name!r} must be letters, digits, '_', '.' or '-' (it names output files)")
        if any(s.name == name for s in sources):
            raise DataError(f"--data name {name!r} is given twice; give each dataset its own name")
        sources.append(TokenSource(name, path))
    if not sources:
        raise DataError("no --data given; pass one or more NAME=SOURCE")
    return sources


def checkpoint_tokenizer(saved: argparse.Namespace, tokenizer_model: str | None, needed: bool) -> Any:
    """The tokenizer that matches the checkpoint whose run arguments are ``saved``: ``tokenizer_model``
    if given (refused with `DataError` when its vocabulary is not the checkpoint's), else the run's
    own ``--tokenizer-model`` if that file is still there, else None (refused when ``needed``)."""
    recorded = getattr(saved, "tokenizer_model", None)
    recorded_here = bool(recorded) and os.path.exists(recorded)
    path = tokenizer_model or (recorded if recorded_here else None)
    if path is None:
        if needed:
            where = (f"its tokenizer {recorded} is not on this machine" if recorded
                     else f"it was trained with {getattr(saved, 'tokenizer_type', None)}, which has no model files")
            raise DataError(f"text --data needs the checkpoint's tokenizer, but {where}; pass --tokenizer-model")
        return None
    tokenizer = tok.load_tokenizer(path)
    if tokenizer_model and recorded_here:
        ours, theirs = tok.vocab_fingerprint(tokenizer), tok.vocab_fingerprint(tok.load_tokenizer(recorded))
        if ours != theirs:
            raise DataError(f"tokenizer {tokenizer_model} (vocabulary {ours}) is not the checkpoint's {recorded} "
                            f"(vocabulary {theirs}): its ids mean other pieces; drop --tokenizer-model")
    multiple = saved.make_vocab_size_divisible_by * saved.tensor_model_parallel_size
    padded = -(-tokenizer.vocab_size // multiple) * multiple
    if padded != saved.padded_vocab_size:
        raise DataError(f"tokenizer {path} has {tokenizer.vocab_size} pieces (padded to {padded}) but the checkpoint's "
                        f"vocabulary is {saved.padded_vocab_size}: it is not the tokenizer the model was trained with")
    return tokenizer


def draw_tokens(source: TokenSource, num_tokens: int, *, tokenizer: Any, vocab_size: int, seed: int) -> TokenSample:
    """Up to ``num_tokens`` tokens of ``source`` (fewer only if it holds fewer), whole documents in
    the order of ``numpy.random.default_rng(seed).permutation``, text documents tokenized as
    tools/preprocess_data.py does (end-of-document id appended). One-line `DataError` if the source
    is missing, empty, or not made with a tokenizer that fits ``vocab_size`` ids."""
    label = f"--data {source.name}={source.path}"
    try:
        if source.is_text:
            documents = _text_documents(source, tokenizer)
        else:
            documents = _indexed_documents(source, tokenizer, vocab_size)
    except DataError as err:
        raise DataError(f"{label}: {err}") from None
    order = numpy.random.default_rng(seed).permutation(len(documents))
    taken, chosen, total = [], [], 0
    for index in order:
        ids = documents[int(index)]
        if len(ids) == 0:
            continue
        taken.append(numpy.array(ids, dtype=numpy.int64))  # a copy: the dataset's memory map closes
        chosen.append(int(index))
        total += len(ids)
        if total >= num_tokens:
            break
    if not taken:
        raise DataError(f"{label} holds no tokens: every document is empty")
    return TokenSample(source, numpy.concatenate(taken)[:num_tokens], chosen)


class _LazyTokenized(Sequence):
    """Documents of a text file, tokenized when first drawn (only the drawn ones are)."""

    def __init__(self, texts: list[str], tokenizer: Any):
        self.texts, self.tokenizer = texts, tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> list[int]:
        text = self.texts[index]
        return [*self.tokenizer.tokenize(text), self.tokenizer.eod] if text.strip() else []


def _text_documents(source: TokenSource, tokenizer: Any) -> Sequence:
    preprocess.check_input_files([source.path])
    if tokenizer is None:  # checkpoint_tokenizer(needed=True) refuses earlier; kept for library callers
        raise DataError("a text source needs a tokenizer")
    return _LazyTokenized(list(preprocess.iter_documents([source.path])), tokenizer)


def _indexed_documents(source: TokenSource, tokenizer: Any, vocab_size: int) -> Sequence:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    validate_data([source.path], tokenizer, vocab_size=vocab_size)
    return IndexedDataset(source.path, mmap=True)
