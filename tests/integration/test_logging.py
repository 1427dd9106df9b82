"""TensorBoard holds megatron's scalars plus the MoH ones: load-balance loss (mean and per layer),
per-layer head usage (histograms, per-layer maximum, heat-map image); every pipeline stage's layers
are there, named from 0 like megatron's per-layer losses. The logged head usage is checked against
counts taken independently from the gates each router returned during training."""

import contextlib
import io
import os

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.pretrain_runner import SMALL_MODEL
from tests.launcher import launch

LAYERS, ROUTED, TOPK, SHARED = 4, 4, 2, 4  # SMALL_MODEL: 8 heads, the default 50% shared / 25% active


def counting_worker(rank: int, world: int, argv: list[str]) -> dict[int, list[torch.Tensor]]:
    """One rank of pretrain_moh.py; returns, per layer on this rank, each training forward's count
    of tokens that chose each routed head (from the gates the router returned)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import pretrain_moh

    from megatron_moh.router import HeadRouter

    counts: dict[int, list[torch.Tensor]] = {}

    def count(module, args, gates):
        if isinstance(module, HeadRouter) and module.training:
            chosen = (gates[..., SHARED:] != 0).reshape(-1, ROUTED).sum(0)
            counts.setdefault(module.layer_number - 1, []).append(chosen.detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain_moh.main(argv)
    finally:
        handle.remove()
    return counts


def test_tensorboard_has_moh_metrics(tmp_path):
    argv = SMALL_MODEL + ["--train-iters", "4", "--log-interval", "2", "--tensorboard-dir", str(tmp_path),
                          "--pipeline-model-parallel-size", "2"]
    per_rank = launch(counting_worker, 2, argv, timeout=600)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    per_layer = [f"moe/moh_load_balance_loss_layer_{i}" for i in range(LAYERS)]
    for scalar in ["lm loss", "moh_load_balance_loss", *per_layer]:
        assert scalar in tags["scalars"], scalar
    assert sorted(tags["histograms"]) == [f"moh/head_usage_layer_{i}" for i in range(LAYERS)]
    assert tags["images"] == ["moh/head_usage_heatmap"]
    balance = [e.value for e in events.Scalars("moh_load_balance_loss")]
    assert len(balance) == 4 and all(TOPK - 0.01 < v < 2 * TOPK for v in balance)  # TOPK is perfectly balanced

    counts = {layer: forwards for rank in per_rank for layer, forwards in rank.items()}
    assert sorted(counts) == list(range(LAYERS))  # stage 0 holds layers 0-1, stage 1 layers 2-3
    for layer, forwards in counts.items():
        assert len(forwards) == 8  # 4 iterations x 2 micro-batches
        window = torch.stack(forwards[4:]).sum(0).double()  # iterations 3-4: the log at iteration 4
        expected = window / (window.sum())  # each token fills TOPK slots, so this is slots per head
        logged = events.Histograms(f"moh/head_usage_layer_{layer}")[-1]
        assert logged.step == 4
        hist = logged.histogram_value
        assert hist.num == ROUTED
        summary = torch.tensor([hist.min, hist.max, hist.sum, hist.sum_squares], dtype=torch.float64)
        torch.testing.assert_close(summary, torch.stack([expected.min(), expected.max(), expected.sum(),
                                                         (expected**2).sum()]), rtol=0, atol=1e-6)
        peak = events.Scalars(f"moh/head_usage_max_layer_{layer}")[-1].value
        assert abs(peak - expected.max().item()) < 1e-6
