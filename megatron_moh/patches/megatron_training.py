"""megatron.training's start-up, as the megatron-core wheel ships it."""

from __future__ import annotations

from megatron_moh.patches import replace


def install() -> None:
    """Idempotent; call before megatron.training initialises."""
    from megatron.core.datasets import utils as dataset_utils

    # The wheel ships the compiled dataset helpers but no Makefile: megatron.training would try
    # to rebuild them with `make` at start-up and fail.
    replace(dataset_utils, "compile_helpers", lambda: None, why="the wheel's helpers are already compiled",
            params=())
