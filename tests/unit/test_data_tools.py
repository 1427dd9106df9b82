"""Tokenizer, preprocessing, blends and fail-fast checks of the data side (one process, CPU).

Tokenizers here are tiny (vocab 400-500, trained on a few hundred stdlib docstrings in well under
a second) so the whole file runs in seconds after the one megatron import.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy
import pytest
import torch

from megatron_moh import tokenizer as tk
from megatron_moh.commands import preprocess_data, train_tokenizer
from megatron_moh.data import corpus, datasets, preprocess, validation
from tests.hf_support import LLAMA3_BOS, LLAMA3_EOS, LLAMA3_VOCAB, llama3_style_tokenizer

REPO = Path(__file__).resolve().parents[2]
ROUND_TRIP_TEXTS = [
    "Return the number of items in a container.",
    "Two  spaces, a\ttab,\n    an indented line\n\nand a blank one.",
    " leading and trailing spaces  ",
    "naïve café, 東京, emoji 😀 and digits 12345",
    "",
]


@pytest.fixture(scope="module")
def small_docs() -> list[str]:
    return list(itertools.islice(corpus.builtin_corpus_text(), 400))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def model_400(small_docs, tok_dir) -> str:
    return tk.train_tokenizer(small_docs, str(tok_dir / "v400"), 400)


@pytest.fixture(scope="module")
def tokenizer_400(model_400):
    return tk.load_tokenizer(model_400)


@pytest.fixture(scope="module")
def jsonl_input(tmp_path_factory, small_docs) -> tuple[Path, list[str]]:
    docs = small_docs[:60] + ["", "   "] + small_docs[60:80]  # two empty documents to skip
    path = tmp_path_factory.mktemp("inp") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path, [d for d in docs if d.strip()]


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, repr(message)
    return message


def _fresh_python(*args: str) -> str:
    """stdout of ``python *args`` run from the repository root in a new interpreter with another
    hash seed: nothing is shared with this process."""
    env = {**os.environ, "PYTHONHASHSEED": "4321",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _in_fresh_process(function: str, *argv: str) -> str:
    """The last line printed by ``function(*argv)`` of this module, called in a fresh process."""
    code = (f"import sys; from tests.unit.test_data_tools import {function}; "
            f"print({function}(*sys.argv[1:]))")
    return _fresh_python("-c", code, *argv).strip().splitlines()[-1]


def corpus_digest() -> str:
    """sha256 of the whole built-in corpus, document boundaries included."""
    return _documents_digest(corpus.builtin_corpus_text())


def _documents_digest(documents) -> str:
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode("utf-8") + b"\0")
    return digest.hexdigest()


BLEND_KWARGS = dict(sequence_length=16, num_samples=(1000, 20, 0), split="98,2,0", seed=7)


def blend_digest(a: str, b: str, model: str, cache: str) -> str:
    """sha256 of the train split that `test_blend_respects_weights` draws from `a` and `b`."""
    train, _, _ = datasets.build_gpt_datasets(
        ["0.7", a, "0.3", b], tk.load_tokenizer(model), path_to_cache=cache, **BLEND_KWARGS)
    return _samples_digest(train)


def _samples_digest(dataset) -> str:
    """sha256 of every sample's source dataset and token ids, in order."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        sample = dataset[i]
        digest.update(int(sample["dataset_id"]).to_bytes(4, "little"))
        digest.update(sample["tokens"].numpy().astype(numpy.int64).tobytes())
    return digest.hexdigest()


# --- built-in corpus -------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_corpus_is_real_english_and_deterministic():
    docs = list(corpus.builtin_corpus_text())
    text = "\n".join(docs)
    assert len(text.encode("utf-8")) > 500_000
    assert len(docs) > 1000
    assert text.count(" the ") > 5000
    assert any("JSON" in d and "Serialize" in d for d in docs)  # json.dumps's docstring
    assert corpus._stdlib_sources() == corpus._stdlib_sources()
    assert list(itertools.islice(corpus.builtin_corpus_text(), 50)) == docs[:50]
    # Same corpus from a fresh interpreter with another hash seed (set order, caches, walk order).
    assert _in_fresh_process("corpus_digest") == _documents_digest(docs)


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_has_megatron_attributes(tokenizer_400, model_400):
    tok = tokenizer_400
    assert tok.vocab_size == 400
    assert (tok.eod, tok.bos, tok.pad) == (tk.EOS_ID, tk.BOS_ID, tk.PAD_ID)
    assert tok.unique_identifiers["tokenizer_path"] == model_400
    assert "class" in tok.unique_identifiers
    for text in ROUND_TRIP_TEXTS:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert len(tok.tokenize("the the the")) < len("the the the")  # real merges were learnt


