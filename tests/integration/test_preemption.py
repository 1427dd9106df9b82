"""Preemption as a scheduler does it: SIGTERM to every process of a 2-rank torchrun job (ranks,
torchrun, and the helper process megatron's checkpoint writer starts), not to the trainer alone.
The save megatron starts on that signal must complete, the job must leave no process behind, and
resuming must continue exactly where it stopped: every micro-batch's loss equal, as a float, to an
uninterrupted run's."""

import signal

import pytest

from megatron_moh import checkpoint
from tests.integration.jobs import EXIT_MESSAGE, LOADED, SAVED, Job, exact_losses, losses, survivors
from tests.integration.pretrain_runner import SMALL_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ITERS, SAVE_INTERVAL, SIGNAL_AFTER, REFERENCE_TO, RESUMED_FOR = 40, 3, 5, 16, 3


def _argv(root, *extra):
    return [*SMALL_MODEL, "--train-iters", str(ITERS), "--save", str(root), "--load", str(root),
            "--save-interval", str(SAVE_INTERVAL), "--exit-signal-handler", *extra]


@pytest.fixture
def job(tmp_path):
    """Start jobs with ``job(argv, name)``; each is stopped at teardown, whatever happened."""
    started = []

    def start(argv, name):
        started.append(Job(2, argv, tmp_path / f"{name}.log", entry="tests/integration/recording_entry.py"))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def test_sigterm_to_every_process_saves_the_reached_iteration_and_resumes_exactly(tmp_path, job):
    root = tmp_path / "ckpt"
    first = job(_argv(root), "preempted")
    # After the periodic save at 3 the writer's helper process exists; a signal now reaches it too.
    first.wait_for(rf"iteration\s+{SIGNAL_AFTER}/", timeout=300)
    tree = first.signal_every_process(signal.SIGTERM)
    assert len(tree) >= 5, [p.pid for p in tree]  # torchrun, 2 ranks, a writer helper per rank
    first.wait(timeout=120)
    text = first.text()
    assert EXIT_MESSAGE in text and "BrokenPipeError" not in text, text[-3000:]
    assert survivors(tree, timeout=10) == []
    reached = max(losses(text))
    assert SIGNAL_AFTER < reached <= REFERENCE_TO - RESUMED_FOR, reached
    assert int(SAVED.findall(text)[-1]) == reached
    # complete: tracker, .metadata, every rank's data (find_checkpoint checks them all)
    assert checkpoint.find_checkpoint(root) == (reached, root / f"iter_{reached:07d}")

    stop = reached + RESUMED_FOR
    resumed = job(_argv(root, "--exit-interval", str(stop)), "resumed")
    assert resumed.wait(timeout=300) == 0, resumed.text()[-3000:]
    assert LOADED.findall(resumed.text()) == [str(reached)]
    reference = job(_argv(tmp_path / "reference", "--exit-interval", str(REFERENCE_TO)), "reference")
    assert reference.wait(timeout=300) == 0, reference.text()[-3000:]
    expected, got = exact_losses(reference.text()), exact_losses(resumed.text())
    assert {it for _, it in got} == set(range(reached + 1, stop + 1))
    assert got == {key: loss for key, loss in expected.items() if reached < key[1] <= stop}
    assert exact_losses(text) == {key: loss for key, loss in expected.items() if key[1] <= reached}
