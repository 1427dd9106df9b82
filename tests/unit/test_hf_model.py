"""The Hugging Face MoH-Llama against megatron: exported logits, imported Llamas, generation.

Exports are loaded in ONE fresh subprocess (``trust_remote_code=True``, ``HF_HUB_OFFLINE=1``, a
private HF_HOME), the way a user would load them, so the copied modeling files are what runs.
"""

import io
import inspect
import json
import textwrap

import pytest
import torch

from megatron_moh.conversion.hf_configs import moh_config_from_llama, moh_hf_config
from megatron_moh.conversion.hf_files import import_hf_checkpoint, save_dense_hf_checkpoint, save_hf_checkpoint
from megatron_moh.conversion.weights import megatron_to_hf
from megatron_moh.layout import MoHLayout
from megatron_moh.model import build_gpt_model, llama_moh_config
from megatron_moh.hf import MoHLlamaConfig, MoHLlamaForCausalLM
from tests.helpers import tiny_config
from tests.hf_support import VARIANTS, megatron_logits, run_offline, transformers_floor

VOCAB, MAX_SEQ, SEQ, BATCH = 384, 64, 12, 2  # the vocabulary of the sentencepiece tokenizer below
TOL = dict(rtol=0, atol=1e-5)
# A larger init than the default 0.02 so that routing and attention patterns are far from uniform
# and a wrong gate shows up well above the tolerance.
STD = 0.1
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
LONG_CONTEXT = 16384  # above the 8192 original positions, as in the real models (transformers warns otherwise)
TOKENIZER_SAMPLES = ["Hello  world,\n\tthree   spaces 12345", "  def f(x):\n    return x  # ünïcödé"]

LOADER = textwrap.dedent('''
    import json, sys, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    job = json.load(open(sys.argv[1]))
    ids = torch.load(job["ids"])
    results = {"transformers": transformers.__version__}
    for name, spec in job["models"].items():
        per_impl = {}
        for impl in ("sdpa", "eager"):
            model = AutoModelForCausalLM.from_pretrained(
                spec["dir"], trust_remote_code=spec["remote"], attn_implementation=impl).eval()
            with torch.no_grad():
                per_impl[impl] = model(ids).logits
        results[name] = dict(per_impl, cls=type(model).__name__)
        if spec.get("generate"):
            results[name]["generated"] = model.generate(ids, max_new_tokens=6, do_sample=False)
        if spec.get("tokenizer"):
            tok = AutoTokenizer.from_pretrained(spec["dir"])
            results[name]["token_ids"] = [tok.encode(s, add_special_tokens=False) for s in job["texts"]]
            results[name]["decoded"] = [tok.decode(tok.encode(s, add_special_tokens=False)) for s in job["texts"]]
            results[name]["special"] = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                        model.config.eos_token_id, model.config.pad_token_id]
    results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "megatron_moh"))
    torch.save(results, job["out"])
''')


