"""Hugging Face conversion through tools/convert_checkpoint.py, from checkpoints that pretrain_moh.py
saved at TP=2 x PP=2: the exports load offline in a fresh process and give megatron's logits (both
routers), generate the same with and without the KV cache, tokenize as sentencepiece does, and are
scored by lm-evaluation-harness exactly as megatron scores them; megatron -> HF -> megatron is bit
for bit; a transformers Llama imported with every head shared keeps its logits and continues
training with ``pretrain_moh.py --load ... --finetune``; bad input is refused with one line.

The Hugging Face side runs in ONE subprocess (``HF_HUB_OFFLINE=1``, a private HF_HOME), as a user
would load an export."""

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_moh import checkpoint
from megatron_moh.conversion.hf_checkpoint import finetune_flags
from megatron_moh.conversion.whole_model import load_model, single_process_group
from megatron_moh.commands import convert_checkpoint
from tests.helpers import assert_one_line_refusal
from tests.hf_support import megatron_logits, run_offline
from tests.integration.checkpoint_runner import run_worker
from tests.launcher import launch

pytestmark = pytest.mark.slow  # trains several small runs (a minute or more on two cores)


VOCAB, SEQ = 512, 64
TOL = dict(rtol=0, atol=1e-5)
SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--seq-length", str(SEQ),
         "--max-position-embeddings", str(SEQ)]
# A larger init than 0.02 so that routing is far from uniform and a wrong gate shows.
TRAIN = [*SHAPE, "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "3", "--lr", "3e-3",
         "--lr-warmup-iters", "1", "--init-method-std", "0.1", "--eval-iters", "0", "--log-interval", "1",
         "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
ROUTERS = {"learned": [], "query_norm": ["--moh-router", "query_norm"]}
TEXTS = ["def f(x):\n    return x  # the identity", "Return a new  list, with\tthe items 12345."]
MC_DOCS = [
    {"question": "The keyword that defines a function is", "choices": ["def", "banana", "return", "xyz"], "answer": 0},
    {"question": "Return the number of items in a", "choices": ["list", "sky", "blue", "seven"], "answer": 0},
    {"question": "Raise an exception if the value is", "choices": ["invalid", "tree", "12", "sun"], "answer": 2},
]
TASK = "moh_tiny_choice"
# lm-evaluation-harness (with accelerate, which its "hf" model needs) is a test extra.
HAVE_LM_EVAL = all(importlib.util.find_spec(name) for name in ("lm_eval", "accelerate"))

LOADER = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    job = json.load(open(sys.argv[1]))
    ids = torch.load(job["ids"])
    results = {}
    for name, directory in job["models"].items():
        out = results[name] = {}
        for impl in ("sdpa", "eager"):
            model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                         attn_implementation=impl).eval()
            with torch.no_grad():
                out[impl] = model(ids).logits
        out["cls"] = type(model).__name__
        out["cached"] = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = ids[:1, :8]
        for _ in range(8):
            with torch.no_grad():
                step = model(uncached, use_cache=False).logits[:, -1:].argmax(-1)
            uncached = torch.cat([uncached, step], dim=1)
        out["uncached"] = uncached
        tokenizer = AutoTokenizer.from_pretrained(directory)
        out["token_ids"] = [tokenizer.encode(t, add_special_tokens=False) for t in job["texts"]]
    results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "megatron_moh"))
    if not job["task"]:
        torch.save(results, job["out"]); sys.exit()
    import lm_eval
    from lm_eval.tasks import TaskManager
    scored = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={job['lm_eval_model']},trust_remote_code=True,dtype=float32,add_bos_token=True",
        tasks=[job["task"]], task_manager=TaskManager(include_path=job["task_dir"]), log_samples=True,
        batch_size=1, device="cpu")
    results["lm_eval"] = dict(
        acc=scored["results"][job["task"]]["acc,none"],
        samples=[dict(target=s["target"], requests=[list(a) for a in s["arguments"]],
                      loglikelihoods=[r[0] for r in s["filtered_resps"]])
                 for s in sorted(scored["samples"][job["task"]], key=lambda s: s["doc_id"])])
    torch.save(results, job["out"])
