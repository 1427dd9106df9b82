"""MoH attention with MoE MLPs trained by pretrain_moh.py: expert parallelism (with the all-to-all
dispatcher and the distributed optimizer, with the all-gather dispatcher beside TP with sequence
parallelism, and beside PP) gives one process's log, iteration by iteration, from the same weights
and data: the LM loss, the grad norm, and both aux losses (MoH's head load balance and megatron's
expert load balance). Each aux loss is in every log line and in TensorBoard exactly once, as a
per-iteration mean over micro-batches and layers, so one process accumulating 2 micro-batches,
2 data-parallel ranks with 1 each, and pipeline stages holding half the layers all log the same
values. (tests/dist/test_expert_parallel.py compares every parameter's gradient.)"""

import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.pretrain_runner import SMALL_MODEL, pretrain_worker
from tests.launcher import launch

pytestmark = pytest.mark.slow  # expert-parallel layouts train against one process (4-10 s each on two cores)

# 4 experts, top-2, a shared expert, and a dense MLP on layer 2 (layers 0, 1, 3 are MoE).
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-ffn-hidden-size", "64",
       "--moe-shared-expert-intermediate-size", "64", "--moe-layer-freq", "[1,1,0,1]"]
ITERS = 4
AUX_LOSSES = ("moh_load_balance_loss", "load_balancing_loss")
REL_TOL = 5e-5  # fp32, printed to 7 significant digits; reductions differ by layout
GRAD_NORM_ABS = 1.5e-3  # printed to 3 decimals
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
FIELD = re.compile(r"\| ([a-z_ ]+): ([0-9.E+-]+)(?= \|)")


def _log(outputs: list[str]) -> dict[int, dict[str, float]]:
    """Iteration -> logged values, from whichever rank logged them; a name twice in one line fails."""
    found = {}
    for text in outputs:
        for it, rest in LINE.findall(text):
            fields = FIELD.findall("|" + rest)
            names = [name for name, _ in fields]
            assert len(names) == len(set(names)), f"a value is reported twice in: {rest}"
            found[int(it)] = {name: float(value) for name, value in fields}
    return found


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory):
    # megatron seeds experts per expert-parallel rank (and layers per stage): every layout loads these.
    path = tmp_path_factory.mktemp("moe-init")
    launch(pretrain_worker, 1, SMALL_MODEL + MOE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(path),
                                                   "--save-interval", "1"])
    return path


def _run(checkpoint, world, *extra):
    argv = SMALL_MODEL + MOE + ["--train-iters", str(ITERS), "--load", str(checkpoint), "--finetune", *extra]
    return _log(launch(pretrain_worker, world, argv, timeout=600))


@pytest.fixture(scope="module")
def one_process(initial_checkpoint):
    """One rank, 2 micro-batches accumulated per iteration."""
    result = _run(initial_checkpoint, 1)
    assert sorted(result) == list(range(1, ITERS + 1))
    for values in result.values():
        assert {"lm loss", "grad norm", *AUX_LOSSES} <= set(values)
        # Balanced routing gives k (top-2 of 4 routed heads) and 1 (megatron's normalisation).
        assert 2 <= values["moh_load_balance_loss"] < 2.2 and 1 <= values["load_balancing_loss"] < 1.2
    return result


LAYOUTS = {
    "ep2-alltoall-distributed-optimizer": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                                               "alltoall", "--use-distributed-optimizer"]),
    "tp2-ep2-sp": (4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel"]),
    "pp2-ep2": (4, ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}


def _assert_same_log(result, reference, layout):
    assert sorted(result) == sorted(reference), f"{layout} logged iterations {sorted(result)}"
    for it, ref in reference.items():
        for name in ("lm loss", *AUX_LOSSES):
            assert result[it][name] == pytest.approx(ref[name], rel=REL_TOL), \
                f"{layout} iteration {it} {name}: {result[it][name]} vs {ref[name]}"
        assert result[it]["grad norm"] == pytest.approx(ref["grad norm"], abs=GRAD_NORM_ABS), \
            f"{layout} iteration {it} grad norm: {result[it]['grad norm']} vs {ref['grad norm']}"


@pytest.mark.parametrize("layout", ["ep2-alltoall-distributed-optimizer", "tp2-ep2-sp"])
def test_expert_parallel_layout_matches_one_process(layout, one_process, initial_checkpoint):
    world, extra = LAYOUTS[layout]
    _assert_same_log(_run(initial_checkpoint, world, *extra), one_process, layout)


def test_pipeline_with_experts_logs_both_aux_losses_once(one_process, initial_checkpoint, tmp_path):
    """PP=2 x EP=2: each stage holds half the MoE layers; the logged means and TensorBoard's
    scalars (one per iteration each) equal one process's."""
    world, extra = LAYOUTS["pp2-ep2"]
    result = _run(initial_checkpoint, world, *extra, "--tensorboard-dir", str(tmp_path))
    _assert_same_log(result, one_process, "pp2-ep2")
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    for name in AUX_LOSSES:
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == list(range(1, ITERS + 1)), f"{name} steps {[s.step for s in scalars]}"
        for scalar in scalars:
            assert scalar.value == pytest.approx(one_process[scalar.step][name], rel=REL_TOL), name


def test_hf_export_of_an_moe_checkpoint_is_refused_in_one_line(initial_checkpoint, tmp_path):
    """The Hugging Face model has Llama's dense MLP: the export refuses before writing anything."""
    from megatron_moh.commands.convert_checkpoint import main
    from tests.helpers import assert_one_line_refusal

    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as refusal:
        main(["export-hf", "--load", str(initial_checkpoint), "--out", str(out)])
    message = assert_one_line_refusal(str(refusal.value.code), "convert_checkpoint.py")
    assert "MoE MLP layers (--num-experts 4)" in message and "does not support yet" in message, message
    assert not out.exists()
