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


# Llama-3's special-token layout: 128,000 ordinary ids, then 256 special ones.
LLAMA3_VOCAB, LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT = 128256, 128000, 128001, 128009
LLAMA3_CHAT_TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}" \
    "<|eot_id|>{% endfor %}"


def llama3_style_tokenizer(out_dir: Path, texts: list[str], merges: int = 400) -> Path:
    """A Hugging Face tokenizer directory (tokenizer.json only) laid out as Llama-3's: byte-level BPE
    (``merges`` learnt pieces, the rest of the first 128,000 ids unused), ``<|begin_of_text|>`` 128000
    added first by the post-processor, ``<|end_of_text|>`` 128001 as EOS, ``<|eot_id|>`` 128009, and a
    chat template. Small to train (a second) but with the real ids above 65,535."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), LLAMA3_BOS)})
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    special = [f"<|reserved_special_token_{i}|>" for i in range(LLAMA3_VOCAB - LLAMA3_BOS)]
    special[0], special[1], special[LLAMA3_EOT - LLAMA3_BOS] = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
    tokenizer.add_special_tokens(special)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", LLAMA3_BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir
