"""The GPU check kit (benchmarks/gpu/check.sh) in its CPU dry run, so that it cannot rot: every
step (GPU tests, bench_sparse, bench_train, bench_attention, bench_generate) runs with tiny shapes on the CPU and
the summary is written. What it measures on a GPU is only measured on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # every step of the kit on CPU (~35 s)
def test_gpu_check_kit_cpu_dry_run(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--cpu-dry-run", str(tmp_path)], cwd=ROOT,
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {name: step["status"] for name, step in summary["steps"].items()} == {
        name: "ok" for name in ("tests_gpu", "bench_sparse_50", "bench_train", "bench_attention",
                                "bench_sparse_75", "bench_generate")}
    # On a CPU every GPU test is collected and skipped (by hardware), none fails.
    tests = summary["tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]
    assert tests["failures"] == tests["errors"] == 0
    for name in ("bench_sparse_50", "bench_sparse_75", "bench_train", "bench_attention", "bench_generate"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"], name
    train = {row["setting"] for row in json.loads((tmp_path / "bench_train.json").read_text())["rows"]}
    assert train == {"dense attention", "MoH learned, 75% active", "MoH learned, 75% active, head-sparse",
                     "MoH learned, 50% active, head-sparse"}
    assert [aim["met"] for aim in summary["aims"]] == [None] * 4  # a dry run judges no aim
    assert "CPU dry run" in (tmp_path / "summary.md").read_text()


def test_gpu_check_kit_usage_error():
    proc = subprocess.run(["bash", "benchmarks/gpu/check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "check.sh: error: usage: bash benchmarks/gpu/check.sh [--cpu-dry-run] OUT_DIR"
