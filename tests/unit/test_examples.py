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
                       TOKENIZER_MODEL="/data/tok.model", NPROC="8", IMPORT_DIR="/data/import", **env)
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


# --- examples/continue_tune: Llama-3-8B into MoH ----------------------------------------------

CONTINUE = "examples/continue_tune/llama3_8b.sh"
# Meta's config.json for Meta-Llama-3-8B (the fields that shape the model).
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
                 eos_token_id=128001, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16")


def _continue_tune(step: str, hf_model: Path, **env) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA_PATH", "TOKENIZER_MODEL")}
    out = subprocess.run(["bash", str(ROOT / CONTINUE), step], env=dict(environment, DRY_RUN="1",
                         HF_MODEL=str(hf_model), TEXT="/data/a.jsonl /data/b.jsonl", WORK="/w", **env),
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("nodes", [1, 4])
def test_continue_tune_flags_build_the_model_import_hf_writes(tmp_path, nodes):
    """The train step's flags (DRY_RUN) describe exactly the checkpoint `import` writes for Meta-Llama-3-8B in
    the published layout, so its --pretrained-checkpoint loads: every field --load compares, RoPE, context."""
    import json

    import torch
    from transformers import AutoConfig

    from megatron_moh.checkpoint import compare_model_args
    from megatron_moh.conversion.hf_checkpoint import _import_args
    from megatron_moh.conversion.hf_configs import megatron_config_kwargs, megatron_model_kwargs

    hf_dir = tmp_path / "Meta-Llama-3-8B"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    hf_config = AutoConfig.from_pretrained(hf_dir)
    imported = _import_args(hf_config, megatron_config_kwargs(hf_config, "published"), megatron_model_kwargs(hf_config),
                            hf_dir, 2, 1, 128, torch.bfloat16)
    flags = _continue_tune("train", hf_dir, NODES=str(nodes))
    args = parse_megatron_args(flags, validate=False)
    args.padded_vocab_size = 128256  # 128,256 is a multiple of 128 x TP
    resolve_moh_defaults(args)
    check_moh_config(args)
    assert compare_model_args(imported, args) == []
    same = ("rotary_base", "max_position_embeddings", "norm_epsilon", "make_vocab_size_divisible_by",
            "tensor_model_parallel_size", "pipeline_model_parallel_size", "bf16")
    assert {k: getattr(args, k) for k in same} == {k: getattr(imported, k) for k in same}
    assert (args.moh_num_shared_heads, args.moh_topk, args.moh_router) == (16, 8, "query_norm")  # 75% active
    assert args.pretrained_checkpoint == "/w/import" and args.load == args.save == "/w/run/checkpoints"
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", str(hf_dir))
    assert args.data_path == ["/w/data/text_document"] and args.seq_length == 8192
    assert args.sequence_parallel and args.use_distributed_optimizer and args.recompute_granularity == "selective"
    assert args.micro_batch_size == (1 if nodes == 1 else 2)
    assert args.train_iters * args.global_batch_size * args.seq_length <= 10**10  # the 10B-token budget
    assert (args.train_iters + 1) * args.global_batch_size * args.seq_length > 10**10


def test_continue_tune_steps_run_the_project_tools(tmp_path):
    """Each other step is one of the project's commands with the right paths (DRY_RUN prints it)."""
    hf_dir = tmp_path / "llama"
    hf_dir.mkdir()
    [imported] = _continue_tune("import", hf_dir)
    assert imported.split() == [".venv/bin/python", "tools/convert_checkpoint.py", "import-hf", "--hf", str(hf_dir),
                                "--out", "/w/import", "--layout", "published", "--tensor-model-parallel-size", "2",
                                "--pipeline-model-parallel-size", "1", "--dtype", "bf16"]
    [data] = _continue_tune("data", hf_dir)
    assert data.split()[1:] == ["tools/preprocess_data.py", "--input", "/data/a.jsonl", "/data/b.jsonl",
                                "--output-prefix", "/w/data/text_document", "--tokenizer-model", str(hf_dir),
                                "--workers", "16"]
    [exported] = _continue_tune("export", hf_dir)
    assert exported.split()[1:] == ["tools/convert_checkpoint.py", "export-hf", "--load", "/w/run/checkpoints",
                                    "--out", "/w/hf"]
    [evaluated] = _continue_tune("eval", hf_dir)
    assert "pretrained=/w/hf,trust_remote_code=True,dtype=bfloat16" in evaluated


@pytest.mark.slow
def test_continue_tune_memory_plan_is_computed_for_the_layout(tmp_path):
    """STEP=plan prints megatron's theoretical memory for the chosen layout (and neighbours): the one-node
    layout fits an 80 GB GPU with headroom, TP=1 does not."""
    hf_dir = tmp_path / "llama"
    hf_dir.mkdir()
    lines = _continue_tune("plan", hf_dir)
    assert lines[0].startswith("computed, not measured")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|"))[:4]: line for line in lines if line[:3] == "| 1"
            or line[:3] == "| 2" or line[:3] == "| 4"}
    assert rows[("2", "1", "4", "1")].endswith("| yes (this run) |")
    assert rows[("1", "1", "8", "1")].endswith("| no |")
