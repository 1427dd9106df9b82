"""What the head routers of a trained MoH model do on given tokens, per layer and routed head.

`RoutingRecorder` hooks every `HeadRouter` of a one-process model (as
`megatron_moh.conversion.whole_model.load_model` returns it) and accumulates, over all tokens it
sees:

- head load: the fraction of tokens whose top-k includes the head (uniform routing: k / E);
- mean gate: the mean gate value the head's output is multiplied by, over the tokens that chose it
  (weighted gates: ``k * p_i / sum_topk p``, times the two-stage weight; binary: 1);
- routing entropy: ``-sum_i p_i ln p_i`` of the routed probabilities, per token (at most ln E),
  as its mean and standard deviation over tokens;
- adjacent overlap: ``|chosen(t) & chosen(t+1)| / k`` for neighbouring tokens of one sequence
  (1: the next token keeps the same heads; independent uniform routing: k / E).

`analyze` runs a model over token samples and `build_report` / `format_table` turn the result
into the JSON and the text table of ``tools/analyze_heads.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_moh.analysis.sources import TokenSample
from megatron_moh.router import HeadRouter


@dataclass
class RoutingStats:
    """Per-layer, per-routed-head routing statistics of one token sample (see the module docstring)."""

    tokens: int
    head_load: list[list[float]]
    mean_gate: list[list[float | None]]
    entropy_mean: list[float]
    entropy_std: list[float]
    adjacent_overlap: list[float]


class RoutingRecorder:
    """Forward hooks on a model's head routers that count what they route; `reset` between samples."""

    def __init__(self, model: torch.nn.Module):
        self.routers = sorted((m for m in model.modules() if isinstance(m, HeadRouter)), key=lambda r: r.layer_number)
        if not self.routers:
            raise ValueError("the model has no head router (a dense model)")
        first = self.routers[0]
        if any(r.tp_size != 1 for r in self.routers):
            raise ValueError("routing analysis needs the whole model in one process (TP=1)")
        self.num_shared, self.num_routed, self.topk = first.num_shared, first.num_routed, first.topk
        self._layer = {id(router): i for i, router in enumerate(self.routers)}
        self._handles = [r.register_forward_hook(self._record) for r in self.routers]
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        layers, heads = len(self.routers), self.num_routed
        zeros = functools.partial(torch.zeros, dtype=torch.float64)
        self.tokens = zeros(layers)
        self.chosen, self.gate_sum = zeros(layers, heads), zeros(layers, heads)
        self.entropy_sum, self.entropy_sq_sum = zeros(layers), zeros(layers)
        self.overlap_sum, self.pairs = zeros(layers), zeros(layers)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()

    def _record(self, router: HeadRouter, args: tuple, gates: torch.Tensor) -> None:
        layer = self._layer[id(router)]
        with torch.no_grad():
            _, probs, mask = router.route(*args)  # [s, b, E]: what forward routed with
            routed_gates = gates[..., self.num_shared:].double()
            mask, probs = mask.double(), probs.double()
            entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
            self.tokens[layer] += mask.shape[0] * mask.shape[1]
            self.chosen[layer] += mask.sum(dim=(0, 1)).cpu()
            self.gate_sum[layer] += (routed_gates * mask).sum(dim=(0, 1)).cpu()
            self.entropy_sum[layer] += entropy.sum().cpu()
            self.entropy_sq_sum[layer] += entropy.square().sum().cpu()
            self.overlap_sum[layer] += ((mask[1:] * mask[:-1]).sum() / self.topk).cpu()
            self.pairs[layer] += (mask.shape[0] - 1) * mask.shape[1]

    def stats(self) -> RoutingStats:
        """The statistics of everything recorded since the last `reset`."""
        tokens = self.tokens[:, None]
        gate = torch.where(self.chosen > 0, self.gate_sum / self.chosen.clamp_min(1), torch.nan)
        mean = self.entropy_sum / self.tokens
        std = (self.entropy_sq_sum / self.tokens - mean.square()).clamp_min(0).sqrt()
        return RoutingStats(
            tokens=int(self.tokens[0]),
            head_load=(self.chosen / tokens).tolist(),
            mean_gate=[[None if math.isnan(v) else v for v in row] for row in gate.tolist()],
            entropy_mean=mean.tolist(),
            entropy_std=std.tolist(),
            adjacent_overlap=(self.overlap_sum / self.pairs.clamp_min(1)).tolist(),
        )


