"""The Hugging Face MoH-Llama's head-sparse attention (moh_attention_impl='sparse') against the
dense path with the same weights: prefill logits, cached greedy generation, left padding, both
attention interfaces, both routers and both gate kinds.

Tolerance: fp32, rtol=0, atol=1e-5 on logits (observed: a prefill with sdpa is bitwise equal, the
rest within about 2e-6); generated tokens must be identical.
"""

import textwrap

import pytest
import torch

from megatron_moh.conversion.hf_files import save_hf_checkpoint
from megatron_moh.hf import MoHLlamaConfig, MoHLlamaForCausalLM
from megatron_moh.hf import modeling_moh
from megatron_moh.hf.configuration_moh import skipped_attention, sparse_pays
from tests.hf_support import VARIANTS, run_offline

VOCAB, MAX_SEQ, STD = 128, 64, 0.1
TOL = dict(rtol=0, atol=1e-5)
IMPLS = ("sdpa", "eager")


def _config(variant, attn, moh_attention_impl, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=MAX_SEQ,
                  initializer_range=STD, pad_token_id=0, eos_token_id=None)
    return MoHLlamaConfig(**{**fields, **overrides}, attn_implementation=attn,
                          moh_attention_impl=moh_attention_impl, **VARIANTS[variant])


def _pair(variant, attn, seed=0, **overrides):
    """A dense and a sparse model with the same weights."""
    torch.manual_seed(seed)
    dense = MoHLlamaForCausalLM(_config(variant, attn, "dense", **overrides)).eval()
    sparse = MoHLlamaForCausalLM(_config(variant, attn, "sparse", **overrides)).eval()
    sparse.load_state_dict(dense.state_dict(), strict=True)
    return dense, sparse


def _generate(model, ids, steps=8, **kwargs):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


class _Calls:
    """Per call of an attention layer, ``(query heads, key/value heads, keys)`` of each
    torch.nn.functional.scaled_dot_product_attention call it made."""

    def __init__(self, monkeypatch):
        self.layers = []
        sdpa, attend = torch.nn.functional.scaled_dot_product_attention, modeling_moh.MoHLlamaAttention.attend

        def counting(query, key, *args, **kwargs):
            self.layers[-1].append((query.shape[1], key.shape[1], key.shape[2]))
            return sdpa(query, key, *args, **kwargs)

        def marking(module, *args, **kwargs):
            self.layers.append([])
            return attend(module, *args, **kwargs)

        monkeypatch.setattr(modeling_moh.F, "scaled_dot_product_attention", counting)
        monkeypatch.setattr(modeling_moh.MoHLlamaAttention, "attend", marking)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_cached_generation_equal_dense(variant, attn):
    dense, sparse = _pair(variant, attn)
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, **TOL)
    tokens, logits = _generate(sparse, ids)
    dense_tokens, dense_logits = _generate(dense, ids)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, **TOL)
    with torch.no_grad():  # and the whole generated sequence in one prefill
        torch.testing.assert_close(sparse(tokens).logits, dense(tokens).logits, **TOL)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_equals_each_sequence_alone(variant, attn):
    dense, sparse = _pair(variant, attn, seed=2)
    torch.manual_seed(3)
    long, short = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        padded = sparse(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0], dense(long).logits[0], **TOL)
        torch.testing.assert_close(padded[1, 4:], dense(short).logits[0], **TOL)
        torch.testing.assert_close(padded[1, 4:], dense(batch, attention_mask=mask).logits[1, 4:], **TOL)
    tokens, logits = _generate(sparse, batch, attention_mask=mask)
    dense_tokens, dense_logits = _generate(dense, batch, attention_mask=mask)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, **TOL)
    alone_short, logits_short = _generate(sparse, short)
    alone_long, logits_long = _generate(sparse, long)
    assert torch.equal(tokens[1, 4:], alone_short[0]) and torch.equal(tokens[0], alone_long[0])
    torch.testing.assert_close(logits[1], logits_short[0], **TOL)
    torch.testing.assert_close(logits[0], logits_long[0], **TOL)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("layout", [
    dict(num_key_value_heads=8),  # multi-head attention: one query head per lane
    dict(num_key_value_heads=1, moh_num_shared_heads=3, moh_topk=3),  # shared heads inside a group
    dict(num_key_value_heads=2, moh_num_shared_heads=0, moh_topk=2),  # no shared head
], ids=["mha", "mqa-3shared", "no-shared"])
def test_other_head_layouts_equal_dense(layout, attn):
    dense, sparse = _pair("query_norm-binary", attn, seed=4, **layout)
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, dict(attention_mask=mask)):
            torch.testing.assert_close(sparse(ids, **kwargs).logits[:, 3:], dense(ids, **kwargs).logits[:, 3:], **TOL)
    tokens, logits = _generate(sparse, ids, attention_mask=mask)
    dense_tokens, dense_logits = _generate(dense, ids, attention_mask=mask)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, **TOL)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("attn", IMPLS)