def test_tokenizer_training_is_deterministic(small_docs, model_400, tmp_path):
    again = tk.train_tokenizer(small_docs, str(tmp_path / "again"), 400)
    assert Path(again).read_bytes() == Path(model_400).read_bytes()
    assert (tmp_path / "again.vocab").read_text().splitlines()[2].startswith(tk.EOD_PIECE)


def test_tokenizer_training_errors_are_one_line(small_docs, model_400, tmp_path):
    with pytest.raises(tk.TokenizerError, match="too small"):
        tk.train_tokenizer(small_docs, str(tmp_path / "tiny"), 100)
    with pytest.raises(tk.TokenizerError, match="too large") as err:
        tk.train_tokenizer(["just a few words"] * 3, str(tmp_path / "big"), 5000)
    _one_line(err.value)
    with pytest.raises(tk.TokenizerError, match="already exists"):
        tk.train_tokenizer(small_docs, model_400[: -len(".model")], 400)
    with pytest.raises(tk.TokenizerError, match="not found") as err:
        tk.load_tokenizer(str(tmp_path / "nope.model"))
    _one_line(err.value)


# --- preprocessing ----------------------------------------------------------------------------


def test_preprocess_cli_writes_exact_tokens_with_eod(
    jsonl_input, model_400, tokenizer_400, tmp_path
):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path, docs = jsonl_input
    prefix = tmp_path / "out" / "docs"

    def argv(out, *extra):
        return ["--input", str(path), "--output-prefix", str(out), "--tokenizer-model", model_400,
                "--no-progress", *extra]

    assert preprocess_data.main(argv(prefix, "--workers", "2")) == 0

    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == len(docs)  # the two empty documents were skipped
    for i, doc in enumerate(docs):
        expected = tokenizer_400.tokenize(doc) + [tokenizer_400.eod]  # megatron's own tokenize
        assert dataset[i].tolist() == expected
    assert dataset[0].dtype == numpy.uint16
    meta = validation.read_meta(str(prefix))
    assert meta["documents"] == len(docs) and meta["skipped_empty"] == 2
    assert meta["vocab_fingerprint"] == tk.vocab_fingerprint(tokenizer_400)
    highest = max(int(dataset[i].max()) for i in range(len(docs)))
    assert validation.max_token_id(str(prefix)) == highest

    # Same bytes with one worker, and without EOD the documents just lose their last id.
    one = tmp_path / "one"
    assert preprocess_data.main(argv(one, "--workers", "1")) == 0
    assert Path(f"{one}.bin").read_bytes() == Path(f"{prefix}.bin").read_bytes()
    bare = tmp_path / "bare"
    assert preprocess_data.main(argv(bare, "--no-append-eod")) == 0
    bare_dataset = IndexedDataset(str(bare))  # keep it alive: items are views of its mmap
    assert bare_dataset[3].tolist() == dataset[3].tolist()[:-1]


def test_text_inputs_split_into_documents(tmp_path, model_400):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n\n\nthird\n")
    assert list(preprocess.iter_documents([str(txt)])) == [txt.read_text()]
    assert list(preprocess.iter_documents([str(txt)], txt_mode="paragraph")) == [
        "first paragraph\nstill first", "second paragraph", "third"]
    assert len(list(preprocess.iter_documents([str(txt)], txt_mode="line"))) == 4
    assert preprocess.count_documents([str(txt)], "paragraph") == 3
    stats = preprocess.preprocess_documents(
        preprocess.iter_documents([str(txt)], txt_mode="paragraph"), str(tmp_path / "t"), model_400)
    assert stats.documents == 3


