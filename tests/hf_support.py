"""What the Hugging Face tests share: the router/gate variants, megatron's logits, and a fresh,
offline Python process that loads exports the way a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

VARIANTS = {
    "learned-weighted-2stage": dict(moh_router="learned", moh_gate="weighted", moh_two_stage=True),
    "learned-binary": dict(moh_router="learned", moh_gate="binary"),
    "query_norm-binary": dict(moh_router="query_norm", moh_gate="binary"),
    "query_norm-weighted": dict(moh_router="query_norm", moh_gate="weighted"),
}


def megatron_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A megatron GPTModel's logits for ``ids`` ``[batch, seq]`` (causal, no mask tensor)."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, attention_mask=None)


def run_offline(script: str, job: dict[str, Any], workdir: Path, timeout: float = 600,
                pythonpath: str | None = None) -> Any:
    """Run ``script`` (which reads the job file named by ``sys.argv[1]`` and ``torch.save``s its
    results to ``job["out"]``) in a fresh interpreter with no network, a private HF_HOME and no
    inherited HF / transformers settings or PYTHONPATH (``pythonpath`` instead, if given); return
    what it saved."""
    (workdir / "job.json").write_text(json.dumps(job))
    (workdir / "loader.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHONPATH"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(workdir / "hf-home"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, str(workdir / "loader.py"), str(workdir / "job.json")], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(job["out"])


REPO = Path(__file__).resolve().parents[1]
# Where `bash setup.sh --test` installs the oldest transformers that setup.py declares.
TRANSFORMERS_FLOOR_DIR = REPO / ".venv" / "transformers-floor"


def transformers_floor() -> tuple[str, str]:
    """(the oldest transformers version setup.py declares, the directory that holds it), asserting
    that `setup.sh --test` installed it there."""
    import re

    floor = re.search(r'"transformers>=([0-9.]+)"', (REPO / "setup.py").read_text()).group(1)
    found = list(TRANSFORMERS_FLOOR_DIR.glob(f"transformers-{floor}.dist-info"))
    assert found, f"transformers {floor} is not in {TRANSFORMERS_FLOOR_DIR}: run `bash setup.sh --test`"
    return floor, str(TRANSFORMERS_FLOOR_DIR)
