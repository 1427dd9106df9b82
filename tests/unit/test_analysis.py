"""megatron_moh.analysis in one process: the routing statistics of every router and gate kind
against counts from the paper's gate equations (tests/routing_reference.py), on models built
here; a dense model refused; and the run reader on a TensorBoard log written as megatron writes
it, resumed once, against values worked out by hand."""

import math

import numpy
import pytest
import torch

from megatron_moh.analysis import runs
from megatron_moh.analysis.heads import RoutingRecorder, analyze
from megatron_moh.analysis.sources import TokenSample, TokenSource, checkpoint_tokenizer, draw_tokens
from megatron_moh.data.validation import DataError
from megatron_moh.model import build_gpt_model
from tests.helpers import tiny_config
from tests.hf_support import LLAMA3_VOCAB, VARIANTS, llama3_style_tokenizer
from tests.routing_reference import assert_stats_match, reference_stats, sequence_batches

VOCAB, SEQ = 128, 32


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_statistics_equal_counts_from_the_gates(variant):
    torch.manual_seed(0)
    # a larger init than 0.02, so that routing is far from uniform and a miscount shows
    model = build_gpt_model(tiny_config(init_method_std=0.1, **VARIANTS[variant]), VOCAB, SEQ)
    tokens = numpy.random.default_rng(1).integers(0, VOCAB, 3 * SEQ + 10)  # three sequences and a short one
    sample = TokenSample(TokenSource("random", "-"), tokens, [0])
    stats = analyze(model, [sample], SEQ, micro_batch_size=2, device=torch.device("cpu"), progress=False)
    assert stats["random"].tokens == len(tokens)
    reference = reference_stats(model, sequence_batches(tokens, SEQ, 2))
    assert_stats_match(vars(stats["random"]), reference, len(tokens))
    assert not any(m._forward_hooks for m in model.modules())  # the recorder took its hooks off


def test_a_dense_model_has_nothing_to_record():
    model = build_gpt_model(tiny_config(), VOCAB, SEQ, moh=False)
    with pytest.raises(ValueError, match=r"^the model has no head router \(a dense model\)$"):
        RoutingRecorder(model)


def test_run_reader_on_a_resumed_megatron_log(tmp_path):
    """Iterations 1-6, then a resume from iteration 4 that logs 5-8 again: the later values win.
    Batch 4 samples of 16 tokens on 2 ranks; iteration-time logged every 2nd iteration."""
    from torch.utils.tensorboard import SummaryWriter

    first = {i: 10.0 - i for i in range(1, 7)}
    second = {i: 5.0 - 0.5 * i for i in range(5, 9)}
    times = {2: 0.5, 4: 0.25, 6: 1.0, 8: 0.5}
    for losses in (first, second):
        writer = SummaryWriter(str(tmp_path / "tb"))
        writer.add_text("seq_length", "16", 0)
        writer.add_text("world_size", "2", 0)
        for iteration, loss in losses.items():
            writer.add_scalar("batch-size", 4, iteration)
            writer.add_scalar("lm loss", loss, iteration)
            writer.add_scalar("lm loss vs samples", loss, 4 * iteration)
            writer.add_scalar("moh_load_balance_loss", 1 + loss / 100, iteration)
            if iteration in times:
                writer.add_scalar("iteration-time", times[iteration], iteration)
                writer.add_scalar("throughput", 2 * iteration, iteration)
        writer.add_scalar("lm loss validation vs samples", 3.5, 4 * max(losses))
        writer.close()
    run = runs.read_run(tmp_path, "resumed")
    summary = runs.summarize(run, peak_tflops=20.0)
    final = [first[i] for i in range(1, 5)] + [second[i] for i in range(5, 9)]
    assert summary["iterations"] == 8 and summary["tokens"] == 8 * 4 * 16 and summary["world_size"] == 2
    assert summary["train_loss"] == pytest.approx(sum(final) / 8)
    assert summary["val_loss"] == 3.5 and summary["val_ppl"] == pytest.approx(math.exp(3.5))
    assert summary["load_balance_loss"] == pytest.approx(sum(1 + v / 100 for v in final) / 8)
    assert summary["tokens_per_s"] == pytest.approx(numpy.median([64 / t for t in times.values()]))
    assert summary["tokens_per_s_from"] == "iteration-time"
    assert summary["tflops_per_gpu"] == pytest.approx(10.0) and summary["mfu"] == pytest.approx(0.5)
    curves = runs.curves(run)
    assert curves.train_tokens.tolist() == [64 * i for i in range(1, 9)] and curves.train_loss.tolist() == final


def test_run_reader_refuses_what_is_not_a_megatron_log(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with pytest.raises(runs.RunError) as empty:
        runs.read_run(tmp_path, "x")
    assert str(empty.value) == (f"{tmp_path} holds no TensorBoard event files: pass a run's --tensorboard-dir "
                                f"(megatron writes them when training runs with --tensorboard-dir)")
    writer = SummaryWriter(str(tmp_path / "other"))
    writer.add_scalar("loss", 1.0, 1)
    writer.close()
    with pytest.raises(runs.RunError) as other:
        runs.read_run(tmp_path, "x")
    assert str(other.value) == (f"{tmp_path / 'other'} logged no 'lm loss': not a megatron training run, "
                                f"or it stopped before its first logged iteration")


def test_run_labels(tmp_path):
    (tmp_path / "a" / "tb").mkdir(parents=True)
    (tmp_path / "b" / "tb").mkdir(parents=True)
    a, b = str(tmp_path / "a" / "tb"), str(tmp_path / "b" / "tb")
    assert runs.parse_runs([str(tmp_path / "a"), f"x={b}"]) == [("a", str(tmp_path / "a")), ("x", b)]
    assert runs.parse_runs([a, b]) == [(a, a), (b, b)]  # both are called tb: their paths label them
    with pytest.raises(runs.RunError) as twice:
        runs.parse_runs([f"x={a}", f"x={b}"])
    assert str(twice.value) == "two runs are labelled 'x'; name them NAME=RUN_DIR"


def test_text_sources_with_a_huggingface_tokenizer(tmp_path):
    """A run trained with a Hugging Face tokenizer directory: text is tokenized as preprocess_data.py does
    (megatron's tokenize, then the EOS), and a tokenizer that does not fit the vocabulary is refused."""
    import argparse
    import json

    texts = ["Return the number of items.", "Raise an error if the value is invalid.", "Join two paths."]
    directory = llama3_style_tokenizer(tmp_path / "tok", texts * 10)
    saved = argparse.Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(directory),
                               make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
                               padded_vocab_size=LLAMA3_VOCAB)
    tokenizer = checkpoint_tokenizer(saved, None, needed=True)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sample = draw_tokens(TokenSource("docs", str(source)), 10_000, tokenizer=tokenizer, vocab_size=LLAMA3_VOCAB,
                         seed=0)
    expected = [i for d in sample.documents for i in [*tokenizer.tokenize(texts[d]), tokenizer.eod]]
    assert sorted(sample.documents) == [0, 1, 2] and sample.tokens.tolist() == expected
    assert max(expected) == tokenizer.eod == 128001
    small = argparse.Namespace(**{**vars(saved), "padded_vocab_size": 1024})
    with pytest.raises(DataError, match=f"has {LLAMA3_VOCAB} pieces .* but the checkpoint's vocabulary is 1024"):
        checkpoint_tokenizer(small, None, needed=True)
