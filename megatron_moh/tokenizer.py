"""Train the sentencepiece tokenizer; check and load any tokenizer megatron-moh reads.

Two kinds of tokenizer are read everywhere (training, preprocessing, analysis, export):

* a sentencepiece ``.model`` file (megatron's ``GPTSentencePieceTokenizer``), the kind
  `train_tokenizer` writes and the built-in corpus uses;
* a Hugging Face tokenizer directory (megatron's ``HuggingFaceTokenizer``): ``tokenizer.json``
  (Llama-3, Qwen2, Qwen3 ship only that) or a sentencepiece model with its ``tokenizer_config.json``.

Loading reuses megatron's own tokenizers: `load_tokenizer(path)` returns exactly the object that
``--tokenizer-type TYPE --tokenizer-model path`` builds inside megatron.training (``vocab_size``,
``eod``, ``pad``, ``bos``, ``unique_identifiers``, ``tokenize``, ``detokenize``), so data prepared
here and data read by ``pretrain()`` agree on every id and share GPTDataset index caches. A Hugging
Face tokenizer's ``tokenize`` adds what its post-processor adds (Llama-3: ``<|begin_of_text|>``
first); the end of a document is its EOS (megatron's ``eod``).

Trained models are byte-level BPE: ids 0-3 are ``<unk> <s> </s> <pad>``, then the 256 byte pieces,
then merges. ``</s>`` ends every document (megatron's ``eod``). Normalisation is off and runs of
spaces are kept, so ``detokenize(tokenize(text)) == text`` for any text, code examples included.
This module imports megatron and transformers only inside functions, so training stays a sub-second job.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
EOD_PIECE = "</s>"
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = NUM_BYTE_PIECES + 4 + 1
SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")
HUGGINGFACE_TYPE = "HuggingFaceTokenizer"
MEGATRON_TOKENIZER_TYPE = SENTENCEPIECE_TYPES[0]  # what train_tokenizer's models are read as
# sentencepiece trains on lines and skips longer ones without a word: longer lines are split.
_MAX_LINE_BYTES = 16384
# sentencepiece holds about 50 bytes per character of a text while encoding it: longer texts are
# encoded in pieces of this many characters (a 200 MB line would need over 10 GB otherwise).
ENCODE_PIECE_CHARS = 1 << 20


class TokenizerError(ValueError):
    """A one-line, user-fixable problem with a tokenizer file or its training input."""


def train_tokenizer(
    documents: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    *,
    overwrite: bool = False,
    seed: int = 1234,
    num_threads: int = 1,
) -> str:
    """Train a byte-fallback BPE sentencepiece model on `documents`; return the ``.model`` path.

    Deterministic: the same documents and settings give a byte-identical model file (fixed seed,
    no sentence sampling, a fixed thread count, and the model is written through a buffer so no
    temporary path lands in it). Writes ``<model_prefix>.model`` and a readable
    ``<model_prefix>.vocab``; refuses to replace an existing model unless `overwrite`.
    """
    import sentencepiece as spm

    model_path, vocab_path = f"{model_prefix}.model", f"{model_prefix}.vocab"
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-fallback BPE needs {NUM_BYTE_PIECES} byte "
            f"pieces + 4 special pieces + the text's characters; use at least {MIN_VOCAB_SIZE}"
            " (a few hundred more for useful merges)"
        )
    if os.path.exists(model_path) and not overwrite:
        raise TokenizerError(
            f"{model_path} already exists; pass --overwrite (overwrite=True) to replace it or "
            "choose another --model-prefix"
        )
    parent = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(parent, exist_ok=True)

    counter = _LineCounter(documents)
    buffer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(counter),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            max_sentence_length=_MAX_LINE_BYTES,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            eos_piece=EOD_PIECE,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        if counter.error is not None:  # the input's own error (e.g. bad JSON), not sentencepiece's
            raise counter.error from None
        raise _explain_training_error(err, vocab_size, counter.lines) from None

    atomic_write(model_path, buffer.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    atomic_write(vocab_path, vocab.encode("utf-8"))
    return model_path


def tokenizer_type_of(path: str) -> str:
    """The megatron ``--tokenizer-type`` that reads ``path``: ``HuggingFaceTokenizer`` for a
    directory, ``GPTSentencePieceTokenizer`` for a file."""
    return HUGGINGFACE_TYPE if os.path.isdir(path) else MEGATRON_TOKENIZER_TYPE


def load_tokenizer(path: str, tokenizer_type: str | None = None) -> Any:
    """Megatron's tokenizer for ``path`` (a sentencepiece model or a Hugging Face tokenizer
    directory), built the way megatron.training builds it for ``--tokenizer-type tokenizer_type
    --tokenizer-model path`` (the type defaults to what the path is).

    The result has ``vocab_size``, ``eod``, ``pad``, ``bos``, ``unique_identifiers``,
    ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``.
    """
    tokenizer_type = check_tokenizer_model(path, tokenizer_type)
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    # megatron.training's defaults for these flags (tests/unit/test_data_tools.py compares).
    args = argparse.Namespace(
        tokenizer_type=tokenizer_type,
        tokenizer_model=path,
        metadata_path=None,
        chat_template=None,
        special_tokens=None,
        vocab_file=None,
        merge_file=None,
        tokenizer_hf_no_use_fast=False,
        tokenizer_hf_no_include_special_tokens=False,
        trust_remote_code=False,
        tokenizer_sentencepiece_legacy=False,
        tokenizer_sentencepiece_ignore_extra_whitespaces=True,
        pad_vocab_size=False,  # padding to a TP multiple is the model's business, not the data's
    )
    return build_tokenizer(args)


def megatron_tokenizer_args(path: str) -> list[str]:
    """The megatron.training flags that select this same tokenizer."""
    return ["--tokenizer-type", tokenizer_type_of(path), "--tokenizer-model", path]


def check_tokenizer_model(path: str | None, tokenizer_type: str | None = None) -> str:
    """Fail with one line unless ``path`` is a readable tokenizer of the kind ``tokenizer_type``
    names (any kind when None); return the megatron tokenizer type that reads it."""
    if not path:
        raise TokenizerError("no tokenizer model given; pass --tokenizer-model with a sentencepiece .model file "
                             "or a Hugging Face tokenizer directory")
    if not os.path.exists(path):
        hint = f"did you mean {path}.model? " if os.path.isfile(f"{path}.model") else ""
        raise TokenizerError(
            f"tokenizer model {path} not found; {hint}pass a sentencepiece .model file (tools/train_tokenizer.py "
            "writes one) or a local Hugging Face tokenizer directory (a hub name needs the network: download it)"
        )
    kind = tokenizer_type_of(path)
    if tokenizer_type in (HUGGINGFACE_TYPE, *SENTENCEPIECE_TYPES) and (tokenizer_type == HUGGINGFACE_TYPE) != (
            kind == HUGGINGFACE_TYPE):
        if kind == HUGGINGFACE_TYPE:
            raise TokenizerError(f"{path} is a Hugging Face tokenizer directory but --tokenizer-type is "
                                 f"{tokenizer_type}: pass --tokenizer-type {HUGGINGFACE_TYPE}")
        raise TokenizerError(f"{path} is a sentencepiece model file but --tokenizer-type is {tokenizer_type}: "
                             f"pass --tokenizer-type {MEGATRON_TOKENIZER_TYPE} (or the Hugging Face tokenizer "
                             "directory it came from)")
    if kind == HUGGINGFACE_TYPE:
        _check_huggingface_dir(path)
    else:
        _check_sentencepiece_file(path)
    return tokenizer_type or kind


def _check_sentencepiece_file(path: str) -> None:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError):
        raise TokenizerError(
            f"{path} is not a sentencepiece model; pass the .model file written by tools/train_tokenizer.py "
            "(not the .vocab file) or a Hugging Face tokenizer directory"
        ) from None


def _check_huggingface_dir(path: str) -> None:
    files = {p.name for p in Path(path).iterdir()}
    if "tokenizer.json" not in files and not any(name.endswith(".model") for name in files):
        raise TokenizerError(f"{path} is a directory holding neither tokenizer.json nor a sentencepiece .model: "
                             "pass a Hugging Face tokenizer directory or a .model file")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad directory
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise TokenizerError(f"{path} does not load as a Hugging Face tokenizer: "
                             f"{lines[0] if lines else type(err).__name__}") from None


def tokenizer_digest(path: str) -> str:
    """Hex md5 of a tokenizer: the ``.model`` file, or the files of a Hugging Face tokenizer
    directory (by name), to record which tokenizer made a dataset."""
    digest = hashlib.md5(usedforsecurity=False)
    files = sorted(Path(path).iterdir()) if os.path.isdir(path) else [Path(path)]
    for file in files:
        if file.is_file() and (len(files) == 1 or _is_tokenizer_file(file.name)):
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "chat_template")) or \
        name.endswith((".model", "vocab.json", "merges.txt"))


def vocab_fingerprint(tokenizer: Any) -> str | None:
    """A short hash of the id -> piece table, or None when the tokenizer has no listable vocab.

    Two tokenizers with the same fingerprint give the same ids; unlike the file md5 it ignores
    training metadata stored inside the model file.
    """
    try:
        vocab = tokenizer.vocab
    except Exception:  # noqa: BLE001 - NullTokenizer and friends have no vocabulary to list
        return None
    if isinstance(vocab, dict):
        return pieces_fingerprint(piece for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    if isinstance(vocab, (list, tuple)):
        return pieces_fingerprint(vocab)
    return None


def pieces_fingerprint(pieces: Iterable[Any]) -> str:
    """`vocab_fingerprint` of a vocabulary given as its pieces in id order."""
    joined = "\n".join(str(piece) for piece in pieces).encode("utf-8")
    return hashlib.sha256(joined).hexdigest()[:16]


def atomic_write(path: str, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a tokenizer is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _LineCounter:
    """Feed sentencepiece the non-empty lines of each document, counting them for error messages.

    Lines over sentencepiece's byte limit, which it would skip without a word, go in pieces cut at
    spaces (`split_at_spaces`): it learns the same words from them. An error raised while reading
    the documents is kept in ``error``, since sentencepiece reports it only as an internal error.
    """

    def __init__(self, documents: Iterable[str]) -> None:
        self.documents = documents
        self.lines = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for document in self.documents:
                for line in document.split("\n"):
                    if line.strip():
                        self.lines += 1
                        if len(line.encode("utf-8")) <= _MAX_LINE_BYTES:
                            yield line
                        else:  # a character is at most 4 bytes
                            yield from (piece for piece, _ in split_at_spaces(line, _MAX_LINE_BYTES // 4))
        except Exception as err:
            self.error = err
            raise


def split_at_spaces(text: str, limit: int) -> Iterator[tuple[str, bool]]:
    """``text`` in pieces of at most ``limit`` characters, each with whether a space before it was
    dropped.

    sentencepiece starts every text with a space (its dummy prefix) and no piece of its vocabulary
    spans a space that follows a non-space character. Cutting at such a space and dropping it
    therefore gives pieces that encode to the ids of the whole text, and train the same words. A
    run of ``limit`` characters without one is cut where it reaches the limit; the piece after that
    cut follows no dropped space.
    """
    start, after_space = 0, False
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit + 1)
        while cut > start and text[cut - 1] == " ":  # to the first space of a run
            cut -= 1
        if cut > start:
            yield text[start:cut], after_space
            start, after_space = cut + 1, True
        else:
            yield text[start:start + limit], after_space
            start, after_space = start + limit, False
    yield text[start:], after_space


def encode_in_pieces(processor: Any, text: str, limit: int | None = None) -> numpy.ndarray:
    """``processor.encode_as_ids(text)`` as int32, in memory bounded by ``limit`` characters
    (default `ENCODE_PIECE_CHARS`) plus 4 bytes per id: the same ids, except around a cut inside a
    run of ``limit`` characters without a space, where the ids may differ but still decode to the
    same text."""
    limit = limit or ENCODE_PIECE_CHARS
    pieces = []
    for number, (piece, after_space) in enumerate(split_at_spaces(text, limit)):
        encoder = processor if number == 0 or after_space else _without_dummy_prefix(processor)
        pieces.append(numpy.asarray(encoder.encode_as_ids(piece), dtype=numpy.int32))
    return pieces[0] if len(pieces) == 1 else numpy.concatenate(pieces)


def encode_hf_in_pieces(tokenizer: Any, texts: list[str], limit: int | None = None) -> list[numpy.ndarray]:
    """``tokenizer(texts).input_ids`` of a Hugging Face tokenizer, as int32 arrays, with each text
    longer than ``limit`` characters (default `ENCODE_PIECE_CHARS`) encoded in pieces so that memory
    stays bounded: cut before a space that starts a word, which byte-level BPE pre-tokenizers
    (GPT-2, Llama-3, Qwen) never merge across, with the tokens its template puts first added once.
    Tokenizers for which that is not exact (checked on a probe text), and texts without such a
    space within ``limit`` characters, are refused (TokenizerError) rather than changed."""
    limit = limit or ENCODE_PIECE_CHARS
    short = [i for i, text in enumerate(texts) if len(text) <= limit]
    out: list[numpy.ndarray] = [numpy.zeros(0, numpy.int32)] * len(texts)
    if short:
        for i, ids in zip(short, tokenizer([texts[i] for i in short]).input_ids):
            out[i] = numpy.asarray(ids, dtype=numpy.int32)
    for i, text in enumerate(texts):
        if len(text) > limit:
            prefix = _hf_piece_prefix(tokenizer)
            if prefix is None:
                raise TokenizerError(f"a document of {len(text):,} characters is longer than {limit:,}, and this "
                                     "tokenizer cannot encode it in pieces with the ids of the whole: split it into "
                                     "shorter documents")
            pieces = [tokenizer(piece, add_special_tokens=False).input_ids for piece in _before_words(text, limit)]
            out[i] = numpy.asarray(prefix + [t for piece in pieces for t in piece], dtype=numpy.int32)
    return out


_PROBE = "Return the  number of items, 12345 or 3.14.\n\n  An indented line\tand\ttabs;\nthe end."


@functools.lru_cache(maxsize=4)
def _hf_piece_prefix(tokenizer: Any) -> list[int] | None:
    """The ids ``tokenizer``'s template puts before a text, when encoding in pieces cut before words
    gives the whole text's ids (checked on a probe); else None."""
    whole = tokenizer(_PROBE).input_ids
    plain = tokenizer(_PROBE, add_special_tokens=False).input_ids
    if whole[len(whole) - len(plain):] != plain:
        return None  # the template adds tokens after the text too
    pieces = [t for piece in _before_words(_PROBE, 24) for t in tokenizer(piece, add_special_tokens=False).input_ids]
    return whole[:len(whole) - len(plain)] if pieces == plain else None


