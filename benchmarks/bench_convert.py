"""Hugging Face <-> megatron conversion at real model shapes: time and peak resident memory of each
direction, against plainly copying the same bytes, and the round trip checked bit for bit.

    python benchmarks/bench_convert.py --shape 1b|3b|8b [--tensor-model-parallel-size 2] [--work DIR]

1. writes a random-weight bf16 Llama checkpoint of the shape (Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B)
   one tensor at a time into shards of at most 5 GB, then the index (as the real checkpoints ship);
2. baseline: copies its safetensors files with a streaming read/write (16 MiB at a time, fsync'd);
3. ``convert_checkpoint.py import-hf --layout dense`` (TP=1 unless asked);
4. ``convert_checkpoint.py export-hf --dense`` of that import;
5. compares every tensor of the two Hugging Face directories with ``torch.equal``, one at a time,
   read through the safetensors library (not the converter's reader).

Steps 2-4 run each in a fresh process; their peak resident memory is that process's VmHWM, read at
its exit, and their CPU time comes from ``os.wait4``. Prints a table and writes JSON under results/.
Needs free disk for three copies of the model; everything generated is deleted at the end (``--keep``
keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megatron_moh.conversion.hf_files import INDEX_NAME, write_weights  # noqa: E402

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
COMMON = dict(vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5, bos_token_id=128000,
              eos_token_id=128001, hidden_act="silu")
SHAPES = {
    "1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, intermediate_size=8192, head_dim=64,
               tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072),
    "3b": dict(num_hidden_layers=28, hidden_size=3072, num_attention_heads=24, intermediate_size=8192, head_dim=128,
               tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072),
    "8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, intermediate_size=14336, head_dim=128,
               tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
               max_position_embeddings=8192),
}
SHARD = "5GB"
# The baseline: a streaming copy, 16 MiB at a time, each file fsync'd (as the megatron writer does).
COPY = """
import os, shutil, sys
for src in sys.argv[2:]:
    dst = os.path.join(sys.argv[1], os.path.basename(src))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
"""
# Runs a script and writes its peak resident memory (VmHWM, kB) to argv[1] at exit. rusage's
# ru_maxrss of a child is no use here: the kernel carries the parent's high-water mark across
# vfork/exec into it.
PEAK = """
import atexit, runpy, sys
def peak(path):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(peak, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_random_llama(shape: str, out: Path, seed: int = 0) -> int:
    """A random bf16 Llama checkpoint of ``shape``, made and written one tensor at a time; its bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**COMMON, **SHAPES[shape], dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    specs = {name: tensor for name, tensor in model.state_dict().items() if name not in tied}
    generator = torch.Generator().manual_seed(seed)

    def produce(name: str) -> torch.Tensor:
        tensor = torch.randn(specs[name].shape, generator=generator, dtype=torch.bfloat16)
        return tensor.add_(50).mul_(0.02) if name.endswith("norm.weight") else tensor.mul_(0.02)  # norms near 1

    out.mkdir(parents=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    write_weights(out, specs, produce, SHARD, model.num_parameters())
    return sum(spec.numel() * spec.element_size() for spec in specs.values())


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / "model.safetensors"]


def run_measured(script: Path, args: list[str], log: Path) -> dict:
    """Run ``script`` in a fresh process: wall and CPU seconds, peak resident memory."""
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    peak = log.with_suffix(".peak")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", PEAK, str(peak), str(script), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{script.name} {' '.join(args[:2])} ... failed ({code}); its output ({log}):\n"
                         + log.read_text()[-3000:])
    return dict(wall_s=round(wall, 1), cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
                peak_rss_gb=round(int(peak.read_text()) * 1024 / 1e9, 2), load_before=round(load, 1),
                load_after=round(os.getloadavg()[0], 1))


def compare(first: Path, second: Path) -> dict:
    """Every tensor of two Hugging Face directories, one pair in memory at a time."""
    from safetensors import safe_open

    def where(directory: Path) -> dict[str, Path]:
        found = {}
        for path in safetensors_files(directory):
            with safe_open(path, "pt") as file:
                found.update(dict.fromkeys(file.keys(), path))
        return found

    def read(path: Path, name: str) -> torch.Tensor:
        with safe_open(path, "pt") as file:
            return file.get_tensor(name)

    start = time.perf_counter()
    a, b = where(first), where(second)
    unequal = [name for name in a if name in b and not _same(read(a[name], name), read(b[name], name))]
    return dict(tensors=len(a), only_in_one=sorted(set(a) ^ set(b)), unequal=unequal,
                bitwise_equal=not unequal and a.keys() == b.keys(), wall_s=round(time.perf_counter() - start, 1))


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return dict(cpu=cpu, cpus=os.cpu_count(), memory_gb=round(memory * 1024 / 1e9, 1), host=platform.node(),
                python=platform.python_version(), torch=torch.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, choices=[1, 2])
    parser.add_argument("--work", type=Path, default=None,
                        help="where to make the directory for the checkpoints (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"moh-bench-convert-{opts.shape}-", dir=opts.work))
    hf, copy, mg, back = work / "hf", work / "copy", work / "megatron", work / "hf-back"
    tool = ROOT / "tools/convert_checkpoint.py"
    tp = opts.tensor_model_parallel_size
    rows: dict[str, dict] = {}
    try:
        start = time.perf_counter()
        size = write_random_llama(opts.shape, hf)
        rows["write random checkpoint"] = dict(wall_s=round(time.perf_counter() - start, 1))
        copy.mkdir()
        (work / "copy.py").write_text(COPY)
        rows["baseline: copy the files"] = run_measured(
            work / "copy.py", [str(copy), *map(str, safetensors_files(hf))], work / "copy.log")
        shutil.rmtree(copy)
        rows[f"import-hf (TP={tp})"] = run_measured(
            tool, ["import-hf", "--hf", str(hf), "--out", str(mg), "--layout", "dense",
                   "--tensor-model-parallel-size", str(tp)], work / "import.log")
        rows["export-hf --dense"] = run_measured(
            tool, ["export-hf", "--load", str(mg), "--out", str(back), "--dense"], work / "export.log")
        check = compare(hf, back)
        rows["compare every tensor"] = dict(wall_s=check["wall_s"])
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    baseline = rows["baseline: copy the files"]["wall_s"]
    print(f"\n{opts.shape}: {size / 1e9:.2f} GB bf16, import at TP={tp}; round trip bitwise equal: "
          f"{check['bitwise_equal']} ({check['tensors']} tensors)")
    print("| step | wall s | x copy | CPU s | peak RSS GB |\n|---|---|---|---|---|")
    for step, row in rows.items():
        ratio = f"{row['wall_s'] / baseline:.2f}" if "peak_rss_gb" in row else ""
        print(f"| {step} | {row['wall_s']} | {ratio} | {row.get('cpu_s', '')} | {row.get('peak_rss_gb', '')} |")
    report = dict(benchmark="bench_convert", shape=opts.shape, config={**COMMON, **SHAPES[opts.shape]},
                  bytes=size, tensor_parallel=tp, shard_size=SHARD, rows=rows, round_trip=check,
                  machine=machine(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  max_rss_of_this_process_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2))
    out = ROOT / "benchmarks" / "results" / f"bench_convert_{opts.shape}_tp{tp}_cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not check["bitwise_equal"]:
        raise SystemExit(f"round trip not bitwise equal: {check['only_in_one'][:3]} {check['unequal'][:3]}")


if __name__ == "__main__":
    main()
