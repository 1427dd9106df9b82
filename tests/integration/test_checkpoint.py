"""Checkpoints through pretrain_moh.py and megatron.training: a resumed run continues exactly (plain
and distributed optimizer, with dropout, after --exit-interval, a preemption signal or the time
limit), a save killed with SIGKILL leaves the previous checkpoint loadable, checkpoints reshard to
other TP/PP layouts, and a --load that cannot work is refused with one line before training.

Losses are compared per micro-batch as floats (checkpoint_runner records them), not from megatron's
log line, which is rounded and, on the first logged iteration after a (re)start, averaged with the
next one."""

import argparse
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_moh import checkpoint
from tests.helpers import assert_one_line_refusal
from tests.integration.checkpoint_runner import (
    FIRST_SAVE_MOMENTS,
    kill_during_save,
    run_worker,
    sigterm_in_first_save_worker,
)
from tests.integration.jobs import survivors
from tests.integration.pretrain_runner import SMALL_MODEL, exit_message_worker
from tests.launcher import launch

pytestmark = pytest.mark.slow  # trains several small runs (a minute or more on two cores)

# Dropout on, so the RNG states must come back too; GQA on, as in Llama.
MODEL = SMALL_MODEL + ["--group-query-attention", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
ITERS, SAVE_AT = 6, 3
DIST_OPT = ["--use-distributed-optimizer"]
REL_TOL = 5e-5  # other layouts sum in another order (as in test_pretrain_parallel)
VALIDATION = re.compile(r"validation loss at (iteration \d+(?: on \w+ set)?) \| lm loss value: ([0-9.E+-]+)")


def _run(world, *argv, **kwargs):
    return launch(run_worker, world, [*MODEL, "--train-iters", str(ITERS), *argv], timeout=600, **kwargs)


def _losses(results):
    """Every rank's recorded (iteration, loss) pairs, in order."""
    return [pair for result in results for pair in result["losses"]]


def _interrupted_then_resumed(root, world, *extra):
    """Train until --exit-interval stops the run at SAVE_AT, saving there; then resume to ITERS."""
    first = _run(world, "--save", str(root), "--save-interval", str(SAVE_AT), "--exit-interval", str(SAVE_AT), *extra)
    resumed = _run(world, "--load", str(root), "--save", str(root), "--save-interval", "100", *extra)
    return first, resumed


@pytest.fixture(scope="module")
def uninterrupted():
    return _run(1)


@pytest.fixture(scope="module")
def plain_resume(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return root, *_interrupted_then_resumed(root, 1)


@pytest.fixture(scope="module")
def distributed_resume(tmp_path_factory):
    root = tmp_path_factory.mktemp("distopt")
    full = _run(2, *DIST_OPT)
    return root, full, *_interrupted_then_resumed(root, 2, *DIST_OPT)


LOGGED = re.compile(r"iteration\s+(\d+)/.*?\| (moh_load_balance_loss: \S+) \| (lm loss: \S+)")


def _logged(results):
    """Iteration -> the log line's load-balance and lm loss, from whichever rank logs them."""
    return {int(it): values for result in results for it, *values in LOGGED.findall(result["out"])}


def _assert_continues_exactly(full, first, resumed):
    for rank, (everything, one, two) in enumerate(zip(full, first, resumed)):
        before, after = one["losses"], two["losses"]
        assert {it for it, _ in before} == set(range(SAVE_AT)), rank
        assert {it for it, _ in after} == set(range(SAVE_AT, ITERS)), rank
        assert before + after == everything["losses"], rank  # every micro-batch's loss, bit for bit
    # ... and so is every logged value (megatron once logged the first resumed iteration twice)
    logged = _logged(full)
    assert sorted(logged) == list(range(1, ITERS + 1))
    assert {**_logged(first), **_logged(resumed)} == logged


def test_plain_resume_equals_uninterrupted(plain_resume, uninterrupted):
    root, first, resumed = plain_resume
    assert first[0]["code"] == 0  # --exit-interval exits cleanly after saving
    assert re.search(rf"successfully saved checkpoint from iteration\s+{SAVE_AT} ", first[0]["out"])
    assert {it for it, _ in _losses(first)} == set(range(SAVE_AT))
    out = resumed[0]["out"]
    assert f"loading distributed checkpoint from {root} at iteration {SAVE_AT}" in out
    # consumed samples and the iteration count continue where they stopped
    assert re.search(rf"iteration\s+{SAVE_AT + 1}/\s*{ITERS} \| consumed samples:\s+{(SAVE_AT + 1) * 8} ", out)
    _assert_continues_exactly(uninterrupted, first, resumed)


def test_checkpoint_holds_the_router_weights(plain_resume):
    from torch.distributed.checkpoint import FileSystemReader

    root = plain_resume[0]
    keys = FileSystemReader(str(root / f"iter_{SAVE_AT:07d}")).read_metadata().state_dict_metadata
    assert "decoder.layers.self_attention.router.weight" in keys
    assert any(k.startswith("optimizer.state.exp_avg.decoder.layers.self_attention.router") for k in keys)


def test_distributed_optimizer_resume_equals_uninterrupted(distributed_resume):
    root, full, first, resumed = distributed_resume
    assert all(result["code"] == 0 for result in first)
    state = checkpoint.read_common_state(root / f"iter_{SAVE_AT:07d}")
    assert state["content_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"  # megatron's default
    _assert_continues_exactly(full, first, resumed)


@pytest.mark.parametrize("stop", [dict(signal_at=1), dict(overtime_at=1)], ids=["sigterm", "time-limit"])
def test_preemption_and_time_limit_save_then_resume_exactly(stop, tmp_path, uninterrupted):
    """--exit-signal-handler (SLURM's SIGTERM) and --exit-duration-in-mins save at the end of the
    iteration in which they fire, exit 0, and the run resumes exactly from there."""
    flag = ["--exit-signal-handler"] if "signal_at" in stop else ["--exit-duration-in-mins", "1"]
    first = _run(1, "--save", str(tmp_path), "--save-interval", "100", *flag, **stop)
    assert first[0]["code"] == 0
    assert (tmp_path / checkpoint.TRACKER).read_text().strip() == "2"  # stopped during iteration 2 (0-based 1)
    resumed = _run(1, "--load", str(tmp_path))
    before, after = _losses(first), _losses(resumed)
    assert before + after == _losses(uninterrupted)


@pytest.mark.parametrize("moment", FIRST_SAVE_MOMENTS)
def test_sigterm_during_the_first_save_keeps_it_and_resumes_exactly(moment, tmp_path, uninterrupted):
    """SIGTERM to every process of the run (as SLURM sends it and torchrun forwards it) during the
    process's first save: that save completes, megatron saves the next iteration and exits, and the
    resumed run continues exactly. The writer's helper once started in that save and died of it."""
    root = tmp_path / "ckpt"
    argv = [*MODEL, "--train-iters", str(ITERS), "--save", str(root), "--save-interval", "2", "--exit-signal-handler"]
    first = launch(sigterm_in_first_save_worker, 1, argv, moment, timeout=600)[0]
    assert first["signalled"] and first["code"] in (None, 0), first["err"][-3000:]
    assert "exiting program after receiving SIGTERM" in first["out"]
    assert checkpoint.verify_checkpoint(root / "iter_0000002") > 0  # the first save: complete and whole
    assert checkpoint.find_checkpoint(root) == (3, root / "iter_0000003")
    resumed = _run(1, "--load", str(root))
    assert _losses([first]) + _losses(resumed) == _losses(uninterrupted)


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, uninterrupted):
    marker = tmp_path / "writing"
    root = tmp_path / "ckpt"
    argv = [*MODEL, "--train-iters", str(ITERS), "--save", str(root), "--save-interval", "2"]
    code, helpers = kill_during_save(argv, stall_iteration=4, marker=str(marker))
    assert code == -9
    # The checkpoint writer's helper (a ~1 GB spawned manager) dies with the rank, orphaned by nobody.
    assert helpers, "the rank had started no helper process"
    assert survivors(helpers, timeout=10) == []
    # The save of iteration 4 had written data but not its metadata; the tracker still says 2.
    partial = root / "iter_0000004"
    assert any(partial.glob("*.distcp")) and not (partial / ".metadata").exists()
    assert (root / checkpoint.TRACKER).read_text().strip() == "2"
    assert checkpoint.find_checkpoint(root) == (2, root / "iter_0000002")
    # Resuming (same --save) loads iteration 2, trains exactly as if never killed, and rewrites 4.
    resumed = _run(1, "--load", str(root), "--save", str(root), "--save-interval", "2")
    assert f"loading distributed checkpoint from {root} at iteration 2" in resumed[0]["out"]
    assert _losses(resumed) == [pair for pair in _losses(uninterrupted) if pair[0] >= 2]
    assert checkpoint.find_checkpoint(root) == (ITERS, root / f"iter_{ITERS:07d}")
    assert (partial / ".metadata").exists()


def test_one_run_per_save_directory(tmp_path):
    """Two runs on one --save would interleave their checkpoints: the second is refused in one line
    naming the first (host, pid of its rank 0); once the first is killed with SIGKILL, its lock is
    gone with it and a run resumes there."""
    import signal
    import socket

    from tests.integration.jobs import LOADED, SAVED, Job

    root = tmp_path / "ckpt"
    argv = [*MODEL, "--train-iters", "1000", "--save", str(root), "--save-interval", "2"]
    first = Job(1, argv, tmp_path / "first.log")
    try:
        first.wait_for(r"successfully saved checkpoint from iteration\s+2 ", timeout=300)
        rank0 = next(p for p in first.tree() if "pretrain_moh.py" in " ".join(p.cmdline()) and p != first.launcher)
        message = _refusal("--save", str(root), "--save-interval", "2")
        assert message.startswith(f"pretrain_moh.py: error: --save {root} is in use by a run on host "
                                  f"{socket.gethostname()} (pid {rank0.pid}, since ")
        first.signal_every_process(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.stop()
    saved = int(SAVED.findall(first.text())[-1])
    resumed = launch(run_worker, 1, [*argv, "--load", str(root), "--exit-interval", str(saved + 1)], timeout=600)[0]
    assert resumed["code"] in (None, 0), resumed["err"][-3000:]
    assert LOADED.findall(resumed["out"]) == [str(saved)]


# --------------------------------------------------------------------------------------------
# Resharding: saved at TP=2 x PP=2, loaded at TP=1 x PP=1 and TP=1 x PP=4

# Without dropout: the layouts draw their dropout masks differently.
RESHARD = ["--train-iters", "8", "--eval-iters", "2", "--eval-interval", "4", "--hidden-dropout", "0",
           "--attention-dropout", "0"]
TP2PP2 = (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
LAYOUTS = {"tp1-pp1": (1, []), "tp1-pp4": (4, ["--pipeline-model-parallel-size", "4"])}
FULLY_RESHARDABLE = [*DIST_OPT, "--dist-ckpt-optim-fully-reshardable"]


def _reshard_run(layout, *argv):
    world, flags = layout
    return launch(run_worker, world, [*MODEL, *RESHARD, *flags, *argv], timeout=600)


def _validation(results):
    """'iteration N' (during training) or 'iteration N on validation/test set' (at the end) -> loss."""
    found = {where: float(value) for result in results for where, value in VALIDATION.findall(result["out"])}
    assert found, "no validation loss was logged"
    return found


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    """Uninterrupted TP=2 x PP=2 runs to 8 (plain and distributed optimizer with reshardable
    optimizer state) that also save at 4; each iteration-4 checkpoint is copied out to load."""
    full, saved = {}, {}
    for name, optimizer in (("plain", []), ("fully-reshardable", FULLY_RESHARDABLE)):
        root = tmp_path_factory.mktemp(f"tp2pp2-{name}")
        full[name] = _reshard_run(TP2PP2, "--save", str(root / "run"), "--save-interval", "4", *optimizer)
        shutil.copytree(root / "run" / "iter_0000004", root / "at4" / "iter_0000004")
        (root / "at4" / checkpoint.TRACKER).write_text("4")
        saved[name] = root / "at4"
    return full, saved


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resharded_checkpoint_gives_the_same_evaluation_loss(layout, tp2pp2):
    full, saved = tp2pp2
    evaluated = _validation(_reshard_run(LAYOUTS[layout], "--load", str(saved["plain"]), "--skip-train"))
    # the same validation batches as the TP=2 x PP=2 run evaluated at iteration 4, to print precision
    assert evaluated["iteration 4 on validation set"] == _validation(full["plain"])["iteration 4"]


@pytest.mark.parametrize("layout,optimizer", [("tp1-pp1", "plain"), ("tp1-pp4", "fully-reshardable")])
def test_resharded_optimizer_state_continues_training(layout, optimizer, tp2pp2):
    full, saved = tp2pp2
    flags = FULLY_RESHARDABLE if optimizer == "fully-reshardable" else []
    resumed = _reshard_run(LAYOUTS[layout], "--load", str(saved[optimizer]), *flags)
    # The last rank holds the last pipeline stage in both layouts; micro-batches come in the same order.
    expected = [pair for pair in full[optimizer][-1]["losses"] if pair[0] >= 4]
    got = resumed[-1]["losses"]
    assert [it for it, _ in got] == [it for it, _ in expected] == [4, 4, 5, 5, 6, 6, 7, 7]
    for (it, value), (_, ref) in zip(got, expected):
        assert value == pytest.approx(ref, rel=REL_TOL), f"iteration {it}"
    expected_validation = {k: v for k, v in _validation(full[optimizer]).items() if not k.startswith("iteration 4")}
    assert _validation(resumed) == pytest.approx(expected_validation, rel=1e-5)


# --------------------------------------------------------------------------------------------
# A --load that cannot work: one line, before training


def _refusal(*argv, world=1):
    message, *others = launch(exit_message_worker, world, [*MODEL, "--train-iters", str(ITERS), *argv], timeout=300)
    assert all(other == message for other in others)  # every rank refuses alike
    return assert_one_line_refusal(message, "pretrain_moh.py")


def test_missing_checkpoint_is_refused(tmp_path):
    message = _refusal("--load", str(tmp_path / "nowhere"))
    assert "nowhere does not exist" in message
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint" in _refusal("--load", str(tmp_path / "empty"))


def test_empty_load_dir_is_fine_when_it_is_also_the_save_dir(tmp_path):
    """The first launch of an auto-resuming job (--load and --save the same) starts from scratch;
    the same empty directory as --load alone would silently start from random weights: refused."""
    assert checkpoint.check_load(argparse.Namespace(load=str(tmp_path), save=str(tmp_path / "."))) is None
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.check_load(argparse.Namespace(load=str(tmp_path), save=str(tmp_path / "other")))
    assert list(tmp_path.iterdir()) == []  # the check wrote nothing


@pytest.mark.parametrize("flags,expected", [
    (["--hidden-size", "128"], "hidden_size=64 in the checkpoint but 128 here"),
    (["--vocab-size", "1000"], "padded_vocab_size=512 in the checkpoint but 1024 here"),
    (["--moh-router", "query_norm"], "moh_router='learned' in the checkpoint but 'query_norm' here"),
    (DIST_OPT, "saved without --use-distributed-optimizer"),
], ids=["shape", "vocabulary", "moh-layout", "optimizer-kind"])
def test_mismatched_checkpoint_is_refused(flags, expected, plain_resume):
    assert expected in _refusal("--load", str(plain_resume[0]), *flags)


def test_distributed_optimizer_state_that_cannot_reshard_is_refused(distributed_resume):
    message = _refusal("--load", str(distributed_resume[0]), *DIST_OPT, "--tensor-model-parallel-size", "2", world=2)
    assert "dp_reshardable" in message and "--no-load-optim" in message and "TP=1 PP=1" in message


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,expected", [
    ("tracker", "not an iteration"),
    ("metadata", "incomplete (no .metadata)"),
    ("truncated", "truncated or deleted"),
    ("deleted", "iter_0000005 is missing"),
])
def test_partial_checkpoint_is_refused(damage, expected, plain_resume, tmp_path):
    root = _copy(plain_resume[0], tmp_path / "ckpt")
    latest = root / f"iter_{ITERS:07d}"
    if damage == "tracker":
        (root / checkpoint.TRACKER).write_text("")
    elif damage == "metadata":
        (latest / ".metadata").unlink()
    elif damage == "truncated":
        data = next(latest.glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:1000])
    else:
        (root / checkpoint.TRACKER).write_text("5")
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(expected)):
        checkpoint.find_checkpoint(root)
    if damage == "metadata":  # and through pretrain_moh.py, in one line
        assert expected in _refusal("--load", str(root))


