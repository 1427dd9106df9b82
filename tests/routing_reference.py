"""Routing statistics counted the long way, as the yardstick for megatron_moh.analysis.heads: the
routers' inputs are captured with forward hooks, the gates recomputed with the paper's equations
(tests/reference.py), and every statistic counted token by token in numpy and plain Python."""

from __future__ import annotations

import numpy
import torch

from megatron_moh.router import HeadRouter
from tests.reference import RefSettings, reference_gates


def settings(router: HeadRouter) -> RefSettings:
    """The reference's description of a router's layer."""
    cfg = router.config
    return RefSettings(heads=cfg.num_attention_heads, groups=cfg.num_query_groups, head_dim=cfg.kv_channels,
                       shared=cfg.moh_num_shared_heads, topk=cfg.moh_topk, router=cfg.moh_router,
                       gate=cfg.moh_gate, two_stage=cfg.moh_two_stage)


def sequence_batches(tokens: numpy.ndarray, seq_length: int, micro_batch_size: int) -> list[torch.Tensor]:
    """The batches the tool documents: full sequences, ``micro_batch_size`` at a time, then the rest."""
    rows = [tokens[i:i + seq_length] for i in range(0, len(tokens), seq_length)]
    full = [r for r in rows if len(r) == seq_length]
    batches = [torch.tensor(numpy.stack(full[i:i + micro_batch_size])) for i in range(0, len(full), micro_batch_size)]
    return batches + [torch.tensor(r)[None] for r in rows if len(r) < seq_length]


def reference_stats(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, list]:
    """Per layer (and routed head): token counts per head, head load, mean gate where chosen, mean
    and std of the per-token entropy, adjacent overlap; also checks that the gates the model
    applied are the equations' gates."""
    routers = sorted((m for m in model.modules() if isinstance(m, HeadRouter)), key=lambda r: r.layer_number)
    captured: dict[int, list] = {i: [] for i in range(len(routers))}
    handles = [r.register_forward_hook(lambda mod, args, out, i=i: captured[i].append((args, out)))
               for i, r in enumerate(routers)]
    model.eval()
    with torch.no_grad():
        for ids in batches:
            model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
    for handle in handles:
        handle.remove()
    result: dict[str, list] = {k: [] for k in ("counts", "head_load", "mean_gate", "entropy_mean", "entropy_std",
                                               "adjacent_overlap")}
    for layer, router in enumerate(routers):
        cfg = settings(router)
        routed = cfg.heads - cfg.shared
        counts, gate_sums = numpy.zeros(routed, dtype=numpy.int64), numpy.zeros(routed)
        entropies, overlaps = [], []
        for (hidden, query), applied in captured[layer]:
            with torch.no_grad():
                gates, probs, _ = reference_gates(hidden, query, getattr(router, "weight", None), cfg)
            torch.testing.assert_close(applied, gates, rtol=1e-5, atol=1e-6)
            probs = probs.double().numpy()
            gates = gates[..., cfg.shared:].double().numpy()
            seq, batch = probs.shape[:2]
            for b in range(batch):
                chosen_before = None
                for t in range(seq):
                    p = probs[t, b]
                    chosen = set(numpy.argsort(-p, kind="stable")[:cfg.topk].tolist())
                    for head in chosen:
                        counts[head] += 1
                        gate_sums[head] += gates[t, b, head]
                    entropies.append(-sum(q * numpy.log(q) for q in p if q > 0))
                    if chosen_before is not None:
                        overlaps.append(len(chosen & chosen_before) / cfg.topk)
                    chosen_before = chosen
        tokens = len(entropies)
        result["counts"].append(counts.tolist())
        result["head_load"].append((counts / tokens).tolist())
        result["mean_gate"].append([g / c if c else None for g, c in zip(gate_sums, counts)])
        result["entropy_mean"].append(float(numpy.mean(entropies)))
        result["entropy_std"].append(float(numpy.std(entropies)))
        result["adjacent_overlap"].append(float(numpy.mean(overlaps)))
    return result


# The reference recomputes the router logits with its own matmul, so probabilities and gates
# differ from the model's in the last float32 bits: averages agree to 1e-6, not bit for bit.
# Counts agree exactly (a top-k flip would need two probabilities within ~1e-7 of each other).
TOLERANCE = dict(rtol=0, atol=1e-6)


def assert_stats_match(ours: dict, reference: dict, tokens: int) -> None:
    """The tool's numbers equal the reference's: head counts exactly, averages within `TOLERANCE`."""
    counts = numpy.rint(numpy.array(ours["head_load"]) * tokens).astype(int)
    assert counts.tolist() == reference["counts"]
    numpy.testing.assert_allclose(numpy.array(ours["head_load"]) * tokens, reference["counts"], rtol=0, atol=1e-9)
    for key in ("entropy_mean", "entropy_std", "adjacent_overlap"):
        numpy.testing.assert_allclose(ours[key], reference[key], **TOLERANCE, err_msg=key)
    for ours_row, ref_row in zip(ours["mean_gate"], reference["mean_gate"]):
        assert [g is None for g in ours_row] == [g is None for g in ref_row]
        numpy.testing.assert_allclose([g for g in ours_row if g is not None],
                                      [g for g in ref_row if g is not None], **TOLERANCE)
