"""Imported once by the test forkserver so forked workers start with torch and megatron loaded."""

import torch  # noqa: F401

import megatron.core  # noqa: F401
from megatron.core import parallel_state  # noqa: F401
from megatron.core.models.gpt import GPTModel  # noqa: F401

import megatron_moh.model  # noqa: F401
