"""The first screen of a run: one line where megatron-core and torch print a page of notices.

Without Transformer Engine and Apex (every CPU machine, and GPUs without them), megatron-core warns
once per module that imports them (~16 lines before the project prints anything), and torch and
megatron add ~10 more that no flag of the run changes: no CUDA runtime, ``pin_memory`` without an
accelerator, a deprecated collective megatron calls, megatron's notes about its own APIs, and a
missing one_logger. They say that optional libraries are absent, so a run says it once, before
megatron's argument dump: "running without Transformer Engine / Apex: torch fallbacks" (on a GPU
without TE it adds that the default spec is the local one). ``--verbose`` shows every notice instead.
Only these notices are hidden: errors and every other warning print.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import warnings
from collections.abc import Sequence

VERBOSE = "--verbose"

# (message regex, category) of the notices `hide_notices` hides.
NOTICES: tuple[tuple[str, type[Warning]], ...] = (
    (r"(Transformer Engine and Apex are|Apex is) not installed", UserWarning),
    (r"Only transformer-engine>=1\.7\.0 supports MoE experts", UserWarning),
    (r"'pin_memory' argument is set as true but no accelerator is found", UserWarning),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
    (r"\s*It is recommended to use a ModelConfig", UserWarning),
    (r"MimoModelConfig is experimental", UserWarning),
)
# torch's "No CUDA runtime is found, using CUDA_HOME=..." on machines without a GPU.
CUDA_HOME_LOGGER = "torch.utils.cpp_extension"


def split_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose``, and whether it was given."""
    rest = [arg for arg in argv if arg != VERBOSE]
    return rest, len(rest) != len(argv)


def hide_notices() -> None:
    """Hide the notices above for the life of the process (idempotent). Call before megatron is
    imported: most of them are printed at import time."""
    for message, category in NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger(CUDA_HOME_LOGGER).setLevel(logging.ERROR)


def skip_absent_one_logger(args: argparse.Namespace) -> None:
    """megatron enables its one_logger by default and prints a warning when the package is not
    installed; without it there is nothing to enable."""
    if importlib.util.find_spec("one_logger") is None:
        args.enable_one_logger = False


def fallback_line(transformer_impl: str, gpu: bool) -> str | None:
    """The one line for megatron-core's Transformer Engine and Apex notices: which of them the run goes
    without (None when it has both), and on a GPU without TE that the default became the local spec."""
    from megatron.core.models.backends import HAVE_APEX

    from megatron_moh.specs import have_transformer_engine

    absent = [name for name, have in (("Transformer Engine", have_transformer_engine()), ("Apex", HAVE_APEX))
              if not have]
    if not absent:
        return None
    line = f"running without {' / '.join(absent)}: torch fallbacks"
    if gpu and transformer_impl == "local" and "Transformer Engine" in absent:
        line += " (on this GPU too: --transformer-impl local)"
    return line
