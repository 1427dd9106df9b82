"""Every launch script's pretrain_moh.py flags parse with the project's parser and make a valid
MoH config, so a typo in examples/ fails CI."""

import os
import subprocess
from pathlib import Path

import pytest

from megatron_moh.arguments import parse_megatron_args
from megatron_moh.config import check_moh_config, resolve_moh_defaults

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted(p.stem for p in (ROOT / "examples" / "models").glob("*.sh"))
SCRIPTS = ["examples/single_node.sh", "examples/slurm/pretrain_moh.sbatch"]


def _flags(script: str, model: str, **env) -> list[str]:
    environment = dict(os.environ, DRY_RUN="1", MODEL=model, DATA_PATH="0.7 /data/a 0.3 /data/b",
                       TOKENIZER_MODEL="/data/tok.model", NPROC="8", **env)
    out = subprocess.run(["bash", str(ROOT / script)], env=environment, capture_output=True, text=True,
                         check=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("model", MODELS)
def test_launch_flags_parse(script, model):
    flags = _flags(script, model, TP="2", PP="2")
    args = parse_megatron_args(flags, validate=False)  # exits on an unknown flag
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel
    assert args.data_path == ["0.7", "/data/a", "0.3", "/data/b"]
    resolve_moh_defaults(args)
    check_moh_config(args)
    if model.startswith("dense"):
        assert args.moh_dense_baseline
    else:
        active = (args.moh_num_shared_heads + args.moh_topk) / args.num_attention_heads
        assert active == 0.75


def test_paper_hyper_parameters():
    args = parse_megatron_args(_flags(SCRIPTS[0], "moh_llm_b"), validate=False)
    shape = (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads, args.kv_channels)
    assert shape == (24, 1536, 4096, 16, 96)
    recipe = (args.lr, args.min_lr, args.lr_warmup_iters, args.weight_decay, args.clip_grad)
    assert recipe == (5e-4, 5e-5, 500, 0.1, 1.0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_intervals_precision_and_extra_flags_come_from_the_environment(script, tmp_path):
    run_dir = tmp_path / "run"
    flags = _flags(script, "moh_llm_s", SAVE_INTERVAL="7", EVAL_INTERVAL="9", LOG_INTERVAL="1", PRECISION="",
                   EXTRA_ARGS="--num-layers 2 --eval-iters 0", RUN_DIR=str(run_dir))
    args = parse_megatron_args(flags, validate=False)
    assert (args.save_interval, args.eval_interval, args.log_interval) == (7, 9, 1)
    assert not args.bf16 and (args.num_layers, args.eval_iters) == (2, 0)  # EXTRA_ARGS come last and win
    assert not run_dir.exists()  # DRY_RUN creates nothing
