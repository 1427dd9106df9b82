"""tools/analyze_heads.py and tools/compare_runs.py on runs that pretrain_moh.py trains here (an MoH
model and its dense baseline, a few iterations on real text): the head statistics equal counts made
from the routers' inputs with the paper's gate equations, for exactly the tokens the tool says it
drew; differently routed data gives different maps; the figures have their sizes; the run table
holds the values megatron logged; bad input is refused with one line before any work."""

import contextlib
import io
import itertools
import json
import math
import os
import re

import numpy
import pytest

from megatron_moh.analysis import plots
from megatron_moh.commands import analyze_heads, compare_runs
from megatron_moh.conversion.whole_model import load_model, single_process_group
from tests.helpers import assert_one_line_refusal
from tests.integration.checkpoint_runner import run_worker
from tests.launcher import launch
from tests.routing_reference import assert_stats_match, reference_stats, sequence_batches

pytestmark = pytest.mark.slow  # a training run to analyse (~25 s on two cores)

VOCAB, SEQ, TOKENS = 512, 64, 1500  # 1500: 23 full sequences and a short one
TRAIN = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", str(SEQ),
         "--max-position-embeddings", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
         "--train-iters", "6", "--lr", "3e-3", "--lr-warmup-iters", "1", "--init-method-std", "0.1",
         "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--split", "90,10,0",
         "--save-interval", "6", "--log-timers-to-tensorboard"]


def run_tool(main, argv):
    """A tool's main() in this process: (exit message or None, stdout); environment put back."""
    env, out = dict(os.environ), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main([str(a) for a in argv])
    except SystemExit as exit_:
        return str(exit_.code), out.getvalue()
    finally:
        os.environ.clear()
        os.environ.update(env)
    return None, out.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and an indexed dataset from 600 docstrings of the standard library; a second
    tokenizer and a dataset made with it; code as JSON lines; a text of one word repeated."""
    from megatron_moh import tokenizer as tok
    from megatron_moh.data.corpus import _stdlib_sources, builtin_corpus_text
    from megatron_moh.data.preprocess import preprocess_documents

    root = tmp_path_factory.mktemp("corpus")
    docs = list(itertools.islice(builtin_corpus_text(), 600))
    model = tok.train_tokenizer(docs, str(root / "tok"), VOCAB)
    other = tok.train_tokenizer(docs[:300], str(root / "other"), 400)
    preprocess_documents(docs, str(root / "prose"), model)
    preprocess_documents(docs[:50], str(root / "prose_other"), other)
    code = [open(p, encoding="utf-8").read() for p in _stdlib_sources() if "/json/" in p]
    (root / "code.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in code))
    (root / "repeated.txt").write_text("the " * 2000)
    (root / "empty.txt").write_text("")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """pretrain_moh.py runs of the MoH model (at TP=2, which the tool loads whole) and its dense
    baseline: checkpoint, TensorBoard, the stdout of the rank that logs."""
    data = ["--data-path", corpus / "prose", "--tokenizer-model", corpus / "tok.model"]
    results = {}
    layouts = (("moh", ["--tensor-model-parallel-size", "2"], 2), ("dense", ["--moh-dense-baseline"], 1))
    for name, flags, ranks in layouts:
        root = tmp_path_factory.mktemp(name)
        argv = [str(a) for a in [*TRAIN, *flags, *data, "--save", root / "ckpt", "--tensorboard-dir", root / "tb"]]
        *_, last = launch(run_worker, ranks, argv, timeout=600)
        assert last["code"] is None, last["out"][-2000:]
        results[name] = dict(ckpt=root / "ckpt", tb=root / "tb", out=last["out"], world_size=ranks)
    return results


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, corpus, trained):
    """tools/analyze_heads.py on the MoH checkpoint: an indexed dataset, JSON lines, plain text."""
    out = tmp_path_factory.mktemp("heads")
    message, stdout = run_tool(analyze_heads.main, [
        "--load", trained["moh"]["ckpt"], "--data", f"prose={corpus / 'prose'}", f"code={corpus / 'code.jsonl'}",
        f"repeated={corpus / 'repeated.txt'}", "--tokens", TOKENS, "--out", out, "--no-progress"])
    assert message is None, message
    return dict(out=out, report=json.loads((out / "heads.json").read_text()), stdout=stdout)


def drawn_tokens(report, name, corpus):
    """The tokens the report says were drawn, rebuilt independently of the tool: documents in the
    order of numpy's seeded permutation, each tokenized by sentencepiece with </s> appended."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = report["datasets"][name]
    if name == "prose":
        dataset = IndexedDataset(str(corpus / "prose"))
        documents = [numpy.array(dataset[i]) for i in range(len(dataset))]  # copies: the memory map closes
    else:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(corpus / "tok.model"))
        path = corpus / ("code.jsonl" if name == "code" else "repeated.txt")
        texts = ([json.loads(line)["text"] for line in path.read_text().splitlines()] if name == "code"
                 else [path.read_text()])
        documents = [processor.encode(t) + [processor.eos_id()] for t in texts]
    order = numpy.random.default_rng(report["checkpoint"]["seed"]).permutation(len(documents)).tolist()
    count = next(n for n in range(1, len(order) + 1) if sum(len(documents[i]) for i in order[:n]) >= TOKENS)
    assert data["documents"] == order[:count]
    return numpy.concatenate([documents[i] for i in order[:count]])[:TOKENS].astype(numpy.int64)


