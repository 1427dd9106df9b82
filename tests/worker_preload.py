"""Imported once by the test forkserver so forked workers start with torch and megatron loaded."""

import torch

import megatron.core
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

import megatron_moh.model
