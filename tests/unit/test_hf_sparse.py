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


class _CountRows:
    """Records, for each routed-head SDPA call of the sparse path, the query rows it computed."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = torch.nn.functional.scaled_dot_product_attention

        def counting(query, *args, **kwargs):
            self.calls.append(tuple(query.shape))
            return original(query, *args, **kwargs)

        monkeypatch.setattr(modeling_moh.F, "scaled_dot_product_attention", counting)


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


@pytest.mark.parametrize("attn", IMPLS)
def test_decoding_skips_unchosen_routed_heads(attn, monkeypatch):
    """Multi-head layout (each lane is one query head): a decoding step of one sequence computes
    exactly topk routed rows per layer, and a prefill of T tokens T * topk rows."""
    _, sparse = _pair("learned-binary", attn, seed=6, num_key_value_heads=8)
    topk, layers = sparse.config.moh_topk, sparse.config.num_hidden_layers
    ids = torch.randint(1, VOCAB, (1, 7))
    counter = _CountRows(monkeypatch)
    sparse.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    # Per layer and step: one call for the shared heads [1, H_shared, T, D], one for the routed
    # lanes [P, 1, R, D]; padding rows included, rows computed are P * R.
    routed = counter.calls[1::2]
    assert len(counter.calls) == 2 * layers * 3
    assert all(shape[1] == 1 for shape in routed)
    computed = [shape[0] * shape[2] for shape in routed]
    assert computed[layers:] == [topk] * (2 * layers)  # decoding: only the chosen heads
    assert all(rows >= topk * 7 for rows in computed[:layers])  # prefill: >= the chosen rows
    assert all(shape[0] <= sparse.config.moh_num_routed_heads for shape in routed)


def test_sparse_training_forward_and_backward_match_dense():
    dense, sparse = _pair("learned-weighted-2stage", "sdpa", seed=7)
    dense.train()
    sparse.train()
    ids = torch.randint(1, VOCAB, (2, 10))
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