def _train_sentencepiece(path):
    import sentencepiece as spm

    lines = [line for line in inspect.getsource(inspect).splitlines() if line.strip()]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        eos_piece="</s>", num_threads=1, minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def _random_llama(seed=0, model_type="llama", **overrides):
    """A random transformers Llama-family model (``model_type`` llama, qwen2 or qwen3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=MAX_SEQ,
                  rms_norm_eps=1e-5, initializer_range=STD, attn_implementation="eager")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**fields, **overrides})).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; make them matter too
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    return model


def _import_into_megatron(checkpoint, layout):
    imported = import_hf_checkpoint(checkpoint, layout)
    cfg = llama_moh_config(**imported.config_kwargs)
    model = build_gpt_model(cfg, **imported.model_kwargs).eval()
    model.load_state_dict(imported.state_dict, strict=True)
    return cfg, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Megatron models exported to Hugging Face and loaded back in one fresh process."""
    root = tmp_path_factory.mktemp("hf-export")
    torch.manual_seed(123)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    torch.save(ids, root / "ids.pt")
    expected, models = {}, {}
    processor = _train_sentencepiece(root / "tokenizer.model")
    for i, (name, fields) in enumerate(VARIANTS.items()):
        cfg = tiny_config(**fields, init_method_std=STD)
        torch.manual_seed(i)
        model = build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=MAX_SEQ).eval()
        expected[name] = megatron_logits(model, ids)
        tokenizer = root / "tokenizer.model" if i == 0 else None
        out = save_hf_checkpoint(root / name, megatron_to_hf(model.state_dict(), cfg),
                                    moh_hf_config(cfg, VOCAB, MAX_SEQ), tokenizer_model_path=tokenizer)
        models[name] = dict(dir=str(out), remote=True, generate=i == 0, tokenizer=tokenizer is not None)

    # The Llama-family options (q/k norms, q/k/v biases, Llama-3.1 RoPE scaling, tied embeddings) with
    # the query-norm router, which routes on the queries before the q-norm.
    cfg = tiny_config(moh_router="query_norm", qk_layernorm=True, add_qkv_bias=True, init_method_std=STD)
    torch.manual_seed(7)
    model = build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=LONG_CONTEXT, rotary_base=500000,
                            share_embeddings_and_output_weights=True, rope_scaling=True, rope_scaling_factor=8.0)
    with torch.no_grad():  # q/k norms start at 1 and biases at 0: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("q_layernorm.weight", "k_layernorm.weight", "linear_qkv.bias")):
                param.uniform_(0.5, 1.5)
    expected["llama-family"] = megatron_logits(model.eval(), ids)
    hf_cfg = moh_hf_config(cfg, VOCAB, LONG_CONTEXT, rotary_base=500000, tie_embeddings=True, rope_scaling_factor=8.0)
    out = save_hf_checkpoint(root / "llama-family", megatron_to_hf(model.state_dict(), cfg), hf_cfg)
    models["llama-family"] = dict(dir=str(out), remote=True)

    # A plain Llama through megatron (every head shared) and back out as a plain Llama.
    llama = _random_llama()
    llama.save_pretrained(root / "llama-in")
    cfg, model = _import_into_megatron(root / "llama-in", "dense")
    expected["dense"] = megatron_logits(model, ids)
    hf_cfg = moh_hf_config(cfg, VOCAB, MAX_SEQ)
    out = save_dense_hf_checkpoint(root / "dense", megatron_to_hf(model.state_dict(), cfg), hf_cfg)
    models["dense"] = dict(dir=str(out), remote=False)

    job = dict(ids=str(root / "ids.pt"), models=models, out=str(root / "results.pt"), texts=TOKENIZER_SAMPLES)
    results = run_offline(LOADER, job, root)
    return dict(root=root, ids=ids, expected=expected, results=results, processor=processor, models=models, job=job)


@pytest.mark.slow
def test_loader_process_never_imported_megatron(exported):
    assert exported["results"]["imported"] == []


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_logits_equal_megatron(exported, name):
    result = exported["results"][name]
    assert result["cls"] == "MoHLlamaForCausalLM"
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(result[impl], exported["expected"][name], **TOL)


def test_llama_family_export_gives_megatron_logits(exported):
    result = exported["results"]["llama-family"]
    assert result["cls"] == "MoHLlamaForCausalLM"
    config = json.loads((exported["root"] / "llama-family" / "config.json").read_text())
    assert (config["moh_qk_norm"], config["moh_qkv_bias"], config["tie_word_embeddings"]) == (True, True, True)
    assert config["rope_parameters"] == LLAMA3_ROPE
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(result[impl], exported["expected"]["llama-family"], **TOL)


