"""pretrain_moh.py under each parallel layout gives the losses of one process, iteration by
iteration, from the same weights and data (load-balance loss on, so the aux-loss path is covered).

megatron seeds each pipeline stage differently, so layouts start from one shared checkpoint
(`--load ... --finetune`), which megatron's distributed checkpointing reshards to every layout."""

import pytest

from tests.integration.pretrain_runner import SMALL_MODEL, losses, pretrain_worker
from tests.launcher import launch

pytestmark = pytest.mark.slow  # each layout trains against one process (4-10 s each on two cores)

ITERS = ["--train-iters", "6"]
REL_TOL = 5e-5  # fp32 losses, printed to 7 significant digits; reduction order differs by layout


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("init")
    launch(pretrain_worker, 1, SMALL_MODEL + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(path),
                                             "--save-interval", "1"])
    return path


def _run(checkpoint, world, *extra):
    argv = SMALL_MODEL + ITERS + ["--load", str(checkpoint), "--finetune", *extra]
    return losses(launch(pretrain_worker, world, argv, timeout=600))


@pytest.fixture(scope="module")
def one_process(initial_checkpoint):
    result = _run(initial_checkpoint, 1)
    assert sorted(result) == [1, 2, 3, 4, 5, 6]
    assert result[6] < result[1] - 0.1  # it learns
    return result


LAYOUTS = {
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
    "tp2-pp2-sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--sequence-parallel"]),
    "pp2-interleaved": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
    "tp2-sp-full-recompute": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--recompute-granularity", "full", "--recompute-method", "uniform",
                                  "--recompute-num-layers", "1"]),
    "selective-recompute": (1, ["--recompute-granularity", "selective"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout, one_process, initial_checkpoint):
    world, extra = LAYOUTS[layout]
    result = _run(initial_checkpoint, world, *extra)
    assert sorted(result) == sorted(one_process), f"{layout} logged iterations {sorted(result)}"
    for it, ref in one_process.items():
        assert result[it] == pytest.approx(ref, rel=REL_TOL), f"{layout} iteration {it}: {result[it]} vs {ref}"