def analyze(model: torch.nn.Module, samples: Sequence[TokenSample], seq_length: int, micro_batch_size: int,
            device: torch.device, progress: bool = True) -> dict[str, RoutingStats]:
    """Run ``model`` (evaluation mode, no gradients) over each sample, cut into sequences of
    ``seq_length`` tokens (the last one shorter), and return each sample's routing statistics."""
    from tqdm import tqdm

    recorder = RoutingRecorder(model)
    model.eval()
    results = {}
    total = sum(len(s.tokens) for s in samples)
    try:
        with torch.no_grad(), tqdm(total=total, unit="tok", disable=not progress, dynamic_ncols=True) as bar:
            for sample in samples:
                recorder.reset()
                bar.set_description(sample.source.name)
                for batch in _batches(sample.tokens, seq_length, micro_batch_size):
                    ids = batch.to(device)
                    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
                    model(ids, positions, attention_mask=None)
                    bar.update(ids.numel())
                results[sample.source.name] = recorder.stats()
    finally:
        recorder.remove()
    return results


def _batches(tokens: Any, seq_length: int, micro_batch_size: int):
    """``[batch, seq]`` id tensors: full sequences in groups of ``micro_batch_size``, then the rest."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    full = len(tokens) // seq_length
    rows = tokens[: full * seq_length].view(full, seq_length)
    yield from rows.split(micro_batch_size)
    if len(tokens) % seq_length:
        yield tokens[full * seq_length:][None]


def build_report(checkpoint: dict[str, Any], model: dict[str, Any], samples: Sequence[TokenSample],
                 stats: dict[str, RoutingStats]) -> dict[str, Any]:
    """Every number of an analysis, JSON-ready: the checkpoint, the model's routing layout, and per
    dataset its sample and statistics; ``head_load_difference`` holds each dataset's head load
    minus the first dataset's."""
    first = samples[0].source.name
    datasets = {}
    for sample in samples:
        name = sample.source.name
        datasets[name] = dict(source=sample.source.path, tokens=stats[name].tokens, documents=sample.documents,
                              **{k: v for k, v in vars(stats[name]).items() if k != "tokens"})
    difference = {
        f"{name} - {first}": [[a - b for a, b in zip(row, base)]
                              for row, base in zip(stats[name].head_load, stats[first].head_load)]
        for name in stats if name != first
    }
    return dict(checkpoint=checkpoint, model=model, datasets=datasets, head_load_difference=difference)


def format_table(report: dict[str, Any]) -> str:
    """A short text table: per layer and dataset, each routed head's load, the entropy and the overlap."""
    model = report["model"]
    routed, topk = model["num_routed_heads"], model["topk"]
    lines = [
        f"{report['checkpoint']['path']} (iteration {report['checkpoint']['iteration']}): "
        f"{model['num_layers']} layers, {model['num_attention_heads']} heads = {model['num_shared_heads']} shared "
        f"+ top-{topk} of {routed} routed ({model['router']} router, {model['gate']} gates)",
        f"head load = fraction of tokens routed to the head (uniform {topk / routed:.2f}); entropy in nats "
        f"(max ln {routed} = {math.log(routed):.2f}); overlap of adjacent tokens' heads (random {topk / routed:.2f})",
    ]
    names = list(report["datasets"])
    width = max(7, *(len(n) for n in names))
    lines.append(f"{'layer':>5}  {'dataset':<{width}}  {'head load':<{6 * routed}}  entropy  overlap")
    for layer in range(model["num_layers"]):
        for i, name in enumerate(names):
            data = report["datasets"][name]
            loads = " ".join(f"{v:5.2f}" for v in data["head_load"][layer])
            lines.append(f"{layer if i == 0 else '':>5}  {name:<{width}}  {loads:<{6 * routed}}  "
                         f"{data['entropy_mean'][layer]:7.3f}  {data['adjacent_overlap'][layer]:7.3f}")
    lines.append("tokens: " + ", ".join(f"{n} {report['datasets'][n]['tokens']}" for n in names))
    return "\n".join(lines)
