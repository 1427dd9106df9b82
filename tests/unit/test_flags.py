"""Every Megatron-LM flag that shapes the model or its loss either does what it says or is refused
with one line: none is accepted and ignored. This table is the audit; a maintainer extends it.
It covers what megatron's ``Attention.forward`` does and ``MoHSelfAttention.forward`` copies
(honoured: checked by running the layer) or leaves out (refused).

Honoured flags are checked on the model that pretrain_moh.py would build (module types, parameter
shapes, embedding settings, and what the layer does in training and evaluation) against the same
model without the flag; loss flags point at the integration test that checks the loss. Refused
flags must stop, with one line, in the checks pretrain_moh.py runs before start-up.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from unittest import mock

import pytest
import torch

from megatron.core.activations import squared_relu
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

from megatron_moh import console, preflight, specs
from megatron_moh.arguments import parse_megatron_args, validate_megatron_args
from megatron_moh.model import model_from_args
from megatron_moh.moh_attention import MoHSelfAttention

BASE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
        "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1",
        "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]


def _model(*flags: str):
    # megatron records --attention-backend in NVTE_* variables and checks them when it builds the
    # attention: each model here gets a clean slate, and the process its variables back.
    environment = dict(os.environ)
    for name in [name for name in os.environ if name.startswith("NVTE_")]:
        del os.environ[name]
    try:
        args = parse_megatron_args([*BASE, *flags])
        preflight.check_values(args)
        args.padded_vocab_size = 128
        torch.manual_seed(0)
        return model_from_args(args), args
    finally:
        os.environ.clear()
        os.environ.update(environment)


def _attention(model):
    return model.decoder.layers[0].self_attention


def _inv_freq(model):
    return model.rotary_pos_emb.inv_freq


def _moe(model, layer: int = 0):
    """Layer ``layer``'s MoE MLP, or None where it has a dense one."""
    mlp = model.decoder.layers[layer].mlp
    return mlp if isinstance(mlp, MoELayer) else None


def _moe_pattern(model) -> list[bool]:
    return [_moe(model, i) is not None for i in range(len(model.decoder.layers))]


def _on_moe(check: Callable) -> Callable:
    """A flag-table check of the first layer's MoE MLP (false where that layer has a dense MLP)."""
    return lambda m, a: _moe(m) is not None and check(_moe(m))


EXPERTS = ["--num-experts", "4"]
HIDDEN = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(0))  # [s, b, hidden] into one layer


def _varies_in_training(module: torch.nn.Module, *inputs) -> bool:
    """Two training-mode calls differ (something is dropped at random) and two eval-mode calls agree."""
    def output():
        out = module(*inputs)
        return out[0] if isinstance(out, tuple) else out

    module.train()
    first, second = output(), output()
    module.eval()
    with torch.no_grad():
        agree = torch.equal(output(), output())
    return agree and not torch.equal(first, second)


def _tokens(model):
    ids = torch.arange(32).view(2, 16) % 128
    return ids, torch.arange(16).expand(2, 16), None


def _core_attention_runs(model) -> int:
    """How often the first layer's core attention runs in one training forward and backward (twice
    when its backward recomputes it)."""
    attention, runs = _attention(model), []
    hook = attention.core_attention.register_forward_hook(lambda *_: runs.append(1))
    attention.train()
    out, _ = attention(HIDDEN.clone().requires_grad_(), None)
    out.sum().backward()
    hook.remove()
    return len(runs)


def _nvtx_ranges(model, args) -> set[str]:
    """The NVTX ranges the first layer's attention opens while megatron has them on (it turns them on
    with --nvtx-ranges when profiling starts)."""
    if not args.nvtx_ranges:
        return set()
    from megatron.core import utils

    opened = []
    with mock.patch.object(torch.cuda.nvtx, "range_push", side_effect=opened.append), \
            mock.patch.object(torch.cuda.nvtx, "range_pop"), mock.patch.object(utils, "_nvtx_enabled", True):
        _attention(model)(HIDDEN, None)
    return {name.rsplit(".", 1)[-1] for name in opened}


