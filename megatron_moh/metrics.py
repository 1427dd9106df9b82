"""MoH metrics in megatron.training's log: the load-balance loss per layer (MoH's own instance of
megatron's aux-loss tracker; megatron.training reports the MoE MLP's aux losses from its global
one, so each loss is reported once), per-layer head usage (TensorBoard histograms and a layers x
heads heat-map image), and a FLOP count that only credits the attention core of the heads each
token used, so TFLOP/s and MFU are honest.
"""

from __future__ import annotations

import functools
import weakref

import torch

from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.training import get_args, get_tensorboard_writer
from megatron.training import training as megatron_training

from megatron_moh.patches import original, replace, wrap
from megatron_moh.router import LOAD_BALANCE_LOSS, HeadRouter, moh_metrics_tracker

# The routers of the model being trained (megatron's log hook is not handed the model); weak, so
# a model that is gone takes its routers with it.
_ROUTERS: "weakref.WeakSet[HeadRouter]" = weakref.WeakSet()


def track_routers(model: torch.nn.Module) -> None:
    """Log the head usage of this model chunk's routers."""
    _ROUTERS.update(m for m in model.modules() if isinstance(m, HeadRouter))


def moh_flops(args, batch_size: int, seqlen_squared_sum_in_batch=None, total_real_tokens_in_batch=None,
              *, dense_flops=None) -> float:
    """megatron's FLOPs of one global batch minus the attention core (QK^T, PV) of the routed heads
    each token did not use. The projections still run for every head, so they stay counted."""
    dense_flops = dense_flops or original(megatron_training, "num_floating_point_operations")
    total = dense_flops(args, batch_size, seqlen_squared_sum_in_batch, total_real_tokens_in_batch)
    if getattr(args, "moh_dense_baseline", True) or args.moh_topk is None:
        return total
    unused_heads = args.num_attention_heads - args.moh_num_shared_heads - args.moh_topk
    squares = seqlen_squared_sum_in_batch or batch_size * args.seq_length**2
    # forward+backward (3) x FMA (2) x causal half (1/2) x two products (2), as megatron counts it
    return total - 6 * args.kv_channels * unused_heads * args.num_layers * squares



def _head_usage(iteration: int, writer, num_layers: int) -> None:
    """Gather per-layer head usage over DP and PP (virtual stages too); write histograms and a
    heat-map. Layers are numbered from 0, as megatron names the per-layer load-balance loss."""
    routers = list(_ROUTERS)
    if not routers:
        return
    table = torch.zeros(num_layers, routers[0].num_routed)  # [all layers, routed heads]
    for router in routers:
        table[router.layer_number - 1] = router.reset_head_usage().cpu()
    table = table.to(routers[0].head_usage.device)
    dp_group = parallel_state.get_data_parallel_group()
    torch.distributed.all_reduce(table, group=dp_group)
    table /= torch.distributed.get_world_size(dp_group)
    torch.distributed.all_reduce(table, group=parallel_state.get_pipeline_model_parallel_group())
    if writer is None:
        return
    for layer, fractions in enumerate(table):
        writer.add_histogram(f"moh/head_usage_layer_{layer}", fractions, iteration)
        writer.add_scalar(f"moh/head_usage_max_layer_{layer}", fractions.max(), iteration)
    scaled = table / table.max().clamp_min(1e-12)
    image = (scaled * 255).to(torch.uint8).repeat_interleave(16, 0).repeat_interleave(16, 1)
    writer.add_image("moh/head_usage_heatmap", image[None], iteration, dataformats="CHW")


def _with_moh_metrics(original_log):
    @functools.wraps(original_log)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        args = get_args()
        writer = get_tensorboard_writer()
        if not args.moh_dense_baseline and args.moh_topk:
            moh_metrics_tracker().report(
                loss_scale=1 / get_num_microbatches(),
                iteration=iteration,
                writer=writer,
                per_layer_logging=True,
                force_initialize=True,
                track_names=[LOAD_BALANCE_LOSS],
                num_layers=args.num_layers,
                total_loss_dict=total_loss_dict,
            )
            if iteration % args.log_interval == 0:
                _head_usage(iteration, writer, args.num_layers)
        if kwargs.get("is_first_iteration") and iteration % args.log_interval == 0:
            # megatron logs a process's first iteration without resetting its sums, so that an
            # interval it starts stays whole; when that iteration ends an interval itself (e.g. a
            # resume at a multiple of --log-interval), the next log line would count it twice.
            kwargs["is_first_iteration"] = False
        return original_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)

    return training_log


def install() -> None:
    """Hook the MoH metrics into megatron.training's log and FLOP count (idempotent;
    `megatron_moh.patches.install_all` calls it)."""
    wrap(megatron_training, "training_log", _with_moh_metrics, why="MoH metrics in megatron's log",
         params=("loss_dict", "total_loss_dict", "learning_rate", "iteration"))
    replace(megatron_training, "num_floating_point_operations", moh_flops,
            why="FLOPs that credit the attention core only for the heads each token used",
            params=("args", "batch_size", "seqlen_squared_sum_in_batch", "total_real_tokens_in_batch"))
