"""Text in, megatron-core GPT datasets out.

Four jobs, each a few functions:

* a corpus every machine already has: the docstrings of Python's standard library
  (`builtin_corpus_text`), turned once into a cached tokenizer + indexed dataset
  (`prepare_builtin_dataset`);
* reading txt/jsonl input (`check_input_files`, `iter_documents`) and tokenizing it into
  megatron's ``.bin``/``.idx`` format (`preprocess_documents`), one document per sequence with
  the end-of-document id appended;
* fail-fast checks with one-line messages before anything is built (`parse_blend`,
  `validate_data`);
* train/valid/test datasets from megatron-core's BlendedMegatronDatasetBuilder + GPTDataset
  (`build_gpt_datasets`).

Megatron and torch are imported inside the functions that need them, so tokenizer training and
the preprocessing workers start without the ~8 s megatron import.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy

from megatron_moh import tokenizer as tok

logger = logging.getLogger(__name__)

BUILTIN_CORPUS_VERSION = 1  # bump when the corpus extraction or tokenizer settings change
DEFAULT_VOCAB_SIZE = 4096
META_SUFFIX = ".meta.json"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
TXT_MODES = ("file", "paragraph", "line")
_BUILTIN_PREFIX_NAME = "text_document"
# Directories of the stdlib whose docstrings are test scaffolding or generated boilerplate.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "encodings"}


class DataError(ValueError):
    """A one-line, user-fixable problem with data paths, blends or their tokenizer."""


# --------------------------------------------------------------------------------------------
# The built-in corpus


def builtin_corpus_text() -> Iterator[str]:
    """Yield English documents from the docstrings of Python's own standard library.

    Needs no download. Files are parsed with `ast` (never imported), walked in sorted order, so
    the corpus is the same on every run of the same Python version. One document per module
    docstring and per top-level class or function (its methods' docstrings included); test
    suites and generated codec modules are left out. About 1.6 MB of text on Python 3.12.
    """
    for path in _stdlib_sources():
        try:
            with open(path, "rb") as handle:
                source = handle.read()
            with warnings.catch_warnings():  # old invalid escapes in the stdlib's own sources
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (SyntaxError, ValueError, OSError):
            continue
        yield from _docstring_documents(tree)


def _stdlib_sources() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    sources = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(
            d for d in subdirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("test")
        )
        sources.extend(
            os.path.join(directory, name)
            for name in sorted(files)
            if name.endswith(".py") and not name.startswith("test")
        )
    return sources


def _docstring_documents(tree: ast.Module) -> Iterator[str]:
    module_doc = ast.get_docstring(tree)
    if module_doc:
        yield module_doc
    for node in _top_level_definitions(tree.body):
        docs: list[str] = []
        _collect_docstrings(node, docs)
        if docs:
            yield "\n\n".join(docs)


def _top_level_definitions(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Top-level classes and functions, including those under ``if``/``try`` at module level."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _top_level_definitions(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level_definitions(handler.body)


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
    doc = ast.get_docstring(node)  # type: ignore[arg-type]
    if doc:
        out.append(doc)
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            _collect_docstrings(child, out)


# --------------------------------------------------------------------------------------------
# Reading txt / jsonl input


def check_input_files(paths: Sequence[str], json_key: str = "text") -> None:
    """Fail with one line, before any work, if an input is missing or unreadable as documents."""
    if not paths:
        raise DataError("no input files given; pass --input FILE [FILE ...] (.txt or .jsonl)")
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"input {path} does not exist; check the --input path")
        if os.path.isdir(path):
            raise DataError(
                f"input {path} is a directory; pass the files inside it (e.g. {path}/*.jsonl)"
            )
        kind = _input_kind(path)
        if kind == "jsonl":
            _check_jsonl_head(path, json_key)


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


def _check_jsonl_head(path: str, json_key: str) -> None:
    with open(path, encoding="utf-8") as handle:
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
    paths: Sequence[str], json_key: str = "text", txt_mode: str = "file"
) -> Iterator[str]:
    """Yield documents from .jsonl (one per line, field `json_key`) and text files.

    A text file is one document (`txt_mode` ``"file"``), or one per blank-line-separated
    paragraph (``"paragraph"``) or per non-empty line (``"line"``).
    """
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode={txt_mode!r} is unknown; use one of {', '.join(TXT_MODES)}")
    for path in paths:
        if _input_kind(path) == "jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield _json_text(line, json_key, path, number)
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
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


# --------------------------------------------------------------------------------------------
# Tokenizing into megatron's indexed dataset


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
    existing = [p for p in _dataset_files(output_prefix) if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(
            f"{existing[0]} already exists; pass --overwrite to replace it or choose another "
            "--output-prefix"
        )
    parent = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise DataError(
            f"cannot write to {parent}; choose an --output-prefix in a writable directory"
        )


def _dataset_files(prefix: str) -> list[str]:
    return [f"{prefix}.bin", f"{prefix}.idx", f"{prefix}{META_SUFFIX}"]


def preprocess_documents(
    documents: Iterable[str],
    output_prefix: str,
    tokenizer_model: str,
    *,
    workers: int = 1,
    append_eod: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> PreprocessStats:
    """Tokenize `documents` into ``<output_prefix>.bin/.idx`` (one sequence per document).

    The end-of-document id is appended to each document unless `append_eod` is False; empty
    documents are skipped. Output order equals input order for any number of `workers`. Files
    are written under temporary names and renamed at the end, so a crash never leaves a
    half-written dataset behind.
    """
    check_output_prefix(output_prefix, overwrite)
    tok.check_tokenizer_model(tokenizer_model)
    if workers < 1:
        raise DataError(f"workers={workers}; use 1 or more")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.time()
    processor = _sentencepiece(tokenizer_model)
    vocab_size = processor.get_piece_size()
    eod = processor.eos_id() if processor.eos_id() >= 0 else None
    if append_eod and eod is None:
        raise DataError(
            f"{tokenizer_model} has no end-of-document (eos) piece; retrain it with "
            "tools/train_tokenizer.py or pass --no-append-eod"
        )
    dtype = DType.optimal_dtype(vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    n_docs = n_tokens = skipped = 0
    max_id = -1
    try:
        builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
        with _encoder_pool(tokenizer_model, workers) as encode_all:
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
        vocab_fingerprint=tok.pieces_fingerprint(
            processor.id_to_piece(i) for i in range(vocab_size)
        ),
        tokenizer_model=os.path.abspath(tokenizer_model),
        tokenizer_md5=tok.file_md5(tokenizer_model),
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


def _sentencepiece(model_path: str) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_path)


# Workers encode with sentencepiece directly: megatron's SentencePieceTokenizer.tokenize is
# exactly ``encode_as_ids`` under its default flags (legacy=False), and this keeps the ~8 s
# megatron import out of every worker. tests/unit/test_data_tools.py checks the equality.
_WORKER_PROCESSOR: Any = None


def _init_worker(model_path: str) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = _sentencepiece(model_path)


def _encode(text: str) -> numpy.ndarray | None:
    if not text.strip():
        return None
    ids = _WORKER_PROCESSOR.encode_as_ids(text)
    return numpy.asarray(ids, dtype=numpy.int32) if ids else None


def _encode_batch(texts: list[str]) -> list[numpy.ndarray | None]:
    return [_encode(text) for text in texts]


_BATCH = 64  # documents per worker task: amortises pickling without hurting streaming


@contextlib.contextmanager
def _encoder_pool(
    model_path: str, workers: int
) -> Iterator[Callable[[Iterable[str]], Iterator[numpy.ndarray | None]]]:
    """A function that encodes a document stream in order, in-process or on `workers` processes.

    Workers are spawned, not forked: this process may hold torch/gloo threads, and the one
    forkserver per process may have been started, with its own preloads, by other code. A dead
    worker raises instead of hanging, and at most a few batches per worker are in flight, so
    input of any size streams.
    """
    if workers == 1:
        _init_worker(model_path)
        yield lambda docs: map(_encode, docs)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    executor = ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), _init_worker, (model_path,)
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


# --------------------------------------------------------------------------------------------
# The cached built-in dataset


def default_cache_dir() -> str:
    """``$MOH_DATA_CACHE``, else ``$XDG_CACHE_HOME/megatron_moh``, else ``~/.cache/...``."""
    if os.environ.get("MOH_DATA_CACHE"):
        return os.environ["MOH_DATA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_moh")


def builtin_dataset_dir(cache_dir: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """Where `prepare_builtin_dataset` keeps (or will keep) this Python's corpus at `vocab_size`."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    name = f"stdlib-docs-{version}-v{BUILTIN_CORPUS_VERSION}-bpe{vocab_size}"
    return os.path.join(os.path.abspath(cache_dir or default_cache_dir()), name)


def prepare_builtin_dataset(
    cache_dir: str | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    workers: int = 1,
    progress: bool = False,
) -> tuple[str, str]:
    """Return ``(data_prefix, tokenizer_model)`` for the stdlib-docstring corpus, building once.

    The first call writes ``corpus.jsonl``, trains a `vocab_size` BPE tokenizer on it and
    tokenizes it into ``text_document.bin/.idx`` (EOD appended); later calls return the cached
    files. Safe when several processes (e.g. all torchrun ranks) call it at once: one builds
    under a file lock while the others wait, and the result is published by renaming a finished
    temporary directory, so a reader never sees a partial build.
    """
    final = builtin_dataset_dir(cache_dir, vocab_size)
    paths = (os.path.join(final, _BUILTIN_PREFIX_NAME), os.path.join(final, "tokenizer.model"))
    if _builtin_complete(final):
        return paths
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create cache directory {parent} ({err.strerror}); pass cache_dir= "
                        "or set MOH_DATA_CACHE to a writable directory") from None
    with _file_lock(f"{final}.lock"):
        if _builtin_complete(final):
            return paths
        if os.path.exists(final):
            raise DataError(f"{final} is incomplete (files were removed); delete it and retry")
        start = time.time()
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.tmp-")
        try:
            _build_builtin(tmp, final, vocab_size, workers, progress)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _builtin_complete(final):  # lost a race without the lock (e.g. NFS)
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("built %s in %.1f s", final, time.time() - start)
    return paths


