"""The wording of pretrain_moh.py's refusals, checked where they are made: `preflight` and the MoH
config checks it calls. tests/integration/test_bad_input.py runs every refusal end to end (exit
code, one line, nothing written); data refusals are worded in test_data_tools.py."""

import os

import pytest

from megatron_moh import preflight
from megatron_moh.arguments import parse_megatron_args

BASE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
        "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1",
        "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]


@pytest.fixture(autouse=True)
def environment():
    """megatron's argument validation records some settings in environment variables."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def refusal(*flags: str) -> str:
    """The line `preflight.check_args` ends the run with for ``BASE`` plus ``flags``."""
    args = parse_megatron_args([*BASE, *flags])
    with pytest.raises(SystemExit) as exit_:
        preflight.check_args(args)
    return str(exit_.value.code)


def test_impossible_moh_setting_names_the_field_and_the_fix():
    assert refusal("--moh-topk", "9").startswith("pretrain_moh.py: error: moh_topk=9 must be between 0 and the 4 "
                                                 "routed heads")


@pytest.mark.parametrize("flags,asked", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "delayed"], "--fp8-format hybrid"),
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine"),
])
def test_transformer_engine_features_without_it_are_refused(flags, asked):
    message = refusal(*flags)
    assert message.startswith(f"pretrain_moh.py: error: {asked} needs NVIDIA Transformer Engine"), message
    assert "\n" not in message


def test_megatron_assertion_keeps_its_own_words():
    """megatron's batch-size assertion names both sizes and the rule they break."""
    with pytest.raises(AssertionError) as err:
        parse_megatron_args([*BASE, "--micro-batch-size", "3", "--global-batch-size", "16"])
    assert preflight.explain_assertion(err.value) == (
        "eval_global_batch_size (16) must be divisible by eval_micro_batch_size (3) * data_parallel_size (1)")