def _exit_code(main, argv):
    """A command's exit status as the shell sees it (returned, or raised with SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code

def test_preprocess_cli_rejects_bad_input_before_work(jsonl_input, model_400, tmp_path, capsys):
    path, _ = jsonl_input
    out = str(tmp_path / "existing")

    def argv(inp=str(path), prefix=str(tmp_path / "new"), model=model_400):
        return ["--input", inp, "--output-prefix", prefix, "--tokenizer-model", model,
                "--no-progress"]

    assert preprocess_data.main(argv(prefix=out)) == 0
    before = Path(f"{out}.bin").read_bytes()
    capsys.readouterr()

    bad_key = tmp_path / "bad.jsonl"
    bad_key.write_text(json.dumps({"content": "x"}) + "\n")
    cases = {
        "already exists": argv(prefix=out),  # never overwrite without --overwrite
        "does not exist": argv(inp=str(tmp_path / "missing.jsonl")),
        "--json-key": argv(inp=str(bad_key)),
        "unknown type": argv(inp=model_400),
        "tokenizer model": argv(model=str(tmp_path / "nope.model")),
        "without it": argv(prefix=f"{out}.bin"),
    }
    for needle, args in cases.items():
        assert _exit_code(preprocess_data.main, args) == 2, needle
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert Path(f"{out}.bin").read_bytes() == before
    assert not list(tmp_path.glob("new*")) and not list(tmp_path.glob("*.tmp-*"))
    assert preprocess_data.main(argv(prefix=out) + ["--overwrite"]) == 0


# --- Hugging Face tokenizer directories -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, small_docs) -> str:
    """A Llama-3-style tokenizer.json directory (ids up to 128,255; BOS 128000, EOS 128001)."""
    return str(llama3_style_tokenizer(tmp_path_factory.mktemp("hf-tok"), small_docs))


def test_huggingface_tokenizer_is_the_one_training_builds(hf_tok, small_docs):
    """`load_tokenizer(dir)` is what pretrain_moh.py builds for --tokenizer-type HuggingFaceTokenizer, and the
    preprocessing workers' direct use of the library gives its ids."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_moh.arguments import parse_megatron_args

    ours = tk.load_tokenizer(hf_tok)
    args = parse_megatron_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tok],
                               validate=False)
    args.rank, args.tensor_model_parallel_size = 0, 1
    training = build_tokenizer(args)
    assert (ours.vocab_size, ours.eod, ours.bos) == (training.vocab_size, training.eod, training.bos) == (
        LLAMA3_VOCAB, LLAMA3_EOS, LLAMA3_BOS)
    assert tk.vocab_fingerprint(ours) == tk.vocab_fingerprint(training)
    texts = [*small_docs[:20], *ROUND_TRIP_TEXTS[:-1], "an end <|end_of_text|> inside"]
    preprocess._init_worker((tk.HUGGINGFACE_TYPE, hf_tok))
    direct = preprocess._encode_batch(texts)
    for text, ids in zip(texts, direct):
        assert ours.tokenize(text) == training.tokenize(text) == ids.tolist()
        assert ids[0] == LLAMA3_BOS  # Llama-3's post-processor starts every document
    assert ours.tokenize("an end <|end_of_text|> inside").count(LLAMA3_EOS) == 1  # special token text is one id