def test_decoding_reads_only_the_chosen_heads(attn, cache, monkeypatch):
    """Multi-head layout, one sequence: a decoding step's attention calls cover exactly the shared
    heads and the topk heads the token chose, query heads and key/value heads alike (the other
    heads' cache is not read), with a dynamic cache and with a static one."""
    _, sparse = _pair("learned-binary", attn, seed=6, num_key_value_heads=8)
    config = sparse.config
    calls = _Calls(monkeypatch)
    sparse.generate(torch.randint(1, VOCAB, (1, 7)), max_new_tokens=3, do_sample=False, use_cache=True,
                    cache_implementation=cache)
    decoding = calls.layers[config.num_hidden_layers:]  # after the prefill's layers
    assert len(decoding) == 2 * config.num_hidden_layers
    active = config.moh_num_shared_heads + config.moh_topk
    for layer in decoding:
        assert sum(q for q, _, _ in layer) == sum(kv for _, kv, _ in layer) == active, layer


def test_sparse_training_forward_and_backward_match_dense():
    """Training through the sparse impl, with a sequence longer than a prompt block."""
    dense, sparse = _pair("learned-weighted-2stage", "sdpa", seed=7, max_position_embeddings=512)
    dense.train()
    sparse.train()
    ids = torch.randint(1, VOCAB, (2, 300))
    dense(ids, labels=ids).loss.backward()
    sparse(ids, labels=ids).loss.backward()
    grads = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, **TOL, msg=name)


LOADER = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    job = json.load(open(sys.argv[1]))
    ids = torch.load(job["ids"])
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True).eval()
    assert model.config.moh_attention_impl == "sparse"
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(ids).logits
    imported = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "megatron_moh"))
    torch.save(dict(logits=logits, tokens=out.sequences, step_logits=torch.stack(out.logits, 1),
                    imported=imported), job["out"])
