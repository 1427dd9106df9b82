"""MoH attention with megatron-core MoE MLPs: EP=2 and TP=2 x EP=2 (sequence parallel) against one
process, from the same weights and micro-batches: each micro-batch's loss and every parameter's
gradient after megatron's DDP reduction (`finalize_model_grads`, as training runs it). Both aux
losses are on, so their gradients are in the comparison.

The expert-parallel ranks are data-parallel ranks of the attention, so each takes one of the
reference's micro-batches (the reference accumulates them). Weights go from the reference to each
layout, and gradients come back, through megatron's distributed checkpoints, which reshard
across TP and EP."""

import pytest
import torch

from tests.launcher import launch

SEQ, MICRO_BATCH, VOCAB, MICRO_BATCHES = 16, 2, 128, 2
# fp32; the experts see their tokens in another order and the reductions differ by layout.
TOL = dict(rtol=1e-5, atol=1e-6)
MOE = dict(
    num_layers=2, moe_layer_freq=[1, 0], num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
    moe_aux_loss_coeff=0.1, moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True,
    moh_load_balance_coeff=0.1,
)


def _model(tp: int, ep: int, dispatcher: str):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_moh.model import build_gpt_model
    from tests.helpers import tiny_config

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=1 if dispatcher == "alltoall" else None)
    model_parallel_cuda_manual_seed(7)
    cfg = tiny_config(**MOE, tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_model_parallel_size=ep,
                      expert_tensor_parallel_size=1 if dispatcher == "alltoall" else tp,
                      moe_token_dispatcher_type=dispatcher)
    return build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=SEQ)


def _load(model, directory: str) -> None:
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(sharded, directory)
    model.load_state_dict({key: loaded[key] for key in sharded}, strict=True)


def _step_worker(rank, world, tp, ep, dispatcher, weights, grads_out, tokens):
    """One training step's forward and backward on this rank's micro-batches, gradients reduced as
    megatron's DDP does. The one-process reference (``grads_out`` None) saves its initial weights
    to ``weights`` and returns its gradients; a layout loads ``weights`` and saves its gradients as
    a checkpoint of the model's shape to ``grads_out``."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    model = _model(tp, ep, dispatcher)
    if grads_out is None:
        dist_checkpointing.save(model.sharded_state_dict(), weights)
    else:
        _load(model, weights)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = tokens[dp_rank::dp_size]
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(mine)))  # as megatron's schedule does
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    losses = []
    for batch in mine:
        loss = ddp(batch, positions, None, labels=batch).mean()
        (loss / len(mine)).backward()
        losses.append(loss.detach())
    finalize_model_grads([ddp])
    result = {"dp_rank": dp_rank, "losses": losses}
    if grads_out is None:
        return {**result, "grads": {name: param.main_grad for name, param in model.named_parameters()}}
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.main_grad)
    dist_checkpointing.save(model.sharded_state_dict(), grads_out)
    return result


def _read_worker(rank, world, directory):
    """A checkpoint of the one-process model's shape, as whole tensors."""
    model = _model(1, 1, "allgather")
    _load(model, directory)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process step (both micro-batches accumulated) and the weights it started from."""
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    weights = str(tmp_path_factory.mktemp("weights"))
    (ref,) = launch(_step_worker, 1, 1, 1, "allgather", weights, None, list(tokens))
    return dict(ref, tokens=list(tokens), weights=weights)


@pytest.mark.parametrize("tp,ep,dispatcher", [(1, 2, "alltoall"), (2, 2, "allgather")],
                         ids=["ep2-alltoall", "tp2-ep2-sp-allgather"])
def test_expert_parallel_matches_one_process(tp, ep, dispatcher, reference, tmp_path):
    results = launch(_step_worker, tp * ep, tp, ep, dispatcher, reference["weights"], str(tmp_path),
                     reference["tokens"])
    for res in results:
        (loss,) = res["losses"]
        torch.testing.assert_close(loss, reference["losses"][res["dp_rank"]], **TOL)
    (got,) = launch(_read_worker, 1, str(tmp_path))
    expected = reference["grads"]
    assert sorted(got) == sorted(expected)
    assert any(".mlp.experts." in name for name in got) and any(".mlp.shared_experts." in name for name in got)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, f"{name} has no gradient in the reference"
        torch.testing.assert_close(got[name], grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
