"""examples/slurm/pretrain_moh.sbatch on a real one-node SLURM cluster (Debian's slurm-wlm, set up
by `slurm_cluster`), configured by environment variables only: a tiny model on the built-in corpus,
2 CPU ranks. A preemption (USR1 to the batch script) saves the iteration reached, requeues, and
the job resumes there and completes; a plain scancel saves and ends the job for good. Neither
leaves a process behind. Skipped only where SLURM cannot be installed (no root, no apt-get)."""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megatron_moh import checkpoint
from tests.integration.jobs import EXIT_MESSAGE, LOADED, ROOT, SAVED, losses
from tests.integration.slurm_cluster import Cluster, install_reason

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRAIN_ITERS, SAVE_INTERVAL, SIGNAL_AFTER = 12, 3, 5
TINY = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 8 --kv-channels 8 "
        "--seq-length 64 --max-position-embeddings 64 --lr-warmup-iters 2 --eval-iters 0")
ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    # under /tmp: munged needs every directory above its socket open to all (pytest's are 0700)
    root = Path(tempfile.mkdtemp(prefix="moh-slurm-", dir="/tmp"))
    started = Cluster(root)
    try:
        started.start()
        yield started
    finally:
        started.stop()
        logs = tmp_path_factory.mktemp("slurm-logs")  # the daemons' logs, kept with pytest's
        for log in root.glob("*.log"):
            shutil.copy(log, logs)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_moh.data.corpus import prepare_builtin_dataset

    return prepare_builtin_dataset(cache_dir=str(tmp_path_factory.mktemp("corpus")), vocab_size=512)


def _submit(cluster, corpus, run_dir: Path, log: Path) -> str:
    prefix, tokenizer = corpus
    env = {k: v for k, v in cluster.env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(MODEL="moh_llm_s", MOH_SHARED="4", MOH_TOPK="2", DATA_PATH=prefix, TOKENIZER_MODEL=tokenizer,
               RUN_DIR=str(run_dir), TRAIN_ITERS=str(TRAIN_ITERS), SAVE_INTERVAL=str(SAVE_INTERVAL),
               LOG_INTERVAL="1", EVAL_INTERVAL="1000", MICRO_BATCH="4", GLOBAL_BATCH="8", PRECISION="",
               EXTRA_ARGS=TINY, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cpus = str(min(2, os.cpu_count() or 1))
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=15",
         f"--output={log}", "examples/slurm/pretrain_moh.sbatch"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60)
    return submitted.stdout.strip().split(";")[0]


def _wait(condition, what: str, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"{what}: not within {timeout:.0f} s; the job's log ends with:\n{tail}")


def _running_past(cluster, job: str, log: Path, iteration: int) -> None:
    def past():
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state}"
        return log.exists() and re.search(rf"iteration\s+{iteration}/", log.read_text(errors="replace"))

    _wait(past, f"job {job} logging iteration {iteration}", 300, log)


def _state(cluster, job: str) -> str:
    return cluster.job(job)["JobState"]


def test_preemption_saves_requeues_and_resumes_where_it_saved(cluster, corpus, tmp_path):
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = _submit(cluster, corpus, run_dir, log)
    # past the first periodic save, so the checkpoint writer's helper processes exist
    _running_past(cluster, job, log, SIGNAL_AFTER)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    _wait(lambda: _state(cluster, job) == "PENDING", f"job {job} requeued", 180, log)
    requeued = time.monotonic()
    _wait(lambda: cluster.job_processes(job) == [], "the first run's processes ending", 10, log)
    first = log.read_text()
    saved = checkpoint.find_checkpoint(run_dir / "checkpoints")[0]  # complete, or this raises
    assert SIGNAL_AFTER < saved < TRAIN_ITERS and max(losses(first)) == saved
    assert int(SAVED.findall(first)[-1]) == saved and EXIT_MESSAGE in first
    assert f"requeueing job {job}" in first

    # A requeued job waits 120 s; started sooner, it must start in a later second than the requeue
    # revoked its credential, or slurmd refuses it ("Job credential revoked") and it FAILS.
    time.sleep(max(0.0, requeued + 2 - time.monotonic()))
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    _wait(lambda: _state(cluster, job) in ENDED, f"job {job} ending", 300, log)
    info = cluster.job(job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), info
    both = log.read_text()
    assert both.startswith(first)  # --open-mode=append: the requeue did not truncate the log
    second = both[len(first):]
    assert LOADED.findall(second) == [str(saved)]
    assert sorted(losses(second)) == list(range(saved + 1, TRAIN_ITERS + 1))
    assert checkpoint.find_checkpoint(run_dir / "checkpoints")[0] == TRAIN_ITERS
    _wait(lambda: cluster.job_processes(job) == [], "the job's processes ending", 10, log)


def test_scancel_saves_and_ends_the_job_without_requeue(cluster, corpus, tmp_path):
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job = _submit(cluster, corpus, run_dir, log)
    _running_past(cluster, job, log, SIGNAL_AFTER)
    cluster.run("scancel", job)
    _wait(lambda: _state(cluster, job) in ENDED, f"job {job} ending", 120, log)
    info = cluster.job(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), info
    _wait(lambda: cluster.job_processes(job) == [], "the job's processes ending", 10, log)
    text = log.read_text()
    saved = checkpoint.find_checkpoint(run_dir / "checkpoints")[0]
    assert SIGNAL_AFTER < saved < TRAIN_ITERS and max(losses(text)) == saved and EXIT_MESSAGE in text
    assert "USR1" not in text and f"requeueing job {job}" not in text
