"""Launcher targets for checkpoint tests: pretrain_moh.main() runs that may exit early (exit
interval, signal, refusal) and report every micro-batch's exact loss, not megatron's rounded and
interval-averaged log line."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from typing import Any, Callable


def record_losses(train, record: Callable[[tuple[int, float]], None]) -> None:
    """Wrap the forward step pretrain_moh hands to megatron so that ``record`` gets each training
    micro-batch's (iteration counted from 0, exact loss)."""
    from megatron.training import get_args

    forward_step = train.forward_step

    def recording_forward_step(data_iterator, model, *args, **kwargs):
        output, loss_fn = forward_step(data_iterator, model, *args, **kwargs)

        def recording_loss_fn(output_tensor):
            result = loss_fn(output_tensor)
            if model.training:  # not evaluation
                record((get_args().curr_iteration, float(result[0])))
            return result

        return output, recording_loss_fn

    train.forward_step = recording_forward_step


def run_worker(rank: int, world: int, argv: list[str], signal_at: int | None = None,
               overtime_at: int | None = None) -> dict[str, Any]:
    """Launcher target: one rank of ``pretrain_moh.py argv``. Returns its stdout, stderr, exit code (None when
    main() returned) and ``losses``: (iteration, summed token loss) per training micro-batch on this
    rank (ranks of the last pipeline stage), iterations counted from 0. ``signal_at``: this process
    gets SIGTERM during that iteration (a scheduler's preemption); ``overtime_at``: from that
    iteration on, training seems to have started
    an hour ago (for --exit-duration-in-mins)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import pretrain_moh

    from megatron_moh import train

    losses: list[tuple[int, float]] = []
    record_losses(train, losses.append)
    recorded = train.forward_step

    def forward_step_with_events(data_iterator, model, *args, **kwargs):
        from megatron.training import get_args
        from megatron.training import training

        iteration = getattr(get_args(), "curr_iteration", None)
        if signal_at is not None and iteration == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if overtime_at is not None and iteration == overtime_at:
            training._TRAIN_START_TIME -= 3600
        return recorded(data_iterator, model, *args, **kwargs)

    train.forward_step = forward_step_with_events  # pretrain_moh.main() hands megatron this name
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            pretrain_moh.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return dict(out=out.getvalue(), err=err.getvalue(), code=code, losses=losses)


def stalled_save_worker(rank: int, world: int, argv: list[str], stall_iteration: int, marker: str) -> dict[str, Any]:
    """Launcher target: `run_worker`, except that the save of ``stall_iteration`` writes its first
    item, touches ``marker`` and hangs, so the test can kill the process mid-save."""
    import functools
    import time

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write_item = filesystem_async._write_item
    directory = f"iter_{stall_iteration:07d}"

    @functools.wraps(write_item)  # megatron inspects its signature
    def stalling_write_item(*args, **kwargs):
        result = write_item(*args, **kwargs)
        stream = next((a for a in args if hasattr(a, "name") and hasattr(a, "write")), None)
        if stream is not None and directory in str(stream.name):
            stream.flush()
            open(marker, "w").close()
            time.sleep(600)
        return result

    filesystem_async._write_item = stalling_write_item
    return run_worker(rank, world, argv)


FIRST_SAVE_MOMENTS = ("begins", "helper", "data", "metadata")


def sigterm_in_first_save_worker(rank: int, world: int, argv: list[str], moment: str) -> dict[str, Any]:
    """Launcher target: `run_worker` in a process group of its own, whose every process (this rank
    and the checkpoint writer's helper) gets SIGTERM, as from SLURM or torchrun, once, at ``moment``
    of the first save: as it ``begins``; when the writer asks for its ``helper`` process (and, if
    that starts one, as soon as it has started); after the first ``data`` item is written; before
    the ``metadata`` is written. The result says whether the signal was sent."""
    import functools
    import multiprocessing.process

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.training import training

    os.setpgrp()  # the launcher installed the project's patches; the hooks below go around them
    state = dict(saves=0, saving=False, asking=False, sent=False)

    def signal_group() -> None:
        if state["saving"] and state["saves"] == 1 and not state["sent"]:
            state["sent"] = True
            os.killpg(os.getpgrp(), signal.SIGTERM)

    def hook(owner, name, before=None, after=None):
        original = getattr(owner, name)

        @functools.wraps(original)  # megatron inspects some signatures
        def hooked(*args, **kwargs):
            if before:
                before()
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    after()

        setattr(owner, name, hooked)

    def save_begins():
        state.update(saves=state["saves"] + 1, saving=True)
        if moment == "begins":
            signal_group()

    def asking(flag):
        state["asking"] = flag
        if not flag and moment == "helper":
            signal_group()  # no process started: signal once the helper is there

    hook(training, "save_checkpoint", before=save_begins, after=lambda: state.update(saving=False))
    hook(filesystem_async, "get_write_results_queue", before=lambda: asking(True), after=lambda: asking(False))
    hook(multiprocessing.process.BaseProcess, "start",
         after=lambda: state["asking"] and moment == "helper" and signal_group())
    hook(filesystem_async, "_write_item", after=lambda: moment == "data" and signal_group())
    hook(filesystem_async.FileSystemWriterAsync, "finish", before=lambda: moment == "metadata" and signal_group())
    result = run_worker(rank, world, argv)
    return dict(result, signalled=state["sent"])


def kill_during_save(argv: list[str], stall_iteration: int, marker: str, timeout: float = 300) -> tuple[int, list]:
    """Run ``pretrain_moh.py argv`` in one forked rank, SIGKILL it once the save of
    ``stall_iteration`` has begun writing; return the process's exit code (-9) and the helper
    processes it had started (psutil.Process), which nobody else stops."""
    import tempfile
    import time

    import psutil

    from tests import launcher

    ctx = launcher._context()
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        process = ctx.Process(target=launcher._worker, args=(
            stalled_save_worker, 0, 1, os.path.join(tmp, "rendezvous"), queue, (argv, stall_iteration, marker), {}))
        process.start()
        deadline = time.time() + timeout
        while not os.path.exists(marker) and process.is_alive() and time.time() < deadline:
            time.sleep(0.1)
        stalled = os.path.exists(marker)
        helpers = psutil.Process(process.pid).children(recursive=True) if process.is_alive() else []
        process.kill()
        process.join()
    if not stalled:
        raise AssertionError(f"the save of iteration {stall_iteration} never started writing")
    return process.exitcode, helpers
