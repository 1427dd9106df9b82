"""The README's main job: the tiny MoH model learns on the built-in corpus; bad inputs are refused
with one line before any work."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.pretrain_runner import exit_message_worker, losses, pretrain_worker
from tests.launcher import launch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moh-data"))


@pytest.mark.slow
def test_builtin_default_learns_real_text(data_cache):
    argv = ["--moh-data-cache", data_cache, "--train-iters", "60", "--lr-warmup-iters", "10",
            "--eval-iters", "0", "--log-interval", "5"]
    result = losses(launch(pretrain_worker, 1, argv, timeout=600))
    first, last = result[min(result)], result[max(result)]
    assert first > 7.5  # about ln(4096): the model starts knowing nothing
    assert last < first - 1.5, f"loss went from {first} to {last}"


def _refusal(argv):
    (message,) = launch(exit_message_worker, 1, argv, timeout=300)
    assert "\n" not in message, message
    return message


def test_missing_data_path_is_refused(tmp_path, data_cache):
    from megatron_moh.data.corpus import prepare_builtin_dataset

    _, tokenizer = prepare_builtin_dataset(cache_dir=data_cache)
    message = _refusal(["--data-path", str(tmp_path / "nothing_here"), "--tokenizer-type",
                        "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer])
    assert "nothing_here" in message and ".bin" in message


def test_vocabulary_mismatch_is_refused(tmp_path, data_cache):
    from megatron_moh.data.corpus import builtin_corpus_text, prepare_builtin_dataset
    from megatron_moh.tokenizer import train_tokenizer

    prefix, _ = prepare_builtin_dataset(cache_dir=data_cache)  # made with a 4096-piece tokenizer, so ids reach past 600
    docs = list(builtin_corpus_text())[:200]
    small = train_tokenizer(docs, str(tmp_path / "small"), vocab_size=600)
    message = _refusal(["--data-path", prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
                        "--tokenizer-model", small])
    assert "vocabulary size mismatch" in message


def test_impossible_batch_size_is_refused(data_cache):
    message = _refusal(["--moh-data-cache", data_cache, "--micro-batch-size", "3", "--global-batch-size", "16"])
    # megatron's own wording, which names both sizes and the rule they break
    assert message == ("pretrain_moh.py: error: eval_global_batch_size (16) must be divisible by "
                       "eval_micro_batch_size (3) * data_parallel_size (1)"), message


def test_impossible_moh_setting_is_refused(data_cache):
    message = _refusal(["--moh-data-cache", data_cache, "--moh-topk", "9"])
    assert "moh_topk=9" in message


def test_fp8_without_transformer_engine_is_refused(data_cache):
    message = _refusal(["--moh-data-cache", data_cache, "--fp8-format", "hybrid", "--fp8-recipe", "delayed"])
    assert "needs NVIDIA Transformer Engine" in message and "--fp8-format hybrid" in message


def test_te_spec_without_transformer_engine_is_refused(data_cache):
    message = _refusal(["--moh-data-cache", data_cache, "--transformer-impl", "transformer_engine"])
    assert "needs NVIDIA Transformer Engine" in message


def test_help_lists_megatron_and_moh_flags():
    """megatron-core 0.19.2 has a help string with a bare '%' that makes argparse's --help crash."""
    out = subprocess.run([sys.executable, str(ROOT / "pretrain_moh.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: pretrain_moh.py")
    for text in ("mixture-of-heads:", "--moh-topk MOH_TOPK", "--tensor-model-parallel-size",
                 "--moe-paged-stash-buffer-size-factor-cuda", "10%)"):
        assert text in out.stdout, text