def test_statistics_equal_counts_from_the_gates(analysed, trained, corpus):
    report = analysed["report"]
    assert report["model"] == dict(num_layers=2, num_attention_heads=8, num_shared_heads=4, num_routed_heads=4,
                                   topk=2, router="learned", gate="weighted", two_stage=True)
    assert report["checkpoint"]["iteration"] == 6
    with single_process_group():
        model, _ = load_model(trained["moh"]["ckpt"])
        for name, data in report["datasets"].items():
            assert data["tokens"] == TOKENS
            batches = sequence_batches(drawn_tokens(report, name, corpus), SEQ, 8)
            assert_stats_match(data, reference_stats(model, batches), TOKENS)


def test_differently_routed_data_gives_different_maps(analysed):
    """One word repeated reaches the first router as one vector, so its routing collapses onto
    two heads; prose spreads over all four."""
    report = analysed["report"]
    prose, repeated = (numpy.array(report["datasets"][n]["head_load"]) for n in ("prose", "repeated"))
    assert numpy.abs(repeated - prose).max() > 0.3
    assert sorted(repeated[0]) == pytest.approx([0, 0, 1, 1], abs=0.05) and prose[0].min() > 0.05
    numpy.testing.assert_allclose(report["head_load_difference"]["repeated - prose"], repeated - prose, atol=1e-12)


def test_figures_and_table(analysed):
    out, report = analysed["out"], analysed["report"]
    names = ["prose", "code", "repeated"]
    expected = {f"{kind}_{n}.png": plots.HEATMAP_INCHES for n in names for kind in ("head_load", "mean_gate")}
    expected.update({f"head_load_{n}_minus_prose.png": plots.HEATMAP_INCHES for n in names[1:]})
    expected.update({"entropy.png": plots.LINES_INCHES, "overlap.png": plots.LINES_INCHES})
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    from PIL import Image

    for name, inches in expected.items():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == plots.pixels(inches), name
    rows = [line.split() for line in analysed["stdout"].splitlines()
            if re.match(r"^ *\d* +(prose|code|repeated) ", line)]
    assert len(rows) == 2 * len(names)
    for i, row in enumerate(rows):
        layer, name = i // len(names), row[-7]
        data = report["datasets"][name]
        assert [float(v) for v in row[-6:-2]] == [round(v, 2) for v in data["head_load"][layer]]
        assert float(row[-2]) == round(data["entropy_mean"][layer], 3)


def logged(out, pattern):
    """Values of one field of megatron's stdout log."""
    return [float(v) for v in re.findall(pattern, out)]