''')


@pytest.mark.slow
def test_exported_sparse_model_loads_with_remote_code_and_equals_dense(tmp_path):
    dense, sparse = _pair("learned-weighted-2stage", "sdpa", seed=8)
    out = save_hf_checkpoint(tmp_path / "sparse", sparse.state_dict(), sparse.config)
    ids = torch.randint(1, VOCAB, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    job = dict(dir=str(out), ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.pt"))
    result = run_offline(LOADER, job, tmp_path)
    assert result["imported"] == []
    tokens, step_logits = _generate(dense, ids, steps=6)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], dense(ids).logits, **TOL)
    assert torch.equal(result["tokens"], tokens)
    torch.testing.assert_close(result["step_logits"], step_logits, **TOL)


def _prompt_inputs(seed, batch, heads, kv_heads, length, shared, topk):
    """Query/key/value ``[B, H, T, D]`` and gates ``[B, T, H]`` with ``topk`` routed heads per token;
    the last routed head is chosen by no token."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, 8, generator=gen)
    key, value = (torch.randn(batch, kv_heads, length, 8, generator=gen) for _ in range(2))
    scores = torch.rand(batch, length, heads - shared, generator=gen)
    scores[..., -1] = -1
    chosen = torch.zeros_like(scores).scatter_(-1, scores.topk(topk, dim=-1).indices, 1.0)
    gates = torch.cat([torch.rand(batch, length, shared, generator=gen) + 0.5, chosen * 0.7], dim=-1)
    return query, key, value, gates


@pytest.mark.parametrize("heads,kv_heads,shared,topk", [
    (8, 8, 4, 2),  # multi-head attention
    (8, 4, 3, 2),  # GQA, shared heads ending inside a group
    (8, 2, 0, 3),  # no shared head
    (8, 1, 2, 3),  # one key/value group: every group holds a shared head
])
def test_prompt_path_equals_dense_and_computes_only_chosen_rows_before_each_block(heads, kv_heads, shared, topk,
                                                                                  monkeypatch):
    """sparse_prompt with blocks of 8 positions over 37 tokens (a partial last block) against
    gated causal SDPA over every head, fp32 within TOL; and the calls over earlier blocks take, per
    block, as many rows as the busiest lane chose there (computed here from the gates)."""
    config = _config("learned-binary", "sdpa", "sparse", num_attention_heads=heads, num_key_value_heads=kv_heads,
                     moh_num_shared_heads=shared, moh_topk=topk)
    attention = modeling_moh.MoHLlamaAttention(config, layer_idx=0)
    query, key, value, gates = _prompt_inputs(9, 2, heads, kv_heads, 37, shared, topk)
    rows = []
    flash = modeling_moh._FLASH_CPU

    def counting(q, k, v, dropout, causal, **kwargs):
        if not causal:
            rows.append(q.shape[2])
        return flash(q, k, v, dropout, causal, **kwargs)

    monkeypatch.setattr(modeling_moh, "_FLASH_CPU", counting)
    out = attention.sparse_prompt(query, key, value, gates, block=8).transpose(1, 2)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=attention.scaling,
                                                             enable_gqa=True)
    mask = (gates != 0).transpose(1, 2)[..., None]
    torch.testing.assert_close(out * mask, dense * mask, **TOL)
    group = heads // kv_heads
    first = -(-shared // group)
    lanes = (gates[..., first * group:] != 0).view(2, 37, kv_heads - first, group)
    busiest = [max(lanes[:, j * 8:(j + 1) * 8].sum(dim=(1, 3)).flatten().tolist(), default=0) for j in range(1, 5)]
    assert rows == [r for r in busiest if r]
    assert all(r < group * 8 for r in rows)


def test_prompt_blocks_grow_with_the_prompt_and_keep_the_result():
    """The default block (``prompt_block``): 256 positions up to 2048 tokens, an eighth of the prompt up
    to 1024 positions; at 2100 tokens (blocks of 262, a partial last one) the output equals gated
    causal SDPA, fp32 within TOL."""
    assert [modeling_moh.prompt_block(n) for n in (8, 2048, 4096, 8192, 1 << 15)] == [256, 256, 512, 1024, 1024]
    config = _config("learned-binary", "sdpa", "sparse", num_attention_heads=4, num_key_value_heads=4,
                     moh_num_shared_heads=1, moh_topk=1)
    attention = modeling_moh.MoHLlamaAttention(config, layer_idx=0)
    query, key, value, gates = _prompt_inputs(3, 1, 4, 4, 2100, 1, 1)
    out = attention.sparse_prompt(query, key, value, gates).transpose(1, 2)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=attention.scaling)
    mask = (gates != 0).transpose(1, 2)[..., None]
    torch.testing.assert_close(out * mask, dense * mask, **TOL)


@pytest.mark.parametrize("kv_heads", [8, 4])
def test_prompt_longer_than_a_block_equals_dense(kv_heads):
    """A 300-token prefill (two blocks of the default 256) through the whole model."""
    dense, sparse = _pair("query_norm-binary", "sdpa", seed=10, num_key_value_heads=kv_heads,
                          max_position_embeddings=512)
    ids = torch.randint(1, VOCAB, (2, 300))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, **TOL)


@pytest.mark.parametrize("per_head_mask", [False, True])
@pytest.mark.parametrize("kv_heads", [8, 4, 2])
def test_groups_path_equals_dense_attention(kv_heads, per_head_mask):
    """sparse_groups for one token per sequence (GQA packs a group's heads as query rows) and for
    several (enable_gqa), with a padding mask shared by the heads or one per head, against SDPA over
    every head, on the heads with a nonzero gate."""
    attention = modeling_moh.MoHLlamaAttention(
        _config("learned-binary", "sdpa", "sparse", num_key_value_heads=kv_heads, moh_num_shared_heads=3,
                moh_topk=2), layer_idx=0)
    for length in (1, 5):
        query, key, value, gates = _prompt_inputs(12, 3, 8, kv_heads, 23, 3, 2)
        query, gates = query[:, :, -length:], gates[:, -length:]
        mask = torch.rand(3, 8 if per_head_mask else 1, length, 23, generator=torch.Generator().manual_seed(13)) > 0.3
        mask[..., -1] = True  # every row sees a key
        out = attention.sparse_groups(query, key, value, mask, gates).transpose(1, 2)
        dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                 scale=attention.scaling, enable_gqa=True)
        chosen = (gates != 0).transpose(1, 2)[..., None]
        torch.testing.assert_close(out * chosen, dense * chosen, **TOL)


def test_skipped_attention_and_crossovers():
    """The expected skipped share of each phase for the benchmarks' layouts, and auto's rule."""
    assert skipped_attention("prefill", 16, 16, 8, 4 / 8) == 0.25  # 75% active, default layout
    assert skipped_attention("prefill", 16, 16, 4, 4 / 12) == 0.5  # 50% active
    assert skipped_attention("prefill", 16, 16, 4, 8 / 12) == 0.0  # routed heads busier than half
    assert skipped_attention("decode", 16, 16, 8, 4 / 8) == 0.25  # MHA: every unchosen head
    assert skipped_attention("decode", 16, 8, 8, 4 / 8) == 0.125  # GQA: groups with both heads unchosen
    assert skipped_attention("decode", 16, 4, 8, 4 / 8) == 0.5 * 0.5 ** 4
    assert not sparse_pays("cpu", "decode", 512, 0.25) and sparse_pays("cpu", "decode", 4096, 0.25)
    assert sparse_pays("cpu", "decode", 1024, 0.125)  # GQA with pairs of heads: measured faster from 1k keys
    assert not sparse_pays("cpu", "decode", 1 << 20, skipped_attention("decode", 32, 8, 16, 8 / 16))  # Llama-3-8B
    assert not sparse_pays("cpu", "decode", 4096, 0.25, threads=2)  # measured slower with several threads
    assert sparse_pays("cpu", "train", 4096, 0.25, threads=2)
    assert not any(sparse_pays("cuda", phase, 1 << 20, 1.0) for phase in ("train", "prefill", "decode"))


def _attention(impl, kv_heads=16):
    config = MoHLlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=16, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                            attn_implementation="sdpa", moh_attention_impl=impl)
    return modeling_moh.MoHLlamaAttention(config, layer_idx=0)


@pytest.mark.parametrize("impl,kv_heads,length,keys,masked,path", [
    ("auto", 16, 1, 512, False, None),  # a short cache: dense
    ("auto", 16, 1, 4096, True, "groups"),  # MHA decoding at 4k: sparse
    ("auto", 8, 1, 4096, True, "groups"),  # GQA pairs: an eighth of the cache unread
    ("auto", 4, 1, 4096, True, None),  # groups of 4 (Llama-3-8B's): 3% unread, dense
    ("auto", 16, 1024, 1024, False, None),  # a short prompt: dense
    ("auto", 16, 4096, 4096, False, "prompt"),  # a long prompt: sparse
    ("auto", 16, 4096, 4096, True, None),  # a padded prompt: dense
    ("sparse", 16, 1, 8, False, "groups"),
    ("sparse", 16, 8, 8, False, "prompt"),
    ("sparse", 16, 8, 8, True, "groups"),
    ("dense", 16, 1, 4096, True, None),
])
def test_path_per_call(impl, kv_heads, length, keys, masked, path, one_thread):
    attention = _attention(impl, kv_heads)
    query, key = torch.empty(1, 16, length, 16), torch.empty(1, kv_heads, keys, 16)
    mask = torch.ones(1, 1, length, keys, dtype=torch.bool) if masked else None
    assert attention.sparse_path(query, key, mask, {}) == path


def test_auto_is_dense_with_several_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    query, key = torch.empty(1, 16, 1, 16), torch.empty(1, 16, 4096, 16)
    assert _attention("auto").sparse_path(query, key, None, {}) is None
    assert _attention("sparse").sparse_path(query, key, None, {}) == "groups"


def test_no_sparse_path_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    query, key = torch.empty(1, 16, 1, 16), torch.empty(1, 16, 4096, 16)
    assert _attention("sparse").sparse_path(query, key, None, {}) is None


@pytest.mark.parametrize("impl", ["sparse", "auto"])
def test_compiled_generation_fullgraph_equals_eager(impl):
    """transformers' test_generate_compile_model_forward_fullgraph for this model: greedy generation
    with a static cache and ``CompileConfig(fullgraph=True, dynamic=False)`` compiles the decoding
    forward once (no graph break, no recompilation for a second input of the same shape) and gives
    eager generation's tokens, its scores within TOL."""
    from transformers import CompileConfig
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    _, model = _pair("learned-weighted-2stage", "sdpa", seed=11)
    model.config.moh_attention_impl = impl
    inputs = [dict(input_ids=torch.randint(1, VOCAB, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.long))
              for _ in range(2)]
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # compile on CPU too
    kwargs = dict(use_cache=True, do_sample=False, max_new_tokens=5, return_dict_in_generate=True,
                  output_scores=True, compile_config=compile_config)
    torch.compiler.reset()
    with torch.compiler.set_stance("force_eager"):
        eager = [model.generate(**x, **kwargs) for x in inputs]
    try:
        torch._logging.set_logs(recompiles_verbose=True)
        with CaptureLogger(logging.get_logger("torch._dynamo.guards")) as log:
            compiled = [model.generate(**x, **kwargs, cache_implementation="static") for x in inputs]
    finally:
        torch._logging.set_logs()
    assert hasattr(model, "_compiled_call") and compiled[0].past_key_values.is_compileable
    assert "Recompiling" not in log.out, log.out
    for want, got in zip(eager, compiled):
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), **TOL)
