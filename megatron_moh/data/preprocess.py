"""Text in, megatron's indexed dataset out: read txt/jsonl documents and tokenize them.

`check_input_files` and `iter_documents` read ``.txt`` (one document per file, paragraph or line)
and ``.jsonl`` (one per line); `preprocess_documents` tokenizes them, one sequence per document
with the end-of-document id appended, into ``<prefix>.bin/.idx`` plus a ``<prefix>.meta.json``
that names the tokenizer so training can check the pairing. The tokenizer is a sentencepiece
model or a Hugging Face tokenizer directory (`megatron_moh.tokenizer`); ids are stored with the
dtype megatron's indexed dataset picks for the vocabulary (int32 from 65,500 ids on).

Megatron is imported inside `preprocess_documents` only, so the tokenizer workers, which
re-import this module, start without the ~8 s megatron import.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy

from megatron_moh import tokenizer as tok
from megatron_moh.data.validation import META_SUFFIX, DataError, dataset_files
from megatron_moh.outputs import unwritable_reason

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
TXT_MODES = ("file", "paragraph", "line")
ERRORS = ("strict", "replace")  # invalid UTF-8 in the input: refuse it, or replace it with U+FFFD


def check_input_files(paths: Sequence[str], json_key: str = "text", errors: str = "strict") -> int:
    """Fail with one line, before any work, if an input is missing or unreadable as documents.

    Every input is read once: with ``errors="strict"`` invalid UTF-8 anywhere is refused, naming
    the file, line and byte; with ``"replace"`` the invalid sequences are counted, and the count
    (what `iter_documents` will replace with U+FFFD) is returned.
    """
    if not paths:
        raise DataError("no input files given; pass --input FILE [FILE ...] (.txt or .jsonl)")
    if errors not in ERRORS:
        raise DataError(f"errors={errors!r} is unknown; use one of {', '.join(ERRORS)}")
    replaced = 0
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"input {path} does not exist; check the --input path")
        if os.path.isdir(path):
            raise DataError(
                f"input {path} is a directory; pass the files inside it (e.g. {path}/*.jsonl)"
            )
        kind = _input_kind(path)
        replaced += _check_text(path, errors)
        if kind == "jsonl":
            _check_jsonl_head(path, json_key, errors)
    return replaced


def _check_text(path: str, errors: str, probe: int = 1 << 16) -> int:
    """The file is UTF-8 text (a binary file named .txt would otherwise be tokenized); returns
    how many invalid sequences ``errors="replace"`` will replace."""
    invalid = 0
    for line, offset, byte in _invalid_utf8(path):
        if errors == "strict":
            raise DataError(f"input {path}:{line} is not UTF-8 text (byte {offset} of the file is "
                            f"0x{byte:02x}): convert it to UTF-8, or pass --errors replace to replace "
                            f"invalid bytes with U+FFFD (counted in the summary)")
        invalid += 1
    with open(path, "rb") as handle:
        if b"\x00" in handle.read(probe):
            raise DataError(f"input {path} holds NUL bytes, so it is binary, not text: pass text or "
                            f"JSON-lines files")
    return invalid


def _invalid_utf8(path: str, block: int = 1 << 20) -> Iterator[tuple[int, int, int]]:
    """(line, byte offset, first byte) of each invalid UTF-8 sequence in ``path``, read in blocks
    of ``block`` bytes; each is one U+FFFD when decoded with ``errors="replace"``."""
    data, base, newlines = b"", 0, 0  # unread bytes, their offset in the file, newlines before them
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(block)
            data += chunk
            done = 0
            while True:
                try:
                    done += codecs.utf_8_decode(memoryview(data)[done:], "strict", not chunk)[1]
                    break
                except UnicodeDecodeError as err:
                    bad = done + err.start
                    yield newlines + data.count(b"\n", 0, bad) + 1, base + bad, data[bad]
                    done = bad + err.end - err.start
            newlines += data.count(b"\n", 0, done)
            base += done
            data = data[done:]
            if not chunk:
                return


def _input_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(TEXT_SUFFIXES):
        return "txt"
    raise DataError(
        f"input {path} has an unknown type; use plain text ({', '.join(TEXT_SUFFIXES)}) or JSON "
        f"lines ({', '.join(JSONL_SUFFIXES)}) with one {{\"text\": ...}} object per line"
    )


def _check_jsonl_head(path: str, json_key: str, errors: str) -> None:
    with open(path, encoding="utf-8", errors=errors) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                _json_text(line, json_key, path, number)
                return


def _json_text(line: str, json_key: str, path: str, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{number} is not valid JSON ({err.msg}); each line must be one JSON object"
        ) from None
    if not isinstance(record, dict) or json_key not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{path}:{number} has no {json_key!r} field (found: {keys}); pass --json-key with "
            "the field that holds the text"
        )
    text = record[json_key]
    if not isinstance(text, str):
        raise DataError(
            f"{path}:{number} field {json_key!r} is a {type(text).__name__}, not text; pass "
            "--json-key with a string field"
        )
    return text


def iter_documents(
    paths: Sequence[str], json_key: str = "text", txt_mode: str = "file", errors: str = "strict"
) -> Iterator[str]:
    """Yield documents from .jsonl (one per line, field `json_key`) and text files.

    A text file is one document (`txt_mode` ``"file"``), or one per blank-line-separated
    paragraph (``"paragraph"``) or per non-empty line (``"line"``). ``errors``: what to do with
    invalid UTF-8, as in `bytes.decode` (`check_input_files` refuses or counts it up front).
    """
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode={txt_mode!r} is unknown; use one of {', '.join(TXT_MODES)}")
    for path in paths:
        if _input_kind(path) == "jsonl":
            with open(path, encoding="utf-8", errors=errors) as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield _json_text(line, json_key, path, number)
            continue
        with open(path, encoding="utf-8", errors=errors) as handle:
            if txt_mode == "file":
                yield handle.read()
            elif txt_mode == "line":
                yield from (line.rstrip("\n") for line in handle if line.strip())
            else:
                yield from _paragraphs(handle)


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def count_documents(paths: Sequence[str], txt_mode: str = "file") -> int:
    """How many documents `iter_documents` will yield, for a progress bar (reads the files once)."""
    total = 0
    for path in paths:
        if _input_kind(path) == "txt" and txt_mode == "file":
            total += 1
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            if _input_kind(path) == "jsonl" or txt_mode == "line":
                total += sum(1 for line in handle if line.strip())
            else:
                total += sum(1 for _ in _paragraphs(handle))
    return total


@dataclass
class PreprocessStats:
    """What `preprocess_documents` wrote; also stored beside the data as ``<prefix>.meta.json``."""

    documents: int
    tokens: int
    skipped_empty: int
    max_token_id: int
    eod: int | None
    vocab_size: int
    vocab_fingerprint: str
    tokenizer_type: str
    tokenizer_model: str
    tokenizer_md5: str
    seconds: float


def check_output_prefix(output_prefix: str, overwrite: bool = False) -> None:
    """Fail with one line if writing `output_prefix` would clobber data or cannot work."""
    if not output_prefix:
        raise DataError(
            "no output prefix given; pass --output-prefix DIR/NAME (writes NAME.bin/.idx)"
        )
    if output_prefix.endswith((".bin", ".idx")):
        raise DataError(
            f"--output-prefix {output_prefix} ends in {output_prefix[-4:]}; give the prefix "
            f"without it ({output_prefix[:-4]})"
        )
    existing = [p for p in dataset_files(output_prefix) if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(
            f"{existing[0]} already exists; pass --overwrite to replace it or choose another "
            "--output-prefix"
        )
    reason = unwritable_reason(os.path.dirname(os.path.abspath(output_prefix)))
    if reason:
        raise DataError(f"--output-prefix {output_prefix}: {reason}; choose a writable directory")


def preprocess_documents(
    documents: Iterable[str],
    output_prefix: str,
    tokenizer_model: str,
    *,
    tokenizer_type: str | None = None,
    workers: int = 1,
    append_eod: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> PreprocessStats:
    """Tokenize `documents` into ``<output_prefix>.bin/.idx`` (one sequence per document) with the
    tokenizer at `tokenizer_model` (a sentencepiece model or a Hugging Face tokenizer directory;
    `tokenizer_type`, megatron's name for its kind, is checked against it when given).

    Ids are exactly megatron's ``tokenizer.tokenize(document)`` (a Hugging Face tokenizer adds what
    its post-processor adds, e.g. Llama-3's ``<|begin_of_text|>``), then the tokenizer's EOS
    (megatron's ``eod``) unless `append_eod` is False; empty documents are skipped. Output order
    equals input order for any number of `workers`. Files are written under temporary names and
    renamed at the end, so a crash never leaves a half-written dataset behind.
    """
    check_output_prefix(output_prefix, overwrite)
    tokenizer_type = tok.check_tokenizer_model(tokenizer_model, tokenizer_type)
    if workers < 1:
        raise DataError(f"workers={workers}; use 1 or more")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.time()
    tokenizer = tok.load_tokenizer(tokenizer_model, tokenizer_type)
    vocab_size = tokenizer.vocab_size
    eod = tokenizer.eod
    if append_eod and eod is None:
        raise DataError(
            f"{tokenizer_model} has no end-of-document (eos) token; retrain it with "
            "tools/train_tokenizer.py, give it an eos_token, or pass --no-append-eod"
        )
    dtype = DType.optimal_dtype(vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    n_docs = n_tokens = skipped = 0
    max_id = -1
    try:
        builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
        with _encoder_pool((tokenizer_type, tokenizer_model), workers) as encode_all:
            for ids in _progress(encode_all(documents), progress, total):
                if ids is None:
                    skipped += 1
                    continue
                if append_eod:
                    ids = numpy.append(ids, numpy.int32(eod))
                builder.add_document(ids, [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
                max_id = max(max_id, int(ids.max()))
        builder.finalize(f"{tmp_prefix}.idx")
        if n_docs == 0:
            raise DataError("every input document is empty; nothing to write")
        for suffix in (".bin", ".idx"):
            os.replace(f"{tmp_prefix}{suffix}", f"{output_prefix}{suffix}")
    finally:
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp_prefix}{suffix}")
    _drop_stale_index_cache(output_prefix)
    stats = PreprocessStats(
        documents=n_docs,
        tokens=n_tokens,
        skipped_empty=skipped,
        max_token_id=max_id,
        eod=eod if append_eod else None,
        vocab_size=vocab_size,
        vocab_fingerprint=tok.vocab_fingerprint(tokenizer),
        tokenizer_type=tokenizer_type,
        tokenizer_model=os.path.abspath(tokenizer_model),
        tokenizer_md5=tok.tokenizer_digest(tokenizer_model),
        seconds=round(time.time() - start, 3),
    )
    tok.atomic_write(f"{output_prefix}{META_SUFFIX}", json.dumps(asdict(stats), indent=1).encode())
    return stats


def _drop_stale_index_cache(output_prefix: str) -> None:
    """Remove GPTDataset's default index cache for this prefix: it is keyed by path, not content."""
    stale = os.path.join(output_prefix, "cache", "GPTDataset_indices")
    if os.path.isdir(stale):
        logger.info("removing stale GPTDataset index cache %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _progress(items: Iterable[Any], enabled: bool, total: int | None) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, unit="doc", dynamic_ncols=True)


# Workers encode with the tokenizer library directly, exactly as megatron's tokenizers do:
# sentencepiece's ``encode_as_ids`` (megatron's SentencePieceTokenizer under its default flags,
# legacy=False) or the Hugging Face tokenizer's ``__call__`` (megatron's HuggingFaceTokenizer with
# special tokens included, its default). This keeps the ~8 s megatron import out of every worker;
# tests/unit/test_data_tools.py checks the equality for both kinds.
_WORKER_ENCODE: Callable[[list[str]], list[numpy.ndarray]] | None = None


def _init_worker(tokenizer: tuple[str, str]) -> None:
    global _WORKER_ENCODE
    tokenizer_type, path = tokenizer
    if tokenizer_type == tok.HUGGINGFACE_TYPE:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path)
        _WORKER_ENCODE = lambda texts: tok.encode_hf_in_pieces(hf, texts)  # noqa: E731
    else:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=path)
        _WORKER_ENCODE = lambda texts: [tok.encode_in_pieces(processor, text) for text in texts]  # noqa: E731


def _encode_batch(texts: list[str]) -> list[numpy.ndarray | None]:
    kept = [i for i, text in enumerate(texts) if text.strip()]
    encoded = iter(_WORKER_ENCODE([texts[i] for i in kept]) if kept else [])
    out: list[numpy.ndarray | None] = [None] * len(texts)
    for i in kept:
        ids = next(encoded)
        out[i] = ids if len(ids) else None
    return out


_BATCH = 64  # documents per worker task: amortises pickling without hurting streaming


@contextlib.contextmanager
def _encoder_pool(
    tokenizer: tuple[str, str], workers: int
) -> Iterator[Callable[[Iterable[str]], Iterator[numpy.ndarray | None]]]:
    """A function that encodes a document stream in order, in-process or on `workers` processes;
    `tokenizer` is ``(megatron tokenizer type, path)``.

    Workers are spawned, not forked: this process may hold torch/gloo threads, and the one
    forkserver per process may have been started, with its own preloads, by other code. A dead
    worker raises instead of hanging, and at most a few batches per worker are in flight, so
    input of any size streams.
    """
    if workers == 1:
        _init_worker(tokenizer)
        yield lambda docs: (ids for batch in _batched(docs, _BATCH) for ids in _encode_batch(batch))
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    executor = ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), _init_worker, (tokenizer,)
    )

    def encode_all(docs: Iterable[str]) -> Iterator[numpy.ndarray | None]:
        pending: deque = deque()
        try:
            for batch in _batched(docs, _BATCH):
                pending.append(executor.submit(_encode_batch, batch))
                if len(pending) >= 4 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise DataError(
                "a tokenizer worker process died (spawned workers re-import __main__, which fails "
                "from stdin or a script without `if __name__ == '__main__':`); use workers=1 "
                "or run from a guarded script"
            ) from None

    try:
        yield encode_all
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
