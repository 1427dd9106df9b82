"""TensorBoard holds megatron's scalars plus the MoH ones: load-balance loss (mean and per layer),
per-layer head-usage histograms and the heat-map image; pipeline stages' layers are all there."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.pretrain_runner import SMALL_MODEL, pretrain_worker
from tests.launcher import launch


def test_tensorboard_has_moh_metrics(tmp_path):
    argv = SMALL_MODEL + ["--train-iters", "4", "--log-interval", "2", "--tensorboard-dir", str(tmp_path),
                          "--pipeline-model-parallel-size", "2"]
    launch(pretrain_worker, 2, argv, timeout=600)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ["lm loss", "moh_load_balance_loss"] + [f"moe/moh_load_balance_loss_layer_{i}" for i in range(4)]:
        assert scalar in tags["scalars"], scalar
    assert tags["histograms"] == [f"moh/head_usage/layer_{i:02d}" for i in range(1, 5)]
    assert tags["images"] == ["moh/head_usage_heatmap"]
    balance = [e.value for e in events.Scalars("moh_load_balance_loss")]
    assert len(balance) == 4 and all(0.99 < v < 2.0 for v in balance)  # 1 is perfectly balanced
    usage = events.Histograms("moh/head_usage/layer_03")[-1].histogram_value
    assert abs(usage.sum - 1.0) < 1e-5  # fractions of routing slots over the routed heads
