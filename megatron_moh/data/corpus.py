"""The built-in corpus: English every machine already has, ready to train on with no download.

The docstrings of Python's standard library (`builtin_corpus_text`) are turned once into a
tokenizer and an indexed dataset kept in a cache directory (`prepare_builtin_dataset`);
`use_builtin_data` points ``pretrain_moh.py`` arguments that name no data at them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

from megatron_moh import tokenizer as tok
from megatron_moh.data.preprocess import preprocess_documents
from megatron_moh.data.validation import META_SUFFIX, DataError, dataset_files, read_meta

logger = logging.getLogger(__name__)

BUILTIN_CORPUS_VERSION = 1  # bump when the corpus extraction or tokenizer settings change
DEFAULT_VOCAB_SIZE = 4096
_BUILTIN_PREFIX_NAME = "text_document"
# Directories of the stdlib whose docstrings are test scaffolding or generated boilerplate.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "encodings"}
# Any of these (megatron argument names) means the user brought data; without them the built-in
# corpus is used.
DATA_ARGS = ("data_path", "mock_data", "train_data_path", "data_args_path", "per_split_data_args_path")


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
        except Exception as err:  # noqa: BLE001 - handed to every rank below, then raised everywhere
            message[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise DataError(f"rank 0 could not prepare the built-in dataset: {message[0]}")
    return prepare_builtin_dataset(cache_dir, vocab_size, **kwargs)


def _builtin_complete(directory: str) -> bool:
    prefix = os.path.join(directory, _BUILTIN_PREFIX_NAME)
    needed = [os.path.join(directory, "tokenizer.model"), *dataset_files(prefix)]
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


def use_builtin_data(args: argparse.Namespace) -> None:
    """Point parsed ``pretrain_moh.py`` arguments at the built-in corpus (``--data-path`` and,
    unless they name one, its tokenizer) when they name no data of their own.

    Builds the corpus's tokenizer and indexed dataset on first use (``--moh-data-cache`` says
    where to cache them).
    """
    if any(getattr(args, name, None) for name in DATA_ARGS):
        return
    prefix, tokenizer_model = prepare_builtin_dataset(cache_dir=args.moh_data_cache)
    args.data_path = [prefix]
    if args.tokenizer_model is None:
        args.tokenizer_type, args.tokenizer_model = tok.MEGATRON_TOKENIZER_TYPE, tokenizer_model
