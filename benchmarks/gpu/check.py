"""The GPU check kit's steps under one time budget, and a summary against the aims (see check.sh).

Each step is a subprocess (a failure or a timeout is recorded and the next step still runs): the
GPU tests (tests/gpu), bench_sparse.py at 50% and 75% active heads, bench_train.py with a ~1B
model and its dense twin, bench_attention.py, bench_generate.py (the exported model against a plain
Llama, 4k context). Shapes are the kit's (4096 tokens, head dim 128,
bf16) or, with --cpu-dry-run, tiny ones on the CPU: same scripts, same code paths. Writes every
step's log and JSON, summary.json and summary.md to --out. Exits 1 when a step failed or a test
failed; the aims are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Shared by the GPU steps, so flex's compiled kernels are reused across them (inductor's cache).
KIT = dict(seq=4096, heads=16, head_dim=128, batch=1)
DRY = dict(seq=256, heads=8, head_dim=32, batch=1)
AIMS = {"flex_vs_flash": 0.65, "moh75_vs_dense": 1.0, "mfu": 0.40, "decode_vs_llama": 1.10}


def steps(out: Path, dry: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, timeout in seconds), in the order they run."""
    py = sys.executable
    shape = DRY if dry else KIT
    seq, heads, head_dim, batch = (str(shape[k]) for k in ("seq", "heads", "head_dim", "batch"))
    hidden = str(shape["heads"] * shape["head_dim"])
    repeats = ["--repeats", "2"] if dry else ["--repeats", "10"]
    sparse = [py, "benchmarks/bench_sparse.py", "--seqs", seq, "--heads", heads, "--groups", heads,
              "--head-dim", head_dim, "--batch", batch, "--dtype", "bf16", "--no-baddbmm", *repeats]
    quarter = str(shape["heads"] // 4)
    train_model = (["--layers", "2", "--ffn", "256", "--vocab", "512"] if dry
                   else ["--layers", "24", "--ffn", "5632", "--vocab", "32000"])
    return [
        ("tests_gpu", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu",
                       f"--junitxml={out / 'tests_gpu.xml'}"], 210),
        ("bench_sparse_50", [*sparse, "--shared", quarter, "--topks", quarter,
                             "--out", str(out / "bench_sparse_50.json")], 100),
        ("bench_train", [py, "benchmarks/bench_train.py", *train_model, "--hidden", hidden,
                         "--heads", heads, "--seq", seq, "--batch", batch, "--bf16",
                         "--rows", "dense", "moh75", "moh75_sparse", "moh50_sparse",
                         *(["--repeats", "2", "--warmup", "1"] if dry else ["--repeats", "5"]),
                         "--out", str(out / "bench_train.json")], 150),
        ("bench_attention", [py, "benchmarks/bench_attention.py", "--hidden", hidden, "--heads", heads,
                             "--seq", seq, "--batch", batch, "--bf16", *repeats,
                             "--out", str(out / "bench_attention.json")], 100),
        ("bench_sparse_75", [*sparse, "--shared", str(shape["heads"] // 2), "--topks", quarter,
                             "--out", str(out / "bench_sparse_75.json")], 80),
        ("bench_generate", [py, "benchmarks/bench_generate.py", "--contexts", seq, "--kv-heads", heads,
                            "--heads", heads, "--hidden", hidden, "--active", "75", "--batches", "1", "8",
                            "--threads", "1", "--dtype", "bf16",
                            *(["--layers", "1", "--ffn", "256", "--vocab", "512", "--new-tokens", "2",
                               "--repeats", "1"] if dry else
                              ["--layers", "4", "--ffn", "5632", "--vocab", "32000", "--new-tokens", "32",
                               "--repeats", "3"]),
                            "--out", str(out / "bench_generate.json")], 80),
    ]


def run_steps(out: Path, dry: bool, budget_s: float) -> dict[str, dict]:
    """Run every step within the budget; return each one's status, seconds and log path."""
    env = dict(os.environ, MOH_TEST_GPU="1", PYTHONUNBUFFERED="1")
    deadline = time.monotonic() + budget_s
    results = {}
    for name, argv, timeout in steps(out, dry):
        log = out / f"{name}.log"
        left = deadline - time.monotonic()
        if left < 10:
            results[name] = {"status": "not run (time budget spent)", "seconds": 0.0, "log": log.name}
            continue
        print(f"check: {name} (up to {min(timeout, left):.0f} s): {' '.join(argv[1:])}", flush=True)
        start = time.monotonic()
        with open(log, "w") as handle:
            try:
                rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=min(timeout, left)).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = "timed out"
        results[name] = {"status": status, "seconds": round(time.monotonic() - start, 1), "log": log.name}
        print(f"check: {name}: {status} in {results[name]['seconds']} s", flush=True)
    return results


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def test_counts(out: Path) -> dict | None:
    """Tests, failures, errors and skips from pytest's JUnit XML."""
    path = out / "tests_gpu.xml"
    if not path.exists():
        return None
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def aims(out: Path, dry: bool) -> list[dict]:
    """Each aim with its measured value (None where the step did not produce it); a dry run's
    tiny CPU shapes measure nothing, so it judges no aim."""
    sparse, train = _load(out / "bench_sparse_50.json"), _load(out / "bench_train.json")
    generate = _load(out / "bench_generate.json")
    decode = {f"{row['setting']}, batch {row['batch']}, {row['cache']} cache": row["ratio"]
              for row in (generate or {}).get("rows", ())
              if row["phase"] == "decode" and row["setting"] in ("moh75_sparse", "moh75_auto")}
    flex = sparse["rows"][0].get("ratio_flex_fwd_bwd_vs_sdpa") if sparse else None
    rows = {row["setting"]: row for row in train["rows"]} if train else {}
    moh = {label: rows[label]["throughput_ratio_vs_dense"] for label in
           ("MoH learned, 75% active", "MoH learned, 75% active, head-sparse") if label in rows}
    dense_mfu = rows.get("dense attention", {}).get("mfu")
    rows = [
        {"aim": "flex head-sparse core / dense flash SDPA, fwd+bwd, 4096 tokens, 50% active",
         "measured": flex, "target": f"<= {AIMS['flex_vs_flash']}",
         "met": None if flex is None else flex <= AIMS["flex_vs_flash"]},
        {"aim": "MoH-75% training tokens/s / dense (best of dense and head-sparse impl)",
         "measured": max(moh.values()) if moh else None, "detail": moh,
         "target": f">= {AIMS['moh75_vs_dense']}",
         "met": None if not moh else max(moh.values()) >= AIMS["moh75_vs_dense"]},
        {"aim": "MFU of the dense model's training step (no TE)", "measured": dense_mfu,
         "target": f">= {AIMS['mfu']:.0%}", "met": None if dense_mfu is None else dense_mfu >= AIMS["mfu"]},
        {"aim": "MoH-75% decoding tokens/s / plain Llama's, 4096-token cache (best of sparse and auto)",
         "measured": max(decode.values()) if decode else None, "detail": decode,
         "target": f">= {AIMS['decode_vs_llama']}",
         "met": None if not decode else max(decode.values()) >= AIMS["decode_vs_llama"]},
    ]
    if dry:
        for row in rows:
            row["met"] = None
    return rows