def test_dense_export_is_plain_llama_with_the_same_logits(exported):
    result = exported["results"]["dense"]
    assert result["cls"] == "LlamaForCausalLM"
    assert not list((exported["root"] / "dense").glob("*.py"))
    config = json.loads((exported["root"] / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(result[impl], exported["expected"]["dense"], **TOL)


def test_remote_code_generation_matches_in_process(exported):
    name = next(iter(VARIANTS))
    model = MoHLlamaForCausalLM.from_pretrained(exported["models"][name]["dir"]).eval()
    local = model.generate(exported["ids"], max_new_tokens=6, do_sample=False)
    assert torch.equal(exported["results"][name]["generated"], local)


def test_exported_tokenizer_has_sentencepiece_ids(exported):
    result = exported["results"][next(iter(VARIANTS))]
    processor = exported["processor"]
    assert result["token_ids"] == [processor.encode(s) for s in TOKENIZER_SAMPLES]
    assert result["decoded"] == TOKENIZER_SAMPLES
    assert result["special"] == [1, 2, 3, 2, 3]


@pytest.mark.slow
def test_exports_work_on_the_oldest_declared_transformers(exported, tmp_path):
    """The same exports, loaded by the oldest transformers that setup.py admits (installed beside
    the venv by setup.sh --test): the same logits, generations and tokenizer ids. Before 5.24,
    transformers' own conversion of a bare sentencepiece model dropped its dummy-prefix piece."""
    floor, path = transformers_floor()
    results = run_offline(LOADER, {**exported["job"], "out": str(tmp_path / "floor.pt")}, tmp_path, pythonpath=path)
    assert results["transformers"] == floor
    first = next(iter(VARIANTS))
    assert results[first]["token_ids"] == exported["results"][first]["token_ids"]
    assert results[first]["decoded"] == TOKENIZER_SAMPLES
    assert results[first]["special"] == [1, 2, 3, 2, 3]
    assert torch.equal(results[first]["generated"], exported["results"][first]["generated"])
    for name in exported["models"]:
        for impl in ("sdpa", "eager"):
            torch.testing.assert_close(results[name][impl], exported["expected"][name], **TOL)


# --------------------------------------------------------------------------------------------
# Plain Llama -> megatron, in process


@pytest.mark.parametrize("layout", [
    "dense",
    MoHLayout(num_shared_heads=8, topk=0, router="learned", gate="binary"),
    # Zero router, 8 shared heads: gates 8 * softmax(0) = 8 * 0.125 = 1 exactly.
    MoHLayout(num_shared_heads=8, topk=0, router="learned", gate="weighted"),
])
def test_all_shared_import_of_a_llama_gives_its_logits(layout):
    llama = _random_llama(seed=1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        reference = llama(ids).logits
    _, model = _import_into_megatron((llama.state_dict(), llama.config), layout)
    torch.testing.assert_close(megatron_logits(model, ids), reference, **TOL)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_published_layout_import_agrees_between_megatron_and_hf(model_type):
    """With Qwen3's q/k norms both sides route on the queries before the q-norm."""
    llama = _random_llama(seed=2, model_type=model_type, tie_word_embeddings=True)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    cfg, model = _import_into_megatron((llama.state_dict(), llama.config), "published")
    assert (cfg.moh_num_shared_heads, cfg.moh_topk, cfg.moh_router, cfg.moh_gate) == (4, 2, "query_norm", "binary")
    hf_cfg = moh_config_from_llama(llama.config, "published")
    assert (hf_cfg.moh_num_shared_heads, hf_cfg.moh_topk, hf_cfg.tie_word_embeddings) == (4, 2, True)
    assert (hf_cfg.moh_qkv_bias, hf_cfg.moh_qk_norm) == (model_type == "qwen2", model_type == "qwen3")
    moh = MoHLlamaForCausalLM(hf_cfg).eval()
    moh.load_state_dict(llama.state_dict(), strict=True)
    with torch.no_grad():
        hf_logits, dense_logits = moh(ids).logits, llama(ids).logits
    torch.testing.assert_close(megatron_logits(model, ids), hf_logits, **TOL)
    assert (hf_logits - dense_logits).abs().max() > 1e-3  # routing really dropped heads


# --------------------------------------------------------------------------------------------
# The Llama family: each option on a tiny random transformers model, imported with every head shared

# name: (model_type, config fields, what megatron builds: qk_layernorm, add_qkv_bias, tied, RoPE scaling factor)
FAMILY = {
    "llama-3.1-rope-scaling": ("llama", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=LONG_CONTEXT),
                               (False, False, False, 8.0)),
    "llama-3.2-1b-style": ("llama", dict(rope_parameters=dict(LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
                                         max_position_embeddings=LONG_CONTEXT), (False, False, True, 32.0)),
    "qwen2-qkv-bias": ("qwen2", {}, (False, True, False, None)),
    "qwen3-qk-norm": ("qwen3", dict(tie_word_embeddings=True), (True, False, True, None)),
}
# Positions far enough that Llama-3.1 scaling of the slow RoPE frequencies moves the logits (by ~0.08).
FAMILY_SEQ = 64


@pytest.mark.parametrize("name", list(FAMILY))
def test_llama_family_import_with_every_head_shared_gives_transformers_logits(name, tmp_path):
    model_type, fields, expected = FAMILY[name]
    hf_model = _random_llama(seed=4, model_type=model_type, **fields)
    hf_model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (BATCH, FAMILY_SEQ))
    with torch.no_grad():
        reference = hf_model(ids).logits
    imported = import_hf_checkpoint(tmp_path, "dense")
    cfg, model = _import_into_megatron(tmp_path, "dense")
    factor = imported.model_kwargs.get("rope_scaling_factor") if imported.model_kwargs.get("rope_scaling") else None
    assert (cfg.qk_layernorm, cfg.add_qkv_bias, model.share_embeddings_and_output_weights, factor) == expected
    torch.testing.assert_close(megatron_logits(model, ids), reference, **TOL)


# --------------------------------------------------------------------------------------------
# The Hugging Face model on its own: cache, attention interfaces, padding


def _hf_model(variant, impl="sdpa", seed=0, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=MAX_SEQ,
                  initializer_range=STD, pad_token_id=0, eos_token_id=None, attn_implementation=impl)
    config = MoHLlamaConfig(**{**fields, **VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    return MoHLlamaForCausalLM(config).eval()


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


# MoH-Llama's Llama-family options, all at once.
HF_FAMILY = dict(moh_qk_norm=True, moh_qkv_bias=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=LONG_CONTEXT)


@pytest.mark.parametrize("variant,family", [(variant, False) for variant in VARIANTS] + [("query_norm-binary", True)])
def test_cached_generation_equals_recomputation_and_interfaces_agree(variant, family):
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (BATCH, 7))
    options = HF_FAMILY if family else {}
    sdpa, eager = _hf_model(variant, "sdpa", **options), _hf_model(variant, "eager", **options)
    cached = sdpa.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(cached, _greedy_without_cache(sdpa, ids, 10))
    assert torch.equal(cached, eager.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(cached).logits, eager(cached).logits, **TOL)


@pytest.mark.parametrize("variant", ["learned-weighted-2stage", "query_norm-binary"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padding_changes_nothing(variant, impl):
    model = _hf_model(variant, impl)
    torch.manual_seed(6)
    long, short = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0], model(long).logits[0], **TOL)
        torch.testing.assert_close(padded[1, 4:], model(short).logits[0], **TOL)
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[1, 4:], alone[0])
    assert torch.equal(generated[0], model.generate(long, max_new_tokens=6, do_sample=False)[0])


def test_sparse_attention_equals_dense_and_gates_change_the_logits():
    """Two kernels (head-sparse and dense attention): equal within the fp32 tolerance TOL, not
    bitwise; and replacing the router's gates by ones moves the logits far beyond it."""
    model = _hf_model("learned-weighted-2stage")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        logits = model(ids).logits
        sparse = _hf_model("learned-weighted-2stage", moh_attention_impl="sparse")
        torch.testing.assert_close(sparse(ids).logits, logits, **TOL)
        for layer in model.model.layers:
            layer.self_attn.head_gates = lambda hidden, query: torch.ones(*query.shape[:-1])
        assert (model(ids).logits - logits).abs().max() > 1e-3