def _before_words(text: str, limit: int) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, each after the first starting with the
    space before a word (TokenizerError if a stretch of ``limit`` characters has no such space)."""
    start = 0
    while len(text) - start > limit:
        cut = start + limit
        while cut > start and not (text[cut] == " " and cut + 1 < len(text) and not text[cut + 1].isspace()):
            cut -= 1
        if cut == start:
            raise TokenizerError(f"a stretch of {limit:,} characters without a space before a word cannot be encoded "
                                 "in pieces: split the document")
        yield text[start:cut]
        start = cut
    yield text[start:]


@functools.lru_cache(maxsize=4)
def _without_dummy_prefix(processor: Any) -> Any:
    """``processor``'s model without the space sentencepiece puts before every text: for the
    continuation of a text that was cut where there is no space."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _explain_training_error(err: RuntimeError, vocab_size: int, lines: int) -> TokenizerError:
    message = str(err)
    if lines == 0:
        return TokenizerError("no text to train the tokenizer on: every input document is empty")
    need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if need:
        return TokenizerError(
            f"vocab_size={vocab_size} is too small for this text: it needs {need.group(1)} pieces "
            "for bytes, special tokens and characters alone; raise --vocab-size well above that"
        )
    most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                     message)
    if most:
        return TokenizerError(
            f"vocab_size={vocab_size} is too large for this little text (at most {most.group(1)} "
            "pieces can be learnt); lower --vocab-size or train on more text"
        )
    return TokenizerError(f"sentencepiece training failed: {message.splitlines()[0]}")