def environment() -> dict:
    """Versions and the device, for the report."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for module in ("triton", "megatron.core", "transformers"):
        try:
            info[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - a missing or broken package is reported, not fatal
            info[module] = None
    return info


def write_summary(out: Path, dry: bool, results: dict, counts: dict | None, aim_rows: list[dict]) -> str:
    """summary.json and summary.md; returns the markdown."""
    env = environment()
    summary = {"cpu_dry_run": dry, "environment": env, "steps": results, "tests": counts, "aims": aim_rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = [f"# GPU check kit{' (CPU dry run: tiny shapes, not a measurement)' if dry else ''}", "",
             ", ".join(f"{k} {v}" for k, v in env.items()), "", "| step | status | seconds |",
             "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']} |" for name, r in results.items()]
    if counts:
        lines += ["", f"GPU tests: {counts['tests']} run, {counts['failures']} failed, "
                      f"{counts['errors']} errors, {counts['skipped']} skipped"]
    lines += ["", "| aim | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a['aim']} | {fmt(a['measured'])} | {a['target']} | {fmt(a['met'])} |" for a in aim_rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, JSON and the summary")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--budget-s", type=float, default=470,
                        help="wall-clock seconds for all steps together (default 470)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("check.py: error: no CUDA device here: run on a GPU machine or pass --cpu-dry-run")
    results = run_steps(args.out, args.cpu_dry_run, args.budget_s)
    counts = test_counts(args.out)
    print(write_summary(args.out, args.cpu_dry_run, results, counts, aims(args.out, args.cpu_dry_run)))
    failed = any(r["status"] != "ok" for r in results.values())
    failed |= counts is None or counts["failures"] + counts["errors"] > 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
