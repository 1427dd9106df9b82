"""Train a byte-fallback BPE sentencepiece tokenizer on .txt / .jsonl files.

    megatron-moh-train-tokenizer --input corpus.jsonl --model-prefix tok/moh --vocab-size 4096

(or ``python tools/train_tokenizer.py ...``). Writes ``<model-prefix>.model`` (pass it as
--tokenizer-model) and ``<model-prefix>.vocab``. A thin CLI over
`megatron_moh.tokenizer.train_tokenizer`; inputs are read by
`megatron_moh.data.preprocess.iter_documents`.
"""

from __future__ import annotations

import argparse
import os
import time

from megatron_moh import tokenizer
from megatron_moh.commands import OneLineParser, one_line_errors
from megatron_moh.data import corpus, preprocess
from megatron_moh.outputs import removed_on_failure, unwritable_reason


def build_parser() -> argparse.ArgumentParser:
    """The command line; argument names follow Megatron-LM's tools where it has them."""
    parser = OneLineParser(
        prog="train_tokenizer.py", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE", help=".txt or .jsonl files")
    source.add_argument("--builtin-corpus", action="store_true",
                        help="train on the docstrings of Python's standard library instead")
    parser.add_argument("--model-prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=corpus.DEFAULT_VOCAB_SIZE)
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl input")
    parser.add_argument("--txt-mode", choices=preprocess.TXT_MODES, default="file",
                        help="a .txt file is one document, or one per paragraph / line")
    parser.add_argument("--errors", choices=preprocess.ERRORS, default="strict",
                        help="invalid UTF-8 in the input: refuse it (default), or replace it with U+FFFD")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-threads", type=int, default=1,
                        help="sentencepiece threads (recorded in the model file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check everything cheap first, then train; one-line error and exit code 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with one_line_errors(parser.prog):
        replaced = preprocess.check_input_files(args.input, args.json_key, args.errors) if args.input else 0
        if args.vocab_size < tokenizer.MIN_VOCAB_SIZE:
            raise tokenizer.TokenizerError(
                f"--vocab-size {args.vocab_size} is too small; byte-fallback BPE needs at least "
                f"{tokenizer.MIN_VOCAB_SIZE}"
            )
        if os.path.exists(f"{args.model_prefix}.model") and not args.overwrite:
            raise tokenizer.TokenizerError(
                f"{args.model_prefix}.model already exists; pass --overwrite to replace it"
            )
        parent = os.path.dirname(os.path.abspath(args.model_prefix))
        reason = unwritable_reason(parent)
        if reason:
            raise tokenizer.TokenizerError(f"--model-prefix {args.model_prefix}: {reason}; choose a writable "
                                           f"directory")
        start = time.time()
        documents = (
            corpus.builtin_corpus_text() if args.builtin_corpus
            else preprocess.iter_documents(args.input, args.json_key, args.txt_mode, args.errors)
        )
        with removed_on_failure(parent):
            model = tokenizer.train_tokenizer(
                documents, args.model_prefix, args.vocab_size, overwrite=args.overwrite,
                seed=args.seed, num_threads=args.num_threads,
            )
    replacements = f", {replaced} invalid UTF-8 sequences replaced with U+FFFD" if args.errors == "replace" else ""
    print(f"wrote {model} (vocab {args.vocab_size}) in {time.time() - start:.1f} s{replacements}")
    return 0