def test_compare_runs_reads_the_runs(trained, tmp_path):
    message, stdout = run_tool(compare_runs.main, [f"moh={trained['moh']['tb']}", trained["dense"]["tb"].parent,
                                                   "--out", tmp_path])
    assert message is None, message
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [row["run"] for row in rows] == ["moh", trained["dense"]["tb"].parent.name]
    for row, name in zip(rows, ("moh", "dense")):
        out = trained[name]["out"]
        losses = logged(out, r"\| lm loss: ([0-9.E+-]+) \|")  # each iteration's own (--log-interval 1)
        validation = logged(out, r"validation loss at iteration \d+.*?lm loss value: ([0-9.E+-]+)")
        assert (row["iterations"], row["tokens"], row["world_size"]) == (6, 6 * 8 * SEQ, trained[name]["world_size"])
        assert row["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        assert row["val_loss"] == pytest.approx(validation[-1], rel=1e-5)
        assert row["val_ppl"] == pytest.approx(math.exp(validation[-1]), rel=1e-4)
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_from"] == "iteration-time" and row["mfu"] is None
        balance = logged(out, r"moh_load_balance_loss: ([0-9.E+-]+) \|")
        if name == "moh":
            assert row["load_balance_loss"] == pytest.approx(sum(balance) / len(balance), rel=1e-5)
        else:
            assert balance == [] and row["load_balance_loss"] is None
    table = [line.split(" | ") for line in stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, separator, two runs
    for cells, row in zip(table[2:], rows):
        assert cells[1:4] == [f"{row['tokens']:,}", f"{row['train_loss']:.4f}", f"{row['val_loss']:.4f}"]
    from PIL import Image

    with Image.open(tmp_path / "compare_runs.png") as image:
        assert image.size == plots.pixels(plots.RUNS_INCHES)


def refusal(main, prog, argv, out):
    message, _ = run_tool(main, argv)
    assert not out.exists()  # refused before any work
    return assert_one_line_refusal(message, prog)


def test_analyze_heads_refuses_bad_input_before_work(trained, corpus, tmp_path):
    prog, out = analyze_heads.PROG, tmp_path / "out"
    prose, ckpt = f"prose={corpus / 'prose'}", trained["moh"]["ckpt"]
    cases = {
        "missing checkpoint": (["--load", tmp_path / "nothing", "--data", prose],
                               f"{tmp_path / 'nothing'} does not exist: pass a directory that a run saved to with "
                               f"--save"),
        "dense checkpoint": (["--load", trained["dense"]["ckpt"], "--data", prose],
                             f"{trained['dense']['ckpt']} holds a dense model (--moh-dense-baseline or no MoH "
                             f"arguments): it has no head router to analyse"),
        "empty data": (["--load", ckpt, "--data", f"empty={corpus / 'empty.txt'}"],
                       f"--data empty={corpus / 'empty.txt'} holds no tokens: every document is empty"),
        "another tokenizer": (["--load", ckpt, "--data", prose, "--tokenizer-model", corpus / "other.model"],
                              None),
        "data of another tokenizer": (["--load", ckpt, "--data", f"other={corpus / 'prose_other'}"],
                                      f"--data other={corpus / 'prose_other'}: {corpus / 'prose_other'} was tokenized "
                                      f"with a different tokenizer"),
        "bad name": (["--load", ckpt, "--data", f"a/b={corpus / 'prose'}"],
                     "--data name 'a/b' must be letters, digits, '_', '.' or '-' (it names output files)"),
    }
    for case, (argv, expected) in cases.items():
        message = refusal(analyze_heads.main, prog, [*argv, "--out", out], out)
        if case == "another tokenizer":
            assert re.fullmatch(
                rf"{prog}: error: tokenizer {re.escape(str(corpus / 'other.model'))} \(vocabulary \w+\) is not the "
                rf"checkpoint's {re.escape(str(corpus / 'tok.model'))} \(vocabulary \w+\): its ids mean other "
                rf"pieces; drop --tokenizer-model", message), message
        elif case == "data of another tokenizer":
            assert message.startswith(f"{prog}: error: {expected} (vocabulary "), message
        else:
            assert message == f"{prog}: error: {expected}", case


def test_compare_runs_refuses_a_directory_without_a_log(tmp_path):
    out = tmp_path / "out"
    message = refusal(compare_runs.main, compare_runs.PROG, [tmp_path / "none", "--out", out], out)
    assert message == (f"{compare_runs.PROG}: error: {tmp_path / 'none'} is not a directory: pass a run's "
                       f"--tensorboard-dir (or a directory above it)")
