"""The README's main job: the tiny MoH model learns on the built-in corpus, and its first screen
says in one line what megatron-core and torch say in a page. Refusals are in test_bad_input.py
(end to end) and tests/unit/test_preflight.py (their wording)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moh import console
from tests.integration.pretrain_runner import SMALL_MODEL, losses, pretrain_worker
from tests.launcher import launch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moh-data"))


@pytest.mark.slow
def test_builtin_default_learns_real_text(data_cache):
    argv = ["--moh-data-cache", data_cache, "--train-iters", "60", "--lr-warmup-iters", "10",
            "--eval-iters", "0", "--log-interval", "5"]
    result = losses(launch(pretrain_worker, 1, argv, timeout=600))
    first, last = result[min(result)], result[max(result)]
    assert first > 7.5  # about ln(4096): the model starts knowing nothing
    assert last < first - 1.5, f"loss went from {first} to {last}"


@pytest.mark.slow  # megatron's parser in a fresh interpreter
def test_help_lists_megatron_and_moh_flags():
    """megatron-core 0.19.2 has a help string with a bare '%' that makes argparse's --help crash."""
    out = subprocess.run([sys.executable, str(ROOT / "pretrain_moh.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: pretrain_moh.py")
    for text in ("mixture-of-heads:", "--moh-topk MOH_TOPK", "--tensor-model-parallel-size",
                 "--moe-paged-stash-buffer-size-factor-cuda", "10%)"):
        assert text in out.stdout, text


# What megatron-core and torch print on a CPU machine about absent optional libraries.
NOTICES = ("not installed", "No CUDA runtime", "'pin_memory' argument", "all_gather_into_tensor` is deprecated",
           "one_logger package is required", "It is recommended to use a ModelConfig",
           "MimoModelConfig is experimental")


@pytest.mark.slow  # two runs of the default command
def test_first_screen_sums_up_absent_libraries_in_one_line():
    """--verbose shows megatron's and torch's notices; without it one line stands for them, and
    megatron's argument dump stays."""
    argv = [sys.executable, str(ROOT / "pretrain_moh.py"), *SMALL_MODEL, "--train-iters", "1",
            "--lr-warmup-iters", "0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    runs = {verbose: subprocess.Popen(argv + (["--verbose"] if verbose else []), cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for verbose in (False, True)}
    screens = {verbose: run.communicate(timeout=600)[0] for verbose, run in runs.items()}
    for verbose, run in runs.items():
        assert run.returncode == 0, screens[verbose][-3000:]
        assert "-------- arguments --------" in screens[verbose]
    line = console.fallback_line("local", gpu=False)
    assert line == "running without Transformer Engine / Apex: torch fallbacks"  # CPU machines have neither
    quiet = screens[False].splitlines()
    assert quiet.count(line) == 1
    assert [text for text in NOTICES if text in screens[False]] == []
    assert line not in screens[True].splitlines()
    assert [text for text in NOTICES if text not in screens[True]] == []