def _rope_reads_interleaving(model, args) -> bool:
    """The attention's RoPE follows config.rotary_interleaved: flipping it changes the output."""
    attention = _attention(model).eval()
    rope = model.rotary_pos_emb(16)
    with torch.no_grad():
        ours = attention(HIDDEN, None, rotary_pos_emb=rope)[0]
        model.config.rotary_interleaved = not model.config.rotary_interleaved
        flipped = attention(HIDDEN, None, rotary_pos_emb=rope)[0]
        model.config.rotary_interleaved = not model.config.rotary_interleaved
    return args.rotary_interleaved and not torch.equal(ours, flipped)


# (flag(s), what must be true of the model built with them). Each check could fail: the default
# model (no flag) is built too and must NOT satisfy it.
HONOURED: dict[str, tuple[list[str], Callable]] = {
    "learned-positions": (["--position-embedding-type", "learned_absolute"],
                          lambda m, a: hasattr(m.embedding, "position_embeddings")
                          and not hasattr(m, "rotary_pos_emb")),
    "no-positions": (["--position-embedding-type", "none"],
                     lambda m, a: not hasattr(m.embedding, "position_embeddings") and not hasattr(m, "rotary_pos_emb")),
    "rotary-percent": (["--rotary-percent", "0.5"], lambda m, a: _inv_freq(m).numel() == a.kv_channels // 4),
    "rotary-base": (["--rotary-base", "500000"], lambda m, a: abs(_inv_freq(m)[1].item() - 500000 ** -0.25) < 1e-9),
    "rope-scaling": (["--rotary-base", "500000", "--use-rope-scaling", "--rope-scaling-factor", "8"],
                     lambda m, a: _inv_freq(m)[-1].item() < 0.2 * 500000 ** -0.75),  # long wavelengths slowed 8x
    "rope-interpolation": (["--rotary-seq-len-interpolation-factor", "2"],
                           lambda m, a: m.rotary_pos_emb.seq_len_interpolation_factor == 2),
    "fp16-lm-cross-entropy": (["--fp16", "--fp16-lm-cross-entropy"], lambda m, a: m.fp16_lm_cross_entropy),
    "tied-embeddings": (["--tie-embeddings-and-output-weights"],
                        lambda m, a: m.share_embeddings_and_output_weights and m.output_layer.weight is None),
    "qkv-bias": (["--add-qkv-bias"], lambda m, a: _attention(m).linear_qkv.bias is not None
                 and _attention(m).linear_proj.bias is None),
    "qk-layernorm": (["--qk-layernorm"], lambda m, a: all(
        type(norm) is torch.nn.RMSNorm and norm.weight.shape == (a.kv_channels,)
        for norm in (_attention(m).q_layernorm, _attention(m).k_layernorm))),
    "linear-bias": (["--add-bias-linear"], lambda m, a: m.decoder.layers[0].mlp.linear_fc1.bias is not None),
    "layernorm": (["--normalization", "LayerNorm"],
                  lambda m, a: type(m.decoder.layers[0].input_layernorm) is torch.nn.LayerNorm),
    "norm-epsilon": (["--norm-epsilon", "1e-6"], lambda m, a: m.decoder.layers[0].input_layernorm.eps == 1e-6),
    "squared-relu": (["--no-swiglu", "--squared-relu"], lambda m, a: m.config.activation_func is squared_relu
                     and m.decoder.layers[0].mlp.linear_fc1.weight.shape[0] == 128),
    "gqa": (["--group-query-attention", "--num-query-groups", "2"],
            lambda m, a: _attention(m).linear_qkv.weight.shape[0] == (8 + 2 * 2) * 8),
    "kv-channels": (["--kv-channels", "16"], lambda m, a: _attention(m).linear_qkv.weight.shape[0] == 3 * 8 * 16),
    "ffn-size": (["--ffn-hidden-size", "96"], lambda m, a: m.decoder.layers[0].mlp.linear_fc2.weight.shape[1] == 96),
    "init-std": (["--init-method-std", "0.2"],
                 lambda m, a: 0.15 < m.embedding.word_embeddings.weight.std().item() < 0.25),
    "hidden-dropout": (["--hidden-dropout", "0.3"], lambda m, a: _varies_in_training(m, *_tokens(m))),
    "attention-dropout": (["--attention-dropout", "0.3"],
                          lambda m, a: _varies_in_training(_attention(m), HIDDEN, None)),
    # What megatron's Attention.forward does in training, in the MoH layer's forward.
    "recompute-core-attention": (["--recompute-granularity", "selective", "--recompute-modules", "core_attn"],
                                 lambda m, a: _core_attention_runs(m) == 2),
    "nvtx-ranges": (["--nvtx-ranges"], lambda m, a: _nvtx_ranges(m, a) >= {"qkv", "rotary_pos_emb",
                                                                          "core_attention", "linear_proj"}),
    "rotary-interleaved": (["--rotary-interleaved"], _rope_reads_interleaving),
    "dense-baseline": (["--moh-dense-baseline"], lambda m, a: type(_attention(m)) is SelfAttention),
    "megatron-core-attention": (["--attention-backend", "unfused"],
                                lambda m, a: type(_attention(m).core_attention) is DotProductAttention),
    "moh-layout": (["--moh-num-shared-heads", "2", "--moh-topk", "3"],
                   lambda m, a: isinstance(_attention(m), MoHSelfAttention)
                   and (_attention(m).router.num_shared, _attention(m).router.topk) == (2, 3)),
    # Loss: checked by training, in tests/integration/test_loss_modes.py (the load-balance weight).
    "per-token-loss": (["--calculate-per-token-loss"], lambda m, a: m.config.calculate_per_token_loss),
    # MoE MLP: megatron-core's MoE layer in every MoH layer. The aux losses and expert parallelism
    # (--expert-model-parallel-size) are checked by training, in tests/integration/test_moe.py, and
    # gradient by gradient in tests/dist/test_expert_parallel.py.
    "moe": (EXPERTS, lambda m, a: _moe_pattern(m) == [True, True] and len(_moe(m).experts.local_experts) == 4
            and isinstance(_moe(m).token_dispatcher, MoEAllGatherTokenDispatcher)
            and isinstance(_attention(m), MoHSelfAttention)),
    "moe-router-topk": ([*EXPERTS, "--moe-router-topk", "3"], _on_moe(lambda moe: moe.router.topk == 3)),
    "moe-aux-loss-coeff": ([*EXPERTS, "--moe-aux-loss-coeff", "0.02"],
                           _on_moe(lambda moe: moe.router.get_aux_loss_coeff("aux_loss") == 0.02)),
    "moe-z-loss-coeff": ([*EXPERTS, "--moe-z-loss-coeff", "0.001"],
                         _on_moe(lambda moe: moe.router.config.moe_z_loss_coeff == 0.001)),
    "moe-ffn-size": ([*EXPERTS, "--moe-ffn-hidden-size", "48"],
                     _on_moe(lambda moe: moe.experts.local_experts[0].linear_fc2.weight.shape == (64, 48))),
    "moe-shared-expert": ([*EXPERTS, "--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate"],
                          _on_moe(lambda moe: moe.shared_experts.linear_fc2.weight.shape == (64, 32)
                                  and moe.shared_experts.gate_weight.shape == (1, 64))),
    "moe-layer-freq": ([*EXPERTS, "--moe-layer-freq", "2"],
                       lambda m, a: _moe_pattern(m) == [True, False] and type(m.decoder.layers[1].mlp) is MLP),
    "moe-layer-pattern": ([*EXPERTS, "--moe-layer-freq", "[0,1]"], lambda m, a: _moe_pattern(m) == [False, True]),
    "moe-alltoall": ([*EXPERTS, "--moe-token-dispatcher-type", "alltoall"],
                     _on_moe(lambda moe: isinstance(moe.token_dispatcher, MoEAlltoAllTokenDispatcher))),
    "moe-dense-attention": ([*EXPERTS, "--moh-dense-baseline"],
                            lambda m, a: _moe(m) is not None and type(_attention(m)) is SelfAttention),
}

# (flags, words of the one-line refusal).
REFUSED: dict[str, tuple[list[str], str]] = {
    "mla": (["--multi-latent-attention"], "multi-latent attention"),
    "heterogeneous": (["--heterogeneous-layers-config-path", "layers.json"], "heterogeneous layer configs"),
    "spec": (["--spec", "my.module", "my_spec"], "--spec replaces the layer spec"),
    "yaml": (["--yaml-cfg", "run.yaml"], "argument --yaml-cfg: a YAML config would bypass"),
    "experimental-attention": (["--experimental-attention-variant", "gated_delta_net"],
                               "--experimental-attention-variant replaces the attention"),
    "hybrid": (["--hybrid-layer-pattern", "M*M*"], "--hybrid-layer-pattern describes a HybridModel"),
    "mtp": (["--mtp-num-layers", "1"], "multi-token prediction"),
    "output-gate": (["--attention-output-gate"], "--attention-output-gate"),
    "qk-l2-norm": (["--qk-l2-norm"], "--qk-l2-norm"),
    "no-rope-freq": (["--no-rope-freq", "4"], "--no-rope-freq"),
    "zero-centered-gamma": (["--apply-layernorm-1p"], "zero-centred gamma"),
    "softmax-type": (["--softmax-type", "off-by-one"], "vanilla attention softmax"),
    "yarn": (["--position-embedding-type", "yarn"], "YaRN and M-RoPE"),
    "qk-clip": (["--qk-clip"], "--qk-clip"),
    "local-attention-backend": (["--attention-backend", "local"], "--attention-backend local needs"),
    "post-ln-residual": (["--apply-residual-connection-post-layernorm"], "its layers ignore it"),
    "ep-without-experts": (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size 2 needs --num-experts"),
    "experts-per-ep-rank": ([*EXPERTS[:1], "6", "--expert-model-parallel-size", "4"],
                            "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    "moe-topk": ([*EXPERTS, "--moe-router-topk", "5"], "--moe-router-topk 5 is more than the 4 experts"),
    "moe-layer-freq-zero": ([*EXPERTS, "--moe-layer-freq", "0"], "--moe-layer-freq 0 must be at least 1"),
    "moe-layer-pattern-length": ([*EXPERTS, "--moe-layer-freq", "[1,0,1]"], "for each of the 2 layers"),
    "moe-tp-without-sp": ([*EXPERTS, "--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
    "moe-grouped-gemm-local": ([*EXPERTS, "--moe-grouped-gemm"], "--moe-grouped-gemm needs Transformer Engine"),
    "moe-flex-on-cpu": ([*EXPERTS, "--moe-token-dispatcher-type", "flex"], "flex needs DeepEP/HybridEP on GPUs"),
    "moe-alltoall-expert-tp-on-cpu": ([*EXPERTS, "--moe-token-dispatcher-type", "alltoall", "--sequence-parallel",
                                       "--tensor-model-parallel-size", "2"], "which gloo cannot"),
    "moe-upcycling": ([*EXPERTS, "--moe-use-upcycling"], "--moe-use-upcycling (dense checkpoint -> MoE)"),
    # What megatron's Attention.forward does and the MoH layer's forward leaves out.
    "offload-attention": (["--fine-grained-activation-offloading", "--offload-modules", "core_attn"],
                          "--offload-modules qkv_linear, core_attn, attn_proj offload inputs"),
    "offload-qkv": (["--fine-grained-activation-offloading", "--offload-modules", "attn_norm", "qkv_linear"],
                    "--offload-modules qkv_linear, core_attn, attn_proj"),
    "cuda-graphs": (["--cuda-graph-impl", "local"], "--cuda-graph-impl: the MoH layer"),
    "enable-cuda-graph": (["--enable-cuda-graph"], "--enable-cuda-graph: the MoH layer"),
    "external-cuda-graph": (["--external-cuda-graph"], "--external-cuda-graph: the MoH layer"),
    "flash-decode": (["--flash-decode"], "--flash-decode is megatron's inference path"),
    "rl-step": (["--perform-rl-step"], "--perform-rl-step generates with megatron's inference engine"),
    "sft-packed-sequences": (["--sft"], "--sft trains on packed sequences (THD)"),
    "hybrid-cp": (["--hybrid-context-parallel"], "--hybrid-context-parallel packs sequences"),
    "context-parallel": (["--context-parallel-size", "2"], "MoH attention does not support context parallelism"),
    "sparse-attention-dropout": (["--moh-attention-impl", "sparse", "--attention-dropout", "0.1"],
                                 "moh_attention_impl='sparse' has no attention dropout"),
    "sparse-sliding-window": (["--moh-attention-impl", "sparse", "--attention-backend", "unfused", "--window-size",
                               "8,0"], "moh_attention_impl='sparse' has no attention dropout and no sliding window"),
}


@pytest.fixture(scope="module")
def default_model():
    return _model()


@pytest.mark.parametrize("name", list(HONOURED))
def test_honoured_flag_changes_the_model(name, default_model):
    flags, check = HONOURED[name]
    model, args = _model(*flags)
    assert check(model, args), f"{flags} did not change the model as it says"
    assert not check(*default_model), f"the check for {flags} holds without the flag too"


def _start_up(flags: list[str]) -> None:
    """pretrain_moh.py's checks before start-up: the flags, megatron's validation, the arguments."""
    args = parse_megatron_args([*BASE, *flags], validate=False)
    preflight.check_values(args)
    try:
        validate_megatron_args(args)
    except AssertionError as err:
        raise SystemExit(f"{preflight.PROG}: error: {preflight.explain_assertion(err)}") from None
    preflight.check_args(args)


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_flag_is_refused(name, monkeypatch):
    flags, words = REFUSED[name]
    monkeypatch.setenv("WORLD_SIZE", "2")  # a world that --context-parallel-size 2 fits
    with pytest.raises(SystemExit) as refusal, contextlib.redirect_stderr(io.StringIO()) as usage, \
            contextlib.redirect_stdout(io.StringIO()):
        _start_up(flags)
    message = str(refusal.value.code) if refusal.value.code != 2 else usage.getvalue().strip()  # usage error
    assert message.startswith("pretrain_moh.py: error: ") and "\n" not in message and words in message, message


@pytest.fixture
def gpu_visible(monkeypatch):
    """A machine with a GPU, as far as the defaults and checks can tell (the model stays on the CPU)."""
    from megatron_moh import platform

    monkeypatch.setattr(platform, "cpu_requested", lambda: False)

    def with_transformer_engine(present: bool) -> None:
        for module in (specs, preflight):
            monkeypatch.setattr(module, "have_transformer_engine", lambda: present)

    return with_transformer_engine


@pytest.mark.parametrize("te", [True, False])
def test_gpu_default_spec_follows_transformer_engine(gpu_visible, te):
    """With a GPU, --transformer-impl defaults to Transformer Engine where it imports and to the local
    spec where it does not (README's first command then trains without TE)."""
    gpu_visible(te)
    assert parse_megatron_args(BASE, validate=False).transformer_impl == ("transformer_engine" if te else "local")
    assert parse_megatron_args([*BASE, "--transformer-impl", "local"], validate=False).transformer_impl == "local"


def test_gpu_without_transformer_engine_says_so_once(gpu_visible):
    """The first screen's one line says the GPU runs the local spec; nothing else of the start-up
    mentions Transformer Engine; FP8 and an explicit TE spec are refused."""
    gpu_visible(False)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _start_up([])
    assert [line for line in out.getvalue().splitlines() if "Transformer Engine" in line] == []
    args = parse_megatron_args(BASE, validate=False)
    assert console.fallback_line(args.transformer_impl, gpu=True).startswith(
        "running without Transformer Engine") and console.fallback_line(args.transformer_impl, gpu=True).endswith(
        ": torch fallbacks (on this GPU too: --transformer-impl local)")
    assert not console.fallback_line("local", gpu=False).endswith("--transformer-impl local)")
    with pytest.raises(SystemExit) as refusal, contextlib.redirect_stdout(io.StringIO()):
        _start_up(["--fp8-format", "e4m3"])
    assert "--fp8-format e4m3 needs NVIDIA Transformer Engine" in str(refusal.value.code)
    with pytest.raises(SystemExit) as refusal, contextlib.redirect_stdout(io.StringIO()):
        _start_up(["--transformer-impl", "transformer_engine"])
    assert "--transformer-impl transformer_engine needs NVIDIA Transformer Engine" in str(refusal.value.code)
