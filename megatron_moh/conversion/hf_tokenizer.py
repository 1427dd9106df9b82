"""The tokenizer of a Hugging Face export: the run's own, whichever kind it is.

A Hugging Face tokenizer directory is exported as transformers loads it. A sentencepiece model
is written as a ``tokenizer.json`` that states its whole pipeline (BPE with byte fallback, the
dummy-prefix and space handling as normalizers, the decoder), loaded through the generic
``TokenizersBackend`` class: transformers then reads it as written on every 5.x version.
Letting transformers convert a bare ``tokenizer.model`` instead gives other ids before 5.24 (it
drops sentencepiece's leading dummy-prefix piece). The result is checked against sentencepiece
on probe texts before anything is written.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_moh.conversion import ConversionError
from megatron_moh.tokenizer import HUGGINGFACE_TYPE, check_tokenizer_model, tokenizer_type_of

# Texts on which an exported sentencepiece tokenizer must give sentencepiece's ids: runs of
# spaces at the start, middle and end, tabs and newlines, digits, accents, CJK, an emoji (bytes).
PROBES = (
    "Hello world", " leading space", "  two leading", "trailing  ", "a\tb\nc\n\n d", "   ",
    "def f(x):\n    return x  # comment", "12345 and 3.14159", "naïve café, 東京, 😀", "x",
)
_SPACE = "\u2581"  # sentencepiece's visible space


def load_export_tokenizer(path: str, padded_vocab_size: int) -> Any:
    """The transformers tokenizer to save beside an export of a model with ``padded_vocab_size``
    embedding rows: ``path`` is a sentencepiece model or a Hugging Face tokenizer directory."""
    from transformers import AutoTokenizer

    check_tokenizer_model(path)
    if tokenizer_type_of(path) == HUGGINGFACE_TYPE:
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = sentencepiece_as_hf(path)
    if len(tokenizer) > padded_vocab_size:
        raise ConversionError(f"tokenizer {path} has {len(tokenizer)} ids but the model's vocabulary has "
                              f"{padded_vocab_size} rows: it is not the model's tokenizer; pass the one it was "
                              f"trained with (--tokenizer-model)")
    return tokenizer


def sentencepiece_as_hf(model_path: str | os.PathLike) -> Any:
    """A fast tokenizer with exactly the ids of the sentencepiece BPE model at ``model_path``
    (ConversionError for models it cannot express, or whose ids it would change)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as handle:
        proto.ParseFromString(handle.read())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    unsupported = [what for what, bad in (
        ("a unigram model (only BPE converts)", trainer.model_type != trainer.BPE),
        ("a normalization rule other than identity", normalizer.name != "identity" or normalizer.precompiled_charsmap),
        ("removal of extra whitespace", normalizer.remove_extra_whitespaces),
    ) if bad]
    if unsupported:
        raise ConversionError(f"{model_path} uses {', '.join(unsupported)}, which the export does not convert: "
                              f"export with --tokenizer-model pointing at a Hugging Face tokenizer directory")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    model = models.BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token=trainer.unk_piece or None,
                       byte_fallback=trainer.byte_fallback, fuse_unk=True)
    tokenizer = Tokenizer(model)
    spaces = [normalizers.Replace(" ", _SPACE)]
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE), *spaces] if normalizer.add_dummy_prefix else spaces)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        [*steps, decoders.Strip(" ", 1, 0)] if normalizer.add_dummy_prefix else steps)
    control = proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in proto.pieces if p.type in control])

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=piece(trainer.unk_id),
                                   bos_token=piece(trainer.bos_id), eos_token=piece(trainer.eos_id),
                                   pad_token=piece(trainer.pad_id))
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    for text in PROBES:
        want, got = processor.encode(text), fast.encode(text, add_special_tokens=False)
        if want != got:
            raise ConversionError(f"{model_path}: the Hugging Face form of this sentencepiece model encodes "
                                  f"{text!r} as {got}, sentencepiece as {want}; export with --tokenizer-model "
                                  f"pointing at a Hugging Face tokenizer directory")
    return fast


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE vocabulary: every split of a piece into two pieces, ranked
    by the merged piece's id (sentencepiece's merge order), then by the parts."""
    merges = []
    for merged, rank in vocab.items():
        splits = [(merged[:i], merged[i:]) for i in range(1, len(merged))
                  if merged[:i] in vocab and merged[i:] in vocab]
        splits.sort(key=lambda parts: (vocab[parts[0]], vocab[parts[1]]))
        merges += [(rank, len(left), len(right), left, right) for left, right in splits]
    merges.sort(key=lambda merge: merge[:3])
    return [(left, right) for *_, left, right in merges]