@pytest.mark.slow
def test_preprocess_with_a_huggingface_tokenizer(hf_tok, jsonl_input, model_400, small_docs, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path, docs = jsonl_input
    prefix = tmp_path / "hf" / "docs"
    argv = ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer-model", hf_tok, "--no-progress"]
    assert preprocess_data.main([*argv, "--workers", "2"]) == 0
    tokenizer = tk.load_tokenizer(hf_tok)
    dataset = IndexedDataset(str(prefix))
    assert dataset[0].dtype == numpy.int32  # megatron's choice for 128,256 ids; uint16 would wrap 128000
    for i, doc in enumerate(docs):
        assert dataset[i].tolist() == [*tokenizer.tokenize(doc), LLAMA3_EOS]
    meta = validation.read_meta(str(prefix))
    assert (meta["tokenizer_type"], meta["eod"], meta["max_token_id"]) == ("HuggingFaceTokenizer", LLAMA3_EOS,
                                                                           LLAMA3_EOS)
    one = tmp_path / "one"
    assert preprocess_data.main([*argv[:3], str(one), *argv[4:], "--workers", "1"]) == 0
    assert Path(f"{one}.bin").read_bytes() == Path(f"{prefix}.bin").read_bytes()
    validation.validate_data([str(prefix)], tokenizer)
    other = llama3_style_tokenizer(tmp_path / "other-tok", small_docs, merges=300)
    with pytest.raises(validation.DataError, match="was tokenized with a different tokenizer"):
        validation.validate_data([str(prefix)], tk.load_tokenizer(str(other)))
    with pytest.raises(validation.DataError, match="holds token id 128001 but the tokenizer/model vocabulary"):
        validation.validate_data([str(prefix)], tk.load_tokenizer(model_400))


def test_long_documents_through_a_huggingface_tokenizer(hf_tok, model_400):
    """Documents longer than the piece limit encode in pieces cut before words with the whole document's ids
    (byte-level BPE, Llama-3's template); a tokenizer for which pieces would change the ids is refused."""
    import inspect

    from transformers import AutoTokenizer

    from megatron_moh.conversion.hf_tokenizer import sentencepiece_as_hf

    text = inspect.getsource(inspect)  # ~130,000 characters of code and prose
    llama3 = AutoTokenizer.from_pretrained(hf_tok)
    pieces, short = tk.encode_hf_in_pieces(llama3, [text, "a short one"], limit=3000)
    assert pieces.tolist() == llama3(text).input_ids and pieces[0] == LLAMA3_BOS
    assert short.tolist() == llama3("a short one").input_ids
    spm_style = sentencepiece_as_hf(model_400)  # sentencepiece's dummy prefix: a cut would add a space
    assert tk.encode_hf_in_pieces(spm_style, [text[:2000]], limit=3000)[0].tolist() == spm_style(text[:2000]).input_ids
    with pytest.raises(tk.TokenizerError, match="longer than 3,000, and this tokenizer cannot encode it in pieces"):
        tk.encode_hf_in_pieces(spm_style, [text], limit=3000)


def test_huggingface_tokenizer_refusals_are_one_line(hf_tok, jsonl_input, model_400, tmp_path, capsys):
    path, _ = jsonl_input
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text("{}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")

    def argv(model, *extra):
        return ["--input", str(path), "--output-prefix", str(tmp_path / "out" / "x"), "--tokenizer-model",
                str(model), "--no-progress", *extra]

    cases = {
        f"{neither} is a directory holding neither tokenizer.json nor a sentencepiece .model": argv(neither),
        f"{broken} does not load as a Hugging Face tokenizer": argv(broken),
        f"{hf_tok} is a Hugging Face tokenizer directory but --tokenizer-type is GPTSentencePieceTokenizer: pass "
        "--tokenizer-type HuggingFaceTokenizer": argv(hf_tok, "--tokenizer-type", "GPTSentencePieceTokenizer"),
        f"{model_400} is a sentencepiece model file but --tokenizer-type is HuggingFaceTokenizer":
            argv(model_400, "--tokenizer-type", "HuggingFaceTokenizer"),
    }
    for needle, args in cases.items():
        assert _exit_code(preprocess_data.main, args) == 2, needle
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_cli(jsonl_input, tmp_path, capsys):
    path, _ = jsonl_input
    prefix = str(tmp_path / "cli")
    argv = ["--input", str(path), "--model-prefix", prefix, "--vocab-size", "450"]
    assert train_tokenizer.main(argv) == 0
    assert tk.load_tokenizer(f"{prefix}.model").vocab_size == 450
    capsys.readouterr()
    assert _exit_code(train_tokenizer.main, argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert _exit_code(train_tokenizer.main, argv[:-1] + ["100", "--overwrite"]) == 2
    assert "too small" in capsys.readouterr().err


# --- text that must not change silently ---------------------------------------------------

FILLER = ("All work and no play makes Jack a dull boy.\n" * 3000).encode()  # 132 KB of valid text


@pytest.fixture
def invalid_utf8(tmp_path) -> dict[str, tuple[Path, int, int]]:
    """Files with invalid UTF-8 past the first 64 KB -> (file, line, byte offset) of the first."""
    txt = tmp_path / "late.txt"
    txt.write_bytes(FILLER + b"caf\xe9 au lait\n" + FILLER + b"\xff\xfe end\n")
    lines = [json.dumps({"text": f"document {i}"}).encode() for i in range(1500)]
    lines[999] = b'{"text": "bad \xc3\x28 here"}'
    jsonl = tmp_path / "late.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    return {"txt": (txt, 3001, len(FILLER) + 3),
            "jsonl": (jsonl, 1000, len(b"\n".join(lines[:999])) + 1 + len(b'{"text": "bad '))}


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_invalid_utf8_anywhere_is_refused_naming_file_line_and_byte(kind, invalid_utf8, model_400, tmp_path,
                                                                    capsys):
    path, line, offset = invalid_utf8[kind]
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "out" / "x"), "--tokenizer-model", model_400]
    assert _exit_code(preprocess_data.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"preprocess_data.py: error: input {path}:{line} is not UTF-8 text (byte {offset} ")
    assert "--errors replace" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert _exit_code(train_tokenizer.main, ["--input", str(path), "--model-prefix", str(tmp_path / "t")]) == 2
    assert f"{path}:{line} is not UTF-8 text" in capsys.readouterr().err
    assert not list(tmp_path.glob("t.*"))