# --------------------------------------------------------------------------------------------
# Loading never runs code stored in a checkpoint


class _Payload:
    """Unpickling this touches a file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def tampered(tmp_path, plain_resume):
    """A copy of a real checkpoint whose common state (the run's args, read first of all) now
    holds a payload, and the marker the payload would create."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    marker = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live...
    assert marker.exists()
    marker.unlink()  # ...so its absence below means it never ran
    root = tmp_path / "ckpt"
    (root / "iter_0000001").mkdir(parents=True)
    args = checkpoint.read_checkpoint_args(plain_resume[0])
    dist_checkpointing.save({"args": args, "payload": _Payload(marker),
                             "w": ShardedTensor.from_rank_offsets("w", torch.ones(2))}, str(root / "iter_0000001"))
    (root / checkpoint.TRACKER).write_text("1")
    assert not marker.exists()
    return root, marker


def test_tampered_common_state_is_refused_without_running_it(tampered):
    root, marker = tampered
    message = _refusal("--load", str(root))
    assert "weights-only loading refuses" in message and "tampered" in message
    assert not marker.exists()
    # megatron's own reader is the patched one as well
    from megatron.core import dist_checkpointing

    with pytest.raises(BaseException, match="Weights only load failed"):
        dist_checkpointing.load_common_state_dict(str(root / "iter_0000001"))
    assert not marker.exists()


def test_tampered_metadata_is_refused_without_running_it(tampered):
    root, marker = tampered
    (root / "iter_0000001" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load it"):
        checkpoint.find_checkpoint(root)
    assert not marker.exists()
