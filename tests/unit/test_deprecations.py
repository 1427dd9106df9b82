"""The project's own calls raise no deprecation warning, and megatron's GPTModel notice (a known,
documented choice: megatron_moh.model) does not print on every start. Runs in a fresh
interpreter so that no warning was already shown (and suppressed) by another test."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import io, logging, tempfile, warnings
warnings.simplefilter("always")
log = io.StringIO()
logging.basicConfig(stream=log, level=logging.WARNING)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from megatron_moh import patches, platform
    platform.setup(force_cpu=True)
    patches.install_all()
    platform.init_process_group(0, 1, init_method=f"file://{tempfile.mkdtemp()}/rendezvous")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    from megatron_moh.arguments import parse_megatron_args
    from megatron_moh.conversion.hf_configs import moh_hf_config
    from megatron_moh.hf import MoHLlamaForCausalLM
    from megatron_moh.model import build_gpt_model, llama_moh_config
    parse_megatron_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8"], validate=False)
    tokens = torch.randint(0, 128, (2, 16))
    positions = torch.arange(16)[None].expand(2, -1)
    for moh in (True, False):
        config = llama_moh_config(num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=128)
        model = build_gpt_model(config, vocab_size=128, max_sequence_length=16, moh=moh)
        model(tokens, positions, None, labels=tokens).sum().backward()
    hf = MoHLlamaForCausalLM(moh_hf_config(config, vocab_size=128, max_position_embeddings=16))
    hf(tokens).logits.sum().backward()
ours = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))
        and ("/megatron_moh/" in w.filename or w.filename.endswith("pretrain_moh.py"))]
print("OURS", ours)
print("GPTMODEL_NOTICE", "GPTModel IS DEPRECATED" in log.getvalue())
'''


@pytest.mark.slow
def test_no_deprecation_from_project_calls():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OURS []" in out.stdout, out.stdout
    assert "GPTMODEL_NOTICE False" in out.stdout, out.stdout