def test_errors_replace_stores_u_fffd_and_counts_it(invalid_utf8, model_400, tokenizer_400, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = invalid_utf8["txt"][0]
    prefix = tmp_path / "replaced"
    argv = ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer-model", model_400, "--no-progress",
            "--errors", "replace"]
    assert preprocess_data.main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(", 3 invalid UTF-8 sequences replaced with U+FFFD")
    dataset = IndexedDataset(str(prefix))
    expected = path.read_bytes().decode("utf-8", errors="replace")
    assert expected.count("\ufffd") == 3
    assert tokenizer_400.detokenize(dataset[0].tolist()[:-1]) == expected


def test_long_texts_encode_in_pieces_to_the_same_ids(model_400, small_docs, monkeypatch):
    """sentencepiece needs ~50 bytes per character of what it encodes at once: a long document goes
    through it in pieces, cut at spaces, with the ids of the whole."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model_400)
    text = "\n\n".join(small_docs)
    whole = processor.encode_as_ids(text)
    longest = []
    encode = spm.SentencePieceProcessor.encode_as_ids
    monkeypatch.setattr(spm.SentencePieceProcessor, "encode_as_ids",
                        lambda self, piece: longest.append(len(piece)) or encode(self, piece))
    assert tk.encode_in_pieces(processor, text, limit=300).tolist() == whole
    assert len(longest) > len(text) / 300 and max(longest) <= 300
    # Without a space to cut at, the text still decodes to itself.
    blob = "x" * 1000 + "\u00e9\u6771" * 700 + " tail"
    assert processor.decode(tk.encode_in_pieces(processor, blob, limit=256).tolist()) == blob
    # preprocessing encodes through it
    monkeypatch.setattr(tk, "ENCODE_PIECE_CHARS", 300)
    preprocess._init_worker((tk.MEGATRON_TOKENIZER_TYPE, model_400))
    longest.clear()
    assert preprocess._encode_batch([text])[0].tolist() == whole and max(longest) <= 300


def test_lines_over_sentencepiece_limit_are_trained_on(small_docs, tmp_path, monkeypatch):
    """sentencepiece skips lines over 16,384 bytes without a word: they go to it in pieces cut at
    spaces, from which it learns the words it would learn from the whole line."""
    long_line = " ".join(f"Zebrafish{i % 7} quokka{i % 5} axolotl" for i in range(1000))  # 31 KB
    assert len(long_line.encode()) > 16384
    docs = small_docs[:100]

    def pieces(name, documents, vocab_size=400):
        model = tk.train_tokenizer(documents, str(tmp_path / name), vocab_size)
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=model)
        return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]

    without = pieces("without", docs)
    split = pieces("split", [*docs, long_line])
    assert split != without and "▁quokka" in dict(split)
    monkeypatch.setattr(tk, "_MAX_LINE_BYTES", 1 << 20)  # sentencepiece takes the line whole
    assert pieces("whole", [*docs, long_line]) == split
    monkeypatch.undo()
    # Only long lines: trained on (sentencepiece alone stopped with `!sentences_.empty()`).
    assert "▁quokka" in dict(pieces("only-long", [long_line, "x" * 20000], vocab_size=340))


# --- blends and validation ------------------------------------------------------------------


def _write_ids(prefix: Path, low: int, high: int, n_docs: int, eod: int) -> str:
    """An indexed dataset whose documents use only ids in [low, high), each ending in `eod`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(low)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for _ in range(n_docs):
        doc = numpy.append(rng.integers(low, high, size=int(rng.integers(5, 40))), eod)
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.slow
def test_blend_respects_weights(tmp_path, tokenizer_400, model_400):
    """0.7/0.3 blend of two sources with disjoint ids: 1,000 samples, drawn shares within 0.01.

    megatron's blending index is greedy and exact to within one sample, so 0.01 is generous.
    Each sample's tokens are also checked to come from the source its dataset_id names.
    """
    eod = tokenizer_400.eod
    a = _write_ids(tmp_path / "a", 10, 100, 300, eod)
    b = _write_ids(tmp_path / "b", 100, 200, 300, eod)
    train, valid, test = datasets.build_gpt_datasets(
        ["0.7", a, "0.3", b], tokenizer_400, path_to_cache=str(tmp_path / "cache"), **BLEND_KWARGS)
    assert test is None and len(valid) >= 20
    counts = [0, 0]
    for i in range(len(train)):
        sample = train[i]
        source = int(sample["dataset_id"])
        counts[source] += 1
        text_ids = sample["tokens"][sample["tokens"] != eod]
        low, high = ((10, 100), (100, 200))[source]
        assert bool(((text_ids >= low) & (text_ids < high)).all())
    assert len(train) >= 1000
    assert abs(counts[0] / sum(counts) - 0.7) < 0.01, counts

    again, _, _ = datasets.build_gpt_datasets(["0.7", a, "0.3", b], tokenizer_400, **BLEND_KWARGS)
    for i in (0, 17, 999):  # deterministic: same samples without the cache, too
        assert torch.equal(again[i]["tokens"], train[i]["tokens"])

    # Deterministic across processes: a fresh interpreter with its own, empty index cache
    # rebuilds the blending and shuffle indices and draws the very same samples.
    fresh = _in_fresh_process("blend_digest", a, b, model_400, str(tmp_path / "fresh-cache"))
    assert fresh == _samples_digest(train)


def test_blend_per_split_and_mock_data(tmp_path, tokenizer_400):
    """The training path's other two sources: one blend per split (--train-data-path etc.), each
    split drawing only from its own dataset, and --mock-data."""
    eod = tokenizer_400.eod
    a = _write_ids(tmp_path / "a", 10, 100, 100, eod)
    b = _write_ids(tmp_path / "b", 100, 200, 100, eod)
    train, valid, test = datasets.build_gpt_datasets(
        None, tokenizer_400, blend_per_split=[[a], ["1", b], None], split=None,
        sequence_length=16, num_samples=(40, 10, 0), path_to_cache=str(tmp_path / "cache"))
    assert test is None and len(train) >= 40 and len(valid) >= 10
    for dataset, (low, high) in ((train, (10, 100)), (valid, (100, 200))):
        tokens = torch.cat([dataset[i]["tokens"] for i in range(len(dataset))])
        text_ids = tokens[tokens != eod]
        assert bool(((text_ids >= low) & (text_ids < high)).all())

    with pytest.raises(validation.DataError, match="sample count for the valid split"):
        datasets.build_gpt_datasets(None, tokenizer_400, blend_per_split=[[a], ["1", b], None],
                                    split=None, sequence_length=16, num_samples=(40, None, 0))

    mock, _, _ = datasets.build_gpt_datasets(
        None, tokenizer_400, mock=True, sequence_length=16, num_samples=(30, 5, 5),
        path_to_cache=str(tmp_path / "mock-cache"))
    assert type(mock).__name__ == "MockGPTDataset" and len(mock) >= 30
    assert mock[0]["tokens"].shape == (16,)


