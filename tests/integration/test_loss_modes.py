"""--calculate-per-token-loss weighs the MoH load-balance loss as the default mode does.

Mock data has no masked tokens, so every micro-batch holds the same number of tokens and megatron's
per-token mean equals its mean of micro-batch means: the two modes must train identically. That
is only true if the load-balance gradient is scaled alike in both (megatron divides every gradient
by the global token count in per-token mode instead of scaling aux losses by 1 / micro-batches)."""

import pytest

from tests.integration.checkpoint_runner import run_worker
from tests.integration.pretrain_runner import SMALL_MODEL
from tests.launcher import launch

pytestmark = pytest.mark.slow


def _losses(*extra):
    (result,) = launch(run_worker, 1, [*SMALL_MODEL, "--train-iters", "4", *extra], timeout=600)
    return [loss for _, loss in result["losses"]]


def test_per_token_loss_keeps_the_load_balance_weight():
    default = _losses("--moh-load-balance-coeff", "1.0")
    per_token = _losses("--moh-load-balance-coeff", "1.0", "--calculate-per-token-loss")
    without = _losses("--moh-load-balance-coeff", "0")
    assert len(default) == 8  # 4 iterations x 2 micro-batches
    gap = max(abs(a - b) / abs(b) for a, b in zip(default, without))
    assert gap > 1e-4, gap  # the load-balance term moves training measurably ...
    assert per_token == pytest.approx(default, rel=1e-5)  # ... and equally in both modes (10x below the gap)
