"""Every launch script's pretrain_moh.py flags parse with the project's parser and make a valid
MoH config, so a typo in examples/ fails CI."""

import os
import subprocess
from pathlib import Path

import pytest

from megatron_moh.arguments import TINY_MODEL, parse_megatron_args
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


@pytest.mark.parametrize("env", [{}, dict(MODEL="moh_llm_s", DATA_PATH="/data/a", TOKENIZER_MODEL="/data/tok.model")],
                         ids=["cpu", "gpu"])
def test_compare_moh_dense_trains_three_layouts_alike(env):
    """examples/compare_moh_dense.sh: dense, 75% and 50% active heads; every other flag equal."""
    environment = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA_PATH", "TOKENIZER_MODEL")}
    out = subprocess.run(["bash", str(ROOT / "examples/compare_moh_dense.sh")],
                         env=dict(environment, DRY_RUN="1", **env), capture_output=True, text=True, check=True).stdout
    runs = {}
    for block in out.split("# ")[1:]:
        name, *flags = block.splitlines()
        runs[name] = flags
    assert list(runs) == ["dense", "moh75", "moh50"]
    active, settings = {}, []
    for name, flags in runs.items():
        args = parse_megatron_args(flags, validate=False)
        for key, value in TINY_MODEL.items():  # pretrain_moh.py's preset where the flags leave a size unset
            if getattr(args, key) is None:
                setattr(args, key, value)
        resolve_moh_defaults(args)
        check_moh_config(args)
        heads = args.moh_num_shared_heads + args.moh_topk
        active[name] = 1.0 if args.moh_dense_baseline else heads / args.num_attention_heads
        assert args.tensorboard_dir == f"runs/compare/{name}/tensorboard" and args.log_timers_to_tensorboard
        settings.append({k: v for k, v in vars(args).items()
                         if not k.startswith("moh_") and k not in ("save", "load", "tensorboard_dir")})
    assert active == {"dense": 1.0, "moh75": 0.75, "moh50": 0.5}
    assert settings[1] == settings[0] and settings[2] == settings[0]  # same seed, data, token budget, recipe
