"""A full disk, end to end: a save that does not fit, a run resumed onto the same full disk, and the
conversion tool writing onto one. Each ends with one line saying "no space left on device" with
the path (and, where it is known, the space needed), no traceback, and the previous checkpoint or
output intact.

The disk is a small tmpfs in a mount namespace of the test's own (``unshare --user
--map-root-user --mount``), so no root is needed where user namespaces are allowed; the programs
run inside it, and what the disk holds afterwards is copied out to be checked."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moh import checkpoint
from megatron_moh import tokenizer as tk
from megatron_moh.data import corpus

pytestmark = pytest.mark.slow  # six runs of pretrain_moh.py and the conversion tool

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "1e-3", "--eval-iters", "0", "--eval-interval", "1000",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500", "--train-iters", "3"]
CHECKPOINT_MB = 2.0  # one checkpoint of MODEL: 1.9-2.0 MB


def _private_tmpfs_works() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_private_tmpfs = pytest.mark.skipif(
    not _private_tmpfs_works(), reason="needs a private tmpfs: `unshare --user --map-root-user --mount` (user "
                                       "namespaces) or root")


class SmallDisk:
    """Steps run one after another on a ``size`` tmpfs mounted at ``disk``, in one private mount
    namespace; each step's exit code, stdout and stderr land in ``logs``."""

    def __init__(self, tmp_path: Path, size: str) -> None:
        self.disk, self.logs, self.size = tmp_path / "disk", tmp_path / "logs", size
        self.disk.mkdir()
        self.logs.mkdir()
        self.steps: list[str] = []

    def program(self, name: str, script: str, *argv: object) -> None:
        command = shlex.join([sys.executable, str(ROOT / script), *map(str, argv)])
        out = self.logs / name
        self.steps.append(f"{command} >{out}.out 2>{out}.err; echo $? >{out}.rc")

    def shell(self, command: str) -> None:
        self.steps.append(command)

    def run(self) -> None:
        script = " && ".join([f"mount -t tmpfs -o size={self.size} tmpfs {self.disk}", *self.steps])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT, env=env,
                       check=True, timeout=900)

    def result(self, name: str) -> tuple[int, str, str]:
        read = lambda suffix: (self.logs / f"{name}.{suffix}").read_text()
        return int(read("rc")), read("out"), read("err")


def _one_line(stderr: str, prog: str) -> str:
    """The program's last line on stderr, which must be its refusal; no traceback before it
    (megatron's writer logs its own two lines about the failed write first)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: no space left on device: "), stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def saves_and_resumes(tmp_path_factory):
    """A 3 MB disk: a run saves iteration 1 there, then finds no room for iteration 2; the same run
    resumed onto it stops at start-up. What the disk held is in ``after``."""
    tmp = tmp_path_factory.mktemp("room-for-one")
    disk = SmallDisk(tmp, "3m")
    save = disk.disk / "ckpt"
    disk.program("first", "pretrain_moh.py", *MODEL, "--save", save, "--save-interval", "1")
    disk.program("resumed", "pretrain_moh.py", *MODEL, "--load", save, "--save", save, "--save-interval", "1")
    disk.shell(f"cp -a {save} {tmp / 'after'}")
    disk.run()
    return disk, tmp / "after"


@needs_private_tmpfs
def test_a_save_without_room_stops_before_writing_and_keeps_the_last(saves_and_resumes):
    disk, after = saves_and_resumes
    code, out, err = disk.result("first")
    assert code == 1
    message = _one_line(err, "pretrain_moh.py")
    assert message.startswith(f"pretrain_moh.py: error: no space left on device: --save {disk.disk / 'ckpt'} has ")
    assert f"free and the checkpoint of iteration 2 needs about {CHECKPOINT_MB} MB (as iter_0000001 took)" in message
    assert "successfully saved checkpoint from iteration       1" in out
    assert checkpoint.find_checkpoint(after) == (1, after / "iter_0000001")
    assert checkpoint.verify_checkpoint(after / "iter_0000001") > 0
    assert not (after / "iter_0000002").exists()  # nothing written for it


@needs_private_tmpfs
def test_a_run_resumed_onto_the_full_disk_stops_at_start_up(saves_and_resumes):
    disk, _ = saves_and_resumes
    code, out, err = disk.result("resumed")
    assert code == 1
    message = _one_line(err, "pretrain_moh.py")
    assert f"the next checkpoint needs about {CHECKPOINT_MB} MB (as iter_0000001 took)" in message
    assert out == ""  # before megatron's argument dump: no process group, nothing trained


@needs_private_tmpfs
def test_a_save_that_fails_on_a_full_disk_says_so(tmp_path):
    """A first save, whose size nobody knows yet, on a disk too small for it: megatron's writer
    fails ("Worker failure", "unexpected pos"); the run names the full disk."""
    disk = SmallDisk(tmp_path, "1m")
    save = disk.disk / "ckpt"
    disk.program("first", "pretrain_moh.py", *MODEL, "--save", save, "--save-interval", "2")
    disk.shell(f"ls -A {save} > {tmp_path / 'left'}")
    disk.run()
    code, _, err = disk.result("first")
    assert code == 1
    message = _one_line(err, "pretrain_moh.py")
    assert message.startswith(f"pretrain_moh.py: error: no space left on device: {save} (")
    assert message.endswith("free now): the checkpoint of iteration 2 did not fit in --save; no checkpoint was "
                            "saved: free space or choose another --save, then resume")
    assert "latest_checkpointed_iteration.txt" not in (tmp_path / "left").read_text()


@needs_private_tmpfs
def test_conversion_and_preprocessing_onto_a_full_disk_say_so_and_leave_nothing(saves_and_resumes, tmp_path):
    _, saved = saves_and_resumes  # iteration 1, on the real disk
    disk = SmallDisk(tmp_path, "200k")
    hf = tmp_path / "hf"
    disk.program("export", "tools/convert_checkpoint.py", "export-hf", "--load", saved, "--out", disk.disk / "hf")
    disk.program("export-here", "tools/convert_checkpoint.py", "export-hf", "--load", saved, "--out", hf)
    disk.program("import", "tools/convert_checkpoint.py", "import-hf", "--hf", hf, "--out", disk.disk / "mg")
    docs = list(corpus.builtin_corpus_text())[:300]
    tk.train_tokenizer(docs, str(tmp_path / "tok"), 512)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(docs) * 4)  # ~1 MB: some 500 KB of ids at 2 bytes each
    disk.program("preprocess", "tools/preprocess_data.py", "--input", text, "--output-prefix", disk.disk / "data" / "x",
                 "--tokenizer-model", tmp_path / "tok.model", "--no-progress")
    disk.shell(f"ls -A {disk.disk} > {tmp_path / 'left'}")
    disk.run()
    for step, out in (("export", disk.disk / "hf"), ("import", disk.disk / "mg")):
        code, _, err = disk.result(step)
        assert code == 1, err[-3000:]
        message = _one_line(err, "convert_checkpoint.py")
        assert message.startswith(f"convert_checkpoint.py: error: no space left on device: {out} (")
        assert message.endswith("free now): nothing of --out was written: free space or choose another --out")
    assert disk.result("export-here")[0] == 0
    code, _, err = disk.result("preprocess")
    assert code == 2
    assert _one_line(err, "preprocess_data.py").startswith(
        f"preprocess_data.py: error: no space left on device: {disk.disk / 'data'} (")
    assert (tmp_path / "left").read_text() == ""  # the partial outputs were removed
