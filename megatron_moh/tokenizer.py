"""Train and load the sentencepiece tokenizer.

Loading reuses megatron's own tokenizer: `load_tokenizer(path)` returns exactly the object that
``--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model path`` builds inside
megatron.training (``vocab_size``, ``eod``, ``pad``, ``bos``, ``unique_identifiers``,
``tokenize``, ``detokenize``), so data prepared here and data read by ``pretrain()`` agree on
every id and share GPTDataset index caches. Only training is ours.

Trained models are byte-level BPE: ids 0-3 are ``<unk> <s> </s> <pad>``, then the 256 byte pieces,
then merges. ``</s>`` ends every document (megatron's ``eod``). Normalisation is off and runs of
spaces are kept, so ``detokenize(tokenize(text)) == text`` for any text, code examples included.
This module imports megatron only inside `load_tokenizer`, so training stays a sub-second job.
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
from typing import Any

import numpy

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
EOD_PIECE = "</s>"
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = NUM_BYTE_PIECES + 4 + 1
MEGATRON_TOKENIZER_TYPE = "GPTSentencePieceTokenizer"
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


def load_tokenizer(model_path: str) -> Any:
    """Megatron's sentencepiece tokenizer for `model_path`, built the way megatron.training does.

    The result has ``vocab_size``, ``eod``, ``pad``, ``bos``, ``unique_identifiers``,
    ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``.
    """
    check_tokenizer_model(model_path)
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = argparse.Namespace(
        tokenizer_type=MEGATRON_TOKENIZER_TYPE,
        tokenizer_model=model_path,
        metadata_path=None,
        chat_template=None,
        special_tokens=None,
        tokenizer_sentencepiece_legacy=False,
        tokenizer_sentencepiece_ignore_extra_whitespaces=True,
        pad_vocab_size=False,  # padding to a TP multiple is the model's business, not the data's
    )
    return build_tokenizer(args)


def megatron_tokenizer_args(model_path: str) -> list[str]:
    """The megatron.training flags that select this same tokenizer."""
    return ["--tokenizer-type", MEGATRON_TOKENIZER_TYPE, "--tokenizer-model", model_path]


def check_tokenizer_model(model_path: str) -> None:
    """Fail with one line if `model_path` is not a readable sentencepiece model."""
    if not model_path:
        raise TokenizerError("no tokenizer model given; pass --tokenizer-model PATH/TO/x.model")
    if os.path.isdir(model_path):
        raise TokenizerError(
            f"tokenizer model {model_path} is a directory; pass the .model file inside it"
        )
    if not os.path.isfile(model_path):
        hint = (
            f"did you mean {model_path}.model? " if os.path.isfile(f"{model_path}.model") else ""
        )
        raise TokenizerError(
            f"tokenizer model {model_path} not found; {hint}train one with "
            "tools/train_tokenizer.py or pass the right --tokenizer-model"
        )
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError):
        raise TokenizerError(
            f"{model_path} is not a sentencepiece model; pass the .model file written by "
            "tools/train_tokenizer.py (not the .vocab file)"
        ) from None


def file_md5(path: str) -> str:
    """Hex md5 of a file, to record which tokenizer made a dataset."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