''')


def tool(*argv):
    """tools/convert_checkpoint.py in this process; returns its exit message (None on success).
    The tool sets the single-process rank variables; they are put back afterwards."""
    env = dict(os.environ)
    try:
        convert_checkpoint.main([str(a) for a in argv])
    except SystemExit as exit_:
        return str(exit_.code)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The built-in corpus with a small (512-piece) sentencepiece tokenizer."""
    from megatron_moh.data.corpus import prepare_builtin_dataset

    return prepare_builtin_dataset(cache_dir=str(tmp_path_factory.mktemp("corpus")), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A TP=2 x PP=2 checkpoint per router kind, from pretrain_moh.py on real text."""
    prefix, tokenizer = data
    saved = {}
    for name, flags in ROUTERS.items():
        root = tmp_path_factory.mktemp(f"ckpt-{name}")
        launch(run_worker, 4, [*TRAIN, *flags, "--data-path", prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
                               "--tokenizer-model", tokenizer, "--save", str(root), "--save-interval", "3"],
               timeout=600)
        saved[name] = root
    return saved


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    """Each checkpoint exported by the tool and loaded back in one fresh process, with megatron's
    own logits (the checkpoint loaded whole in this process) to compare against."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.save(ids, root / "ids.pt")
    expected, models = {}, {}
    for name, ckpt in trained.items():
        assert tool("export-hf", "--load", ckpt, "--out", root / name) is None
        models[name] = str(root / name)
        with single_process_group():
            model, _ = load_model(ckpt)
            expected[name] = megatron_logits(model, ids)
    task_dir = root / "tasks"
    task_dir.mkdir()
    (task_dir / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in MC_DOCS))
    (task_dir / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {task_dir / 'docs.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    job = dict(ids=str(root / "ids.pt"), models=models, texts=TEXTS, out=str(root / "results.pt"),
               lm_eval_model=models["learned"], task=TASK if HAVE_LM_EVAL else None, task_dir=str(task_dir))
    results = run_offline(LOADER, job, root, timeout=900)
    return dict(root=root, ids=ids, expected=expected, results=results, models=models)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_exported_logits_equal_megatron(exported, router):
    result = exported["results"][router]
    assert result["cls"] == "MoHLlamaForCausalLM"
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(result[impl], exported["expected"][router], **TOL)


def test_export_is_a_self_contained_moh_llama_directory(exported, trained):
    directory = Path(exported["models"]["learned"])
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "moh_llama" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 4
    assert (config["moh_router"], config["moh_num_shared_heads"], config["moh_topk"]) == ("learned", 4, 2)
    for name in ("configuration_moh.py", "modeling_moh.py", "model.safetensors", "generation_config.json",
                 "tokenizer.json"):
        assert (directory / name).is_file(), name
    assert exported["results"]["imported"] == []  # the loader never needed megatron
    umask = os.umask(0)
    os.umask(umask)  # shared as save_pretrained shares: the user's umask, not a private scratch directory's 0700
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {path.stat().st_mode & 0o777 for path in directory.iterdir()} == {0o666 & ~umask}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_cached_greedy_generation_equals_uncached(exported, router):
    result = exported["results"][router]
    assert torch.equal(result["cached"], result["uncached"])


def test_exported_tokenizer_has_the_runs_sentencepiece_ids(exported, data):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=data[1])
    assert exported["results"]["learned"]["token_ids"] == [processor.encode(t) for t in TEXTS]


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="needs lm-eval and accelerate (pip install -e '.[test]')")
def test_lm_eval_scores_the_export_as_megatron_does(exported, trained):
    """lm-evaluation-harness's log-likelihood of every choice equals the sum of megatron's token
    log-probabilities for the same tokens, and its accuracy follows from them."""
    from transformers import AutoTokenizer

    scored = exported["results"]["lm_eval"]
    # as lm-eval loads it for add_bos_token=True
    tokenizer = AutoTokenizer.from_pretrained(exported["models"]["learned"], add_bos_token=True)
    correct = 0
    with single_process_group():
        model, _ = load_model(trained["learned"])
        for doc, sample in zip(MC_DOCS, scored["samples"]):
            assert sample["target"] == doc["answer"] and len(sample["requests"]) == len(doc["choices"])
            ours = []
            for context, continuation in sample["requests"]:
                context_ids = tokenizer.encode(context, add_special_tokens=True)
                whole = tokenizer.encode(context + continuation, add_special_tokens=True)
                tokens = torch.tensor([whole])
                logprobs = torch.log_softmax(megatron_logits(model, tokens[:, :-1]).double(), dim=-1)[0]
                targets = whole[len(context_ids):]
                positions = range(len(context_ids) - 1, len(whole) - 1)
                ours.append(sum(logprobs[p, t].item() for p, t in zip(positions, targets)))
            assert sample["loglikelihoods"] == pytest.approx(ours, abs=1e-4)
            correct += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert scored["acc"] == pytest.approx(correct / len(MC_DOCS))


@pytest.mark.parametrize("router", list(ROUTERS))
def test_megatron_hf_megatron_round_trip_is_bit_identical(router, exported, trained, tmp_path):
    back = tmp_path / "back"
    assert tool("import-hf", "--hf", exported["models"][router], "--out", back) is None
    with single_process_group():
        original, original_args = load_model(trained[router])
        again, again_args = load_model(back)
    before, after = original.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(after[key], tensor), key
    assert checkpoint.compare_model_args(original_args, again_args) == []


# --------------------------------------------------------------------------------------------
# A Llama made by transformers, brought in for continue-tuning

LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=SEQ, rms_norm_eps=1e-5, initializer_range=0.1)
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random transformers LlamaForCausalLM saved with save_pretrained, and its logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():  # norms start at 1; make them matter too
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        return directory, ids, model(ids).logits


@pytest.fixture(scope="module")
def imported_dense(tmp_path_factory, llama):
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    assert tool("import-hf", "--hf", llama[0], "--out", out, "--layout", "dense",
                "--tensor-model-parallel-size", "2") is None
    return out


def test_llama_imported_with_every_head_shared_keeps_its_logits(imported_dense, llama):
    _, ids, reference = llama
    assert checkpoint.find_checkpoint(imported_dense) == ("release", imported_dense / "release")
    with single_process_group():
        model, args = load_model(imported_dense)
    assert (args.moh_num_shared_heads, args.moh_topk, args.tensor_model_parallel_size) == (8, 0, 2)
    torch.testing.assert_close(megatron_logits(model, ids), reference, **TOL)


def test_imported_llama_continues_training_with_finetune(imported_dense, tmp_path):
    """pretrain_moh.py --load <import> --finetune, with the flags the tool prints, at TP=2 starts from
    the Llama's weights: after two steps every weight is within a few learning rates of them (a
    fresh init would be ~0.1 away)."""
    tuned = tmp_path / "tuned"
    flags = finetune_flags(checkpoint.read_checkpoint_args(imported_dense))
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == "2"
    tokenizer_flags = flags[flags.index("--tokenizer-type"):][:4]
    assert tokenizer_flags == ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]
    results = launch(run_worker, 2, [
        *flags, "--mock-data", "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "2", "--lr", "1e-3", "--lr-warmup-iters", "0", "--eval-iters", "0", "--log-interval", "1",
        "--load", str(imported_dense), "--finetune", "--save", str(tuned), "--save-interval", "2"], timeout=600)
    assert "loading release distributed checkpoint" in results[0]["out"]
    assert {it for it, _ in results[-1]["losses"]} == {0, 1}
    with single_process_group():
        start, _ = load_model(imported_dense)
        end, _ = load_model(tuned)
    assert checkpoint.find_checkpoint(tuned)[0] == 2
    moved = {k: (end.state_dict()[k] - v).abs().max().item() for k, v in start.state_dict().items()
             if not k.endswith("_extra_state")}
    assert max(moved.values()) < 0.01 and max(moved.values()) > 0, moved


def test_published_layout_import_matches_transformers(llama, tmp_path):
    """--layout published: the MoH-LLaMA3 recipe's layout on plain Llama weights, as the published
    checkpoints are; megatron's logits equal the Hugging Face MoH-Llama's with the same layout."""
    from megatron_moh.hf import MoHLlamaForCausalLM
    from megatron_moh.conversion.hf_configs import moh_config_from_llama
    from megatron_moh.conversion.hf_files import load_hf_config, load_hf_state_dict

    directory, ids, dense_logits = llama
    assert tool("import-hf", "--hf", directory, "--out", tmp_path / "ckpt", "--layout", "published") is None
    with single_process_group():
        model, args = load_model(tmp_path / "ckpt")
    assert (args.moh_num_shared_heads, args.moh_topk, args.moh_router, args.moh_gate) == (4, 2, "query_norm", "binary")
    hf = MoHLlamaForCausalLM(moh_config_from_llama(load_hf_config(directory), "published")).eval()
    hf.load_state_dict(load_hf_state_dict(directory), strict=True)
    with torch.no_grad():
        expected = hf(ids).logits
    logits = megatron_logits(model, ids)
    torch.testing.assert_close(logits, expected, **TOL)
    assert (logits - dense_logits).abs().max() > 1e-3  # routing dropped heads


# --------------------------------------------------------------------------------------------
# The Llama family through the tool: Qwen3 (q/k norms), Qwen2 (q/k/v biases), Llama-3.2-1B style
# (tied embeddings, Llama-3.1 RoPE scaling)

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
FAMILY = {
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, head_dim=8)),
    "qwen2": ("qwen2", {}),
    "llama-3.2": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=16384)),
}
# What the flags that finetune_flags prints must set as the imported checkpoint recorded.
FAMILY_FIELDS = ("qk_layernorm", "add_qkv_bias", "use_rope_scaling", "rope_scaling_factor", "rotary_base",
                 "untie_embeddings_and_output_weights", "num_query_groups", "kv_channels")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Each model saved by transformers, imported by the tool with every head shared at TP=2, and its
    logits at 64 positions (far enough for the RoPE scaling to matter)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    imported = {}
    for i, (name, (model_type, fields)) in enumerate(FAMILY.items()):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**LLAMA, **fields})).eval()
        with torch.no_grad():  # norms start at 1 and biases at 0; make them matter too
            for param_name, param in model.named_parameters():
                if param_name.endswith(("norm.weight", ".bias")):
                    param.uniform_(0.5, 1.5)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "hf")
        assert tool("import-hf", "--hf", root / "hf", "--out", root / "ckpt", "--layout", "dense",
                    "--tensor-model-parallel-size", "2") is None
        ids = torch.randint(0, VOCAB, (2, SEQ))
        with torch.no_grad():
            imported[name] = root, ids, model(ids).logits
    return imported


@pytest.mark.parametrize("name", list(FAMILY))
def test_llama_family_imports_exports_and_prints_its_flags(name, family):
    """transformers -> megatron (every head shared) -> MoH-Llama keeps the logits, and the printed
    flags rebuild the imported model's settings."""
    from megatron_moh.arguments import parse_megatron_args
    from megatron_moh.hf import MoHLlamaForCausalLM

    root, ids, reference = family[name]
    with single_process_group():
        model, saved = load_model(root / "ckpt")
    torch.testing.assert_close(megatron_logits(model, ids), reference, **TOL)
    flags = parse_megatron_args(finetune_flags(saved), validate=False)
    assert {f: checkpoint.effective_arg(flags, f) for f in FAMILY_FIELDS} == {
        f: checkpoint.effective_arg(saved, f) for f in FAMILY_FIELDS}
    assert tool("export-hf", "--load", root / "ckpt", "--out", root / "moh") is None
    exports = {"moh": MoHLlamaForCausalLM.from_pretrained(root / "moh").eval()}
    dense = tool("export-hf", "--load", root / "ckpt", "--out", root / "dense", "--dense")
    if name == "llama-3.2":  # tied embeddings and Llama-3.1 RoPE scaling are plain Llama's too
        from transformers import LlamaForCausalLM

        assert dense is None
        exports["dense"] = LlamaForCausalLM.from_pretrained(root / "dense").eval()
    else:
        assert "a plain Llama has no" in _one_line(dense) and "export it without --dense" in dense
    for kind, exported in exports.items():
        with torch.no_grad():
            torch.testing.assert_close(exported(ids).logits, reference, **TOL, msg=lambda m, kind=kind: f"{kind}: {m}")


def test_qwen3_import_continues_training_at_tp2(family, tmp_path):
    """--qk-layernorm at TP=2 trains from the imported weights with the printed flags."""
    root = family["qwen3"][0]
    flags = finetune_flags(checkpoint.read_checkpoint_args(root / "ckpt"))
    assert "--qk-layernorm" in flags and "--tie-embeddings-and-output-weights" in flags
    results = launch(run_worker, 2, [
        *flags, "--mock-data", "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "2", "--lr", "1e-3", "--lr-warmup-iters", "0", "--eval-iters", "0", "--log-interval", "1",
        "--load", str(root / "ckpt"), "--finetune", "--save", str(tmp_path), "--save-interval", "2"], timeout=600)
    assert {it for it, _ in results[-1]["losses"]} == {0, 1}
    with single_process_group():
        start, _ = load_model(root / "ckpt")
        end, _ = load_model(tmp_path)
    moved = {k: (end.state_dict()[k] - v).abs().max().item() for k, v in start.state_dict().items()
             if "layernorm" in k}
    assert any(key.endswith("q_layernorm.weight") for key in moved) and 0 < max(moved.values()) < 0.01, moved


# --------------------------------------------------------------------------------------------
# Bad input: one line, before any work, nothing overwritten


def _one_line(message):
    return assert_one_line_refusal(message, convert_checkpoint.PROG)


def test_existing_output_is_never_overwritten_without_overwrite(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in _one_line(tool("export-hf", "--load", trained["learned"], "--out", out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert tool("export-hf", "--load", trained["learned"], "--out", out, "--overwrite") is None
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_dense_export_of_a_routed_model_is_refused(trained, tmp_path):
    message = _one_line(tool("export-hf", "--load", trained["learned"], "--out", tmp_path / "dense", "--dense"))
    assert "only a dense model exports as plain Llama" in message
    assert not (tmp_path / "dense").exists()


@pytest.mark.parametrize("case,expected", [
    ("no-checkpoint", "does not exist"),
    ("no-hf-dir", "config.json does not exist"),
    ("foreign-model", "only 'llama', 'qwen2', 'qwen3' and 'moh_llama' checkpoints import"),
    ("no-layout", "choose its MoH layout with --layout"),
    ("custom-incomplete", "--layout custom needs --moh-num-shared-heads and --moh-topk"),
    ("tp-too-large", "cannot run at TP=3"),
    ("pp-not-dividing", "PP=3 does not divide"),
])
def test_bad_conversion_input_is_one_line(case, expected, llama, tmp_path):
    out = tmp_path / "out"
    llama_dir = str(llama[0])
    if case == "foreign-model":
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    argv = {
        "no-checkpoint": ["export-hf", "--load", tmp_path / "nothing", "--out", out],
        "no-hf-dir": ["import-hf", "--hf", tmp_path / "nothing", "--out", out],
        "foreign-model": ["import-hf", "--hf", tmp_path / "gpt2", "--out", out],
        "no-layout": ["import-hf", "--hf", llama_dir, "--out", out],
        "custom-incomplete": ["import-hf", "--hf", llama_dir, "--out", out, "--layout", "custom", "--moh-topk", "2"],
        "tp-too-large": ["import-hf", "--hf", llama_dir, "--out", out, "--layout", "dense",
                         "--tensor-model-parallel-size", "3"],
        "pp-not-dividing": ["import-hf", "--hf", llama_dir, "--out", out, "--layout", "dense",
                            "--pipeline-model-parallel-size", "3"],
    }[case]
    assert expected in _one_line(tool(*argv))
    assert not out.exists()
