"""The pieces megatron.training.pretrain() calls for an MoH GPT: model, batches, loss, data.

The loop, optimizer, schedules, checkpointing and logging are megatron's own.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.training import get_args, get_tokenizer
from megatron.training.utils.common_utils import get_blend_and_blend_per_split, print_rank_0

from megatron_moh import metrics, platform
from megatron_moh.data.datasets import build_gpt_datasets
from megatron_moh.model import model_from_args


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config=None, pg_collection=None) -> GPTModel:
    """One (virtual) pipeline stage of the MoH GPT described by the command line."""
    model = model_from_args(get_args(), pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                            pg_collection=pg_collection)
    metrics.track_routers(model)
    return model


def get_batch(data_iterator):
    """Next micro-batch on this rank (every rank reads its own identical loader)."""
    batch = next(data_iterator)
    device = platform.device()
    # No attention mask with --no-create-attention-mask-in-dataloader: the layers are causal.
    return (None if batch.get(key) is None else batch[key].to(device, non_blocking=True)
            for key in ("tokens", "labels", "loss_mask", "attention_mask", "position_ids"))


# A loss ten times the largest seen so far is a spike (megatron's --check-for-spiky-loss).
SPIKY_LOSS_FACTOR = 10


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses and the token count; megatron divides and averages. The load-balance
    loss is not added here: it reaches the router through megatron's aux-loss scaler.

    Each rank's loss goes through megatron's result validation before the data-parallel
    reduction, as in Megatron-LM's pretrain_gpt.py: NaN or Inf stops the run (after a rerun
    confirms it, saving a checkpoint when there is a --save), a spike is reported."""
    losses = output_tensor.float().view(-1)
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    args = get_args()
    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun_state_machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                                message=f"found {what} in local forward loss calculation")
    if args.check_for_spiky_loss:
        rerun_state_machine.validate_result(
            result=loss, tolerance=0.0, fatal=False, message="Spiky loss",
            rejection_func=partial(rerun_state_machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                   context="loss"))
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model: GPTModel, return_schedule_plan: bool = False):
    """megatron's forward step: logits -> per-token losses, and the loss function to apply."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, partial(loss_func, loss_mask)


def datasets_provider(train_val_test_num_samples, vp_stage: int | None = None):
    """Train/valid/test GPT datasets from --data-path blends (or mock data)."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    dataset_name = "MockGPTDataset" if args.mock_data else "GPTDataset"
    print_rank_0(f"> building train, validation and test datasets ({dataset_name}) ...")
    return build_gpt_datasets(  # check_args has validated --data-path already
        blend,
        get_tokenizer(),
        blend_per_split=blend_per_split,
        mock=args.mock_data,
        sequence_length=args.seq_length,
        num_samples=train_val_test_num_samples,
        split=args.split,
        seed=args.seed,
        path_to_cache=args.data_cache_path,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        validate=False,
    )


# Every rank builds the same loaders, so no rank waits on a broadcast of its batch.
datasets_provider.is_distributed = True
