"""megatron.training's start-up and its behaviour when training diverges."""

from __future__ import annotations

import functools
import math
from typing import Any

from megatron_moh.patches import replace, wrap

PROG = "pretrain_moh.py"


def _no_checkpoint_without_save(should_checkpoint_and_exit: Any) -> Any:
    """megatron's result validation asks for a checkpoint before it exits on a NaN/Inf; without
    ``--save`` that save dies with a TypeError, so exit without it."""

    @functools.wraps(should_checkpoint_and_exit)
    def checkpoint_only_with_save(self) -> tuple[bool, bool, int]:
        from megatron.training import get_args

        should_checkpoint, should_exit, code = should_checkpoint_and_exit(self)
        return should_checkpoint and get_args().save is not None, should_exit, code

    return checkpoint_only_with_save


def _stop_on_divergence(train_step: Any) -> Any:
    """With ``--no-check-for-nan-in-loss-and-grad`` megatron applies updates whose gradient norm is
    NaN/Inf and trains on; stop at the first such iteration instead. The gradient norm is global
    (every rank computes the same value), so every rank stops together. The weights are no longer
    finite by then, so nothing is saved over the last good checkpoint."""

    @functools.wraps(train_step)
    def train_step_stopping_on_divergence(*args: Any, **kwargs: Any) -> Any:
        from megatron.training import get_args

        result = train_step(*args, **kwargs)
        skipped, grad_norm = result[1], result[5]
        run = get_args()
        if not run.check_for_nan_in_loss_and_grad and not skipped and grad_norm is not None \
                and not math.isfinite(grad_norm):
            raise SystemExit(
                f"{PROG}: error: training diverged at iteration {run.curr_iteration + 1}: the gradient norm is "
                f"{grad_norm} and the update was applied (--no-check-for-nan-in-loss-and-grad); nothing was saved "
                f"since: resume from the last checkpoint with a lower --lr or with --clip-grad")
        return result

    return train_step_stopping_on_divergence


def install() -> None:
    """Idempotent; `megatron_moh.patches.install_all` calls it before megatron.training initialises."""
    from megatron.core.datasets import utils as dataset_utils
    from megatron.core.rerun_state_machine import RerunStateMachine
    from megatron.training import training

    # The wheel ships the compiled dataset helpers but no Makefile: megatron.training would try
    # to rebuild them with `make` at start-up and fail.
    replace(dataset_utils, "compile_helpers", lambda: None, why="the wheel's helpers are already compiled",
            params=())
    wrap(RerunStateMachine, "should_checkpoint_and_exit", _no_checkpoint_without_save,
         why="exit cleanly on NaN/Inf when there is no --save", params=("self",))
    wrap(training, "train_step", _stop_on_divergence, why="never train on with a NaN/Inf gradient norm",
         params=("forward_step_func", "data_iterator", "model", "optimizer", "opt_param_scheduler"))