def prepare_builtin_dataset_distributed(
    cache_dir: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, **kwargs: Any
) -> tuple[str, str]:
    """`prepare_builtin_dataset` for an initialised process group: rank 0 builds, then all read.

    Rank 0's error, if any, is raised on every rank instead of leaving the others at a barrier.
    Ranks on other nodes whose `cache_dir` is not shared simply build their own copy.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return prepare_builtin_dataset(cache_dir, vocab_size, **kwargs)
    message: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            prepare_builtin_dataset(cache_dir, vocab_size, **kwargs)
        except Exception as err:  # handed to every rank below, then raised everywhere
            message[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise DataError(f"rank 0 could not prepare the built-in dataset: {message[0]}")
    return prepare_builtin_dataset(cache_dir, vocab_size, **kwargs)


def _builtin_complete(directory: str) -> bool:
    prefix = os.path.join(directory, _BUILTIN_PREFIX_NAME)
    needed = [os.path.join(directory, "tokenizer.model"), *_dataset_files(prefix)]
    return all(os.path.isfile(path) for path in needed)


def _build_builtin(
    directory: str, final_directory: str, vocab_size: int, workers: int, progress: bool
) -> None:
    documents = list(builtin_corpus_text())
    with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    model = tok.train_tokenizer(documents, os.path.join(directory, "tokenizer"), vocab_size)
    prefix = os.path.join(directory, _BUILTIN_PREFIX_NAME)
    preprocess_documents(
        documents, prefix, model, workers=workers, progress=progress, total=len(documents)
    )
    # The meta file names the tokenizer; point it at where the directory is about to be renamed.
    meta = read_meta(prefix) or {}
    meta["tokenizer_model"] = os.path.join(final_directory, "tokenizer.model")
    tok.atomic_write(f"{prefix}{META_SUFFIX}", json.dumps(meta, indent=1).encode())


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock where the OS offers one; a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps builds correct
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Blends and validation


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


# --------------------------------------------------------------------------------------------
# megatron-core datasets


def build_gpt_datasets(
    blend: str | Sequence[Any],
    tokenizer: Any,
    *,
    sequence_length: int,
    num_samples: Sequence[int | None],
    split: str = "98,2,0",
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

    `num_samples` is ``(train, valid, test)`` sample counts; a weighted blend needs all three set
    for the splits it builds. Deterministic for a given `seed`. Extra keyword arguments go to
    ``GPTDatasetConfig``. Must be called on every rank when a process group exists (the builder
    builds on rank 0 first and then barriers); `is_built_on_rank` says which ranks need the
    data (default: all).
    """
    if validate:
        prefixes, weights = validate_data(blend, tokenizer, split=split)
    else:
        prefixes, weights = parse_blend(blend)
    fractions = parse_split(split)
    if len(num_samples) != 3:
        raise DataError(f"num_samples={list(num_samples)} needs three counts: (train, valid, test)")
    if weights is not None:
        unset = [name for name, n, f in zip(("train", "valid", "test"), num_samples, fractions)
                 if f > 0 and n is None]
        if unset:
            raise DataError(f"a weighted blend needs a sample count for the {unset[0]} split; "
                            "set it (e.g. from --train-iters x global batch size)")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=sequence_length,
        blend=(prefixes, weights),
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
        GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config
    )
    train, valid, test = builder.build()
    return train, valid, test
