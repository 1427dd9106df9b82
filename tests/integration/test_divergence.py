"""Training never goes on silently on NaN: a run whose learning rate makes it diverge stops at the
iteration where it happens, with one line that names it and a non-zero exit code; with --save, the
last checkpoint on disk still holds finite weights (megatron's result validation saves the
iteration before the failed update; without the check nothing is written after the failure)."""

import re

import pytest
import torch

from megatron_moh import checkpoint
from megatron_moh.conversion.whole_model import load_model, single_process_group
from tests.integration.checkpoint_runner import run_worker
from tests.launcher import launch

pytestmark = pytest.mark.slow

# lr 1e4 without clipping: the gradient norm turns NaN within a few iterations (the 2nd or 3rd,
# depending on the machine's arithmetic); each test finds out which from the run's own log.
DIVERGING = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
             "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
             "--eval-iters", "0", "--log-interval", "1", "--train-iters", "8", "--lr", "1e4", "--clip-grad", "0",
             "--lr-warmup-iters", "0"]


def _last_line(result):
    return result["err"].strip().splitlines()[-1]


def _failed_iteration(result):
    """The iteration after the last one megatron logged: where training diverged."""
    logged = [int(it) for it in re.findall(r"iteration\s+(\d+)/\s*\d+ \|", result["out"])]
    assert logged, result["out"][-2000:]
    return max(logged) + 1


def _finite_checkpoint(root):
    with single_process_group():
        model, _ = load_model(root)
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_result_validation_without_save_exits_with_one_line():
    (result,) = launch(run_worker, 1, DIVERGING, timeout=600)
    assert result["code"] == 16, result["err"][-2000:]  # megatron: resume to disambiguate
    assert "TypeError" not in result["err"]
    failed = _failed_iteration(result)
    assert _last_line(result) == (f"pretrain_moh.py: error: training diverged at iteration {failed}: megatron's "
                                  "result validation found NaN or Inf (the log above says where); nothing was saved "
                                  "(no --save); lower --lr or use --clip-grad")


def test_result_validation_with_save_keeps_a_finite_checkpoint(tmp_path):
    (result,) = launch(run_worker, 1, [*DIVERGING, "--save", str(tmp_path), "--save-interval", "100"], timeout=600)
    failed = _failed_iteration(result)
    assert result["code"] == 16 and f"diverged at iteration {failed}:" in _last_line(result)
    assert f"a checkpoint of the iteration before it is in --save {tmp_path}" in _last_line(result)
    assert checkpoint.find_checkpoint(tmp_path)[0] == failed - 1
    assert _finite_checkpoint(tmp_path)


def test_unchecked_run_stops_at_the_first_nan_gradient(tmp_path):
    argv = [*DIVERGING, "--no-check-for-nan-in-loss-and-grad", "--save", str(tmp_path), "--save-interval", "1"]
    (result,) = launch(run_worker, 1, argv, timeout=600)
    failed = _failed_iteration(result)
    assert failed < 8  # it did diverge before the end
    assert result["code"] == (f"pretrain_moh.py: error: training diverged at iteration {failed}: the gradient norm "
                              "is nan and the update was applied (--no-check-for-nan-in-loss-and-grad); nothing was "
                              "saved since: resume from the last checkpoint with a lower --lr or with --clip-grad")
    assert max(iteration for iteration, _ in result["losses"]) == failed - 1  # counted from 0: nothing after it
    assert checkpoint.find_checkpoint(tmp_path)[0] == failed - 1  # the diverged iteration was never saved
    assert _finite_checkpoint(tmp_path)
