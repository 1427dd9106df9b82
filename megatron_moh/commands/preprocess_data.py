"""Tokenize .txt / .jsonl files into a megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    megatron-moh-preprocess --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-model tok/moh.model --workers 4
    megatron-moh-preprocess --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-model Meta-Llama-3-8B/ --workers 8     # a Hugging Face tokenizer directory

(or ``python tools/preprocess_data.py ...``). One sequence per document, end-of-document id
appended (--no-append-eod to skip), written with megatron-core's IndexedDatasetBuilder plus a
PREFIX.meta.json that records the tokenizer, so training can check the pairing. Pass PREFIX as
--data-path. A thin CLI over `megatron_moh.data.preprocess.preprocess_documents`.
"""

from __future__ import annotations

import argparse
import os

from megatron_moh import tokenizer
from megatron_moh.commands import OneLineParser, one_line_errors
from megatron_moh.data import preprocess
from megatron_moh.data.validation import DataError
from megatron_moh.outputs import removed_on_failure


def build_parser() -> argparse.ArgumentParser:
    """The command line; argument names follow Megatron-LM's tools/preprocess_data.py."""
    parser = OneLineParser(
        prog="preprocess_data.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help=".txt or .jsonl files, read in the order given")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx")
    parser.add_argument("--tokenizer-model", required=True,
                        help="sentencepiece .model file, or a Hugging Face tokenizer directory (tokenizer.json)")
    parser.add_argument("--tokenizer-type", default=None,
                        choices=[tokenizer.HUGGINGFACE_TYPE, *tokenizer.SENTENCEPIECE_TYPES],
                        help="megatron's name for the tokenizer's kind; default: what --tokenizer-model is")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl input")
    parser.add_argument("--txt-mode", choices=preprocess.TXT_MODES, default="file",
                        help="a .txt file is one document, or one per paragraph / line")
    parser.add_argument("--errors", choices=preprocess.ERRORS, default="strict",
                        help="invalid UTF-8 in the input: refuse it (default), or replace it with U+FFFD and "
                             "count it in the summary")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the EOD id (default: on)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.bin/.idx")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check inputs, tokenizer and output first, then tokenize; one-line error and exit 2 if bad."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with one_line_errors(parser.prog, output=os.path.dirname(os.path.abspath(args.output_prefix))):
        if args.workers < 1:
            raise DataError(f"--workers {args.workers}; use 1 or more")
        replaced = preprocess.check_input_files(args.input, args.json_key, args.errors)
        tokenizer_type = tokenizer.check_tokenizer_model(args.tokenizer_model, args.tokenizer_type)
        preprocess.check_output_prefix(args.output_prefix, args.overwrite)
        progress = not args.no_progress
        total = preprocess.count_documents(args.input, args.txt_mode) if progress else None
        with removed_on_failure(os.path.dirname(os.path.abspath(args.output_prefix))):
            stats = preprocess.preprocess_documents(
                preprocess.iter_documents(args.input, args.json_key, args.txt_mode, args.errors),
                args.output_prefix,
                args.tokenizer_model,
                tokenizer_type=tokenizer_type,
                workers=args.workers,
                append_eod=args.append_eod,
                overwrite=args.overwrite,
                progress=progress,
                total=total,
            )
    replacements = f", {replaced} invalid UTF-8 sequences replaced with U+FFFD" if args.errors == "replace" else ""
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens "
        f"(max id {stats.max_token_id} < vocab {stats.vocab_size}), {stats.skipped_empty} empty "
        f"skipped, {stats.seconds:.1f} s{replacements}"
    )
    return 0