def test_console_scripts_and_tool_wrappers_run_the_commands():
    """setup.py installs the commands as console scripts, and tools/*.py (the README's commands)
    run the same main() without any sys.path edits."""
    setup_py = (REPO / "setup.py").read_text()
    scripts = dict(re.findall(r'"([\w-]+) = ([\w.]+:\w+)"', setup_py))
    assert scripts["megatron-moh-preprocess"] == "megatron_moh.commands.preprocess_data:main"
    assert scripts["megatron-moh-train-tokenizer"] == "megatron_moh.commands.train_tokenizer:main"
    assert scripts["megatron-moh-convert"] == "megatron_moh.commands.convert_checkpoint:main"
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    for tool in ("preprocess_data", "train_tokenizer", "convert_checkpoint"):
        assert "sys.path" not in (REPO / "tools" / f"{tool}.py").read_text()
        assert _fresh_python(f"tools/{tool}.py", "--help").startswith(f"usage: {tool}.py")


def test_validation_errors_are_one_line(jsonl_input, tmp_path, tokenizer_400, small_docs):
    path, _ = jsonl_input
    good = str(tmp_path / "good")
    model_500 = tk.train_tokenizer(small_docs, str(tmp_path / "v500"), 500)
    preprocess.preprocess_documents(preprocess.iter_documents([str(path)]), good, model_500)
    tokenizer_500 = tk.load_tokenizer(model_500)
    assert validation.validate_data(["0.7", good], tokenizer_500) == ([good], [0.7])

    cases = [
        (dict(blend=[str(tmp_path / "missing")]), "no dataset at"),
        (dict(blend=[good], tokenizer=tokenizer_400), "vocabulary size mismatch"),
        (dict(blend=[good], vocab_size=100), "vocabulary size mismatch"),
        (dict(blend=["0.7", good, "-0.3", good + "2"]), "negative"),
        (dict(blend=["0", good]), "weight 0"),
        (dict(blend=["nan", good]), "not finite"),
        (dict(blend=["0.7", good, good]), "WEIGHT PREFIX pairs"),
        (dict(blend=["1", good, "1", good]), "appears twice"),
        (dict(blend=[good], split="98,2,x"), "split"),
        (dict(blend=[]), "empty"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(validation.DataError, match=needle) as err:
            validation.validate_data(**kwargs)
        _one_line(err.value)

    # Without the meta file the .bin is scanned and the same mismatch is caught.
    os.unlink(good + validation.META_SUFFIX)
    with pytest.raises(validation.DataError, match="vocabulary size mismatch"):
        validation.validate_data([good], tokenizer_400)

    # Same vocabulary size, different tokenizer: caught through the meta file's fingerprint.
    other = tk.train_tokenizer(small_docs[200:], str(tmp_path / "other"), 500)
    preprocess.preprocess_documents(
        preprocess.iter_documents([str(path)]), good, other, overwrite=True)
    with pytest.raises(validation.DataError, match="different tokenizer"):
        validation.validate_data([good], tokenizer_500)

    with pytest.raises(validation.DataError, match="sample count"):
        datasets.build_gpt_datasets(["1", good, "1", good + "_"], tokenizer_500, validate=False,
                                sequence_length=8, num_samples=(10, None, None))


# --- the cached built-in dataset ---------------------------------------------------------------


def test_prepare_builtin_dataset_builds_once_and_races_safely(tmp_path):
    results, errors = [], []

    def prepare():
        try:
            results.append(corpus.prepare_builtin_dataset(str(tmp_path), vocab_size=512))
        except Exception as err:  # noqa: BLE001 - surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results[0] == results[1]
    prefix, model = results[0]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(prefix).parent.name]
    again = corpus.prepare_builtin_dataset_distributed(str(tmp_path), vocab_size=512)
    assert again == (prefix, model)

    tokenizer = tk.load_tokenizer(model)
    validation.validate_data([prefix], tokenizer, split="98,2,0")
    meta = validation.read_meta(prefix)
    assert meta["tokenizer_model"] == model and meta["tokens"] > 100_000
    train, valid, _ = datasets.build_gpt_datasets(
        [prefix], tokenizer, sequence_length=64, num_samples=(50, 5, 0))
    tokens = torch.cat([train[i]["tokens"] for i in range(50)])
    assert (tokens == tokenizer.eod).any() and int(tokens.max()) < 512
