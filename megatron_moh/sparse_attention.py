"""Head-sparse core attention for MoH: a routed head attends only from the tokens that chose it.

Every token uses all shared heads but only ``k`` of the ``E`` routed heads, so most of a routed
head's query rows are multiplied by a gate of exactly 0 in the dense path. Keys and values are
still needed at every position (a later token that chose the head looks back at all earlier
ones), so the saving is in the attention core: QK^T, softmax and PV for the rows a head did not
get.

Layout. The shared heads run torch's causal SDPA over every row. For the routed heads, each
(sequence, routed head) pair with at least one chosen row is a *lane*, and all lanes are batched:

* a lane chosen by most tokens (`SparsePlan.whole_lane_fraction`) is computed whole with the
  causal kernel, which skips the masked half of the score matrix for free;
* the other lanes' chosen rows are packed in position order (padded to the longest lane) and
  cut into chunks of rows. Chunk ``j`` is one SDPA call over the lanes that still have rows
  there, against keys ``0 .. L_j - 1`` (``L_j`` one past the largest position in the chunk),
  with a causal mask built from the rows' original positions. As rows are in position order,
  early chunks see short key prefixes: the chunks recover most of the causal saving. On CPU a
  chunk's keys are further split into the prefix every row sees (no mask) and a masked band,
  merged through their log-sum-exps, so most keys need no mask.

When every routed lane is busy, all heads go through one causal call instead. Planning costs two
or three host synchronisations per call (row counts, chunk plan), so the function cannot be
captured in a CUDA graph.

Gradients. They equal the dense path's for query, key and value, and for every nonzero gate.
For a routed gate that is exactly 0 the dense gradient is <dL/dout, head output>, an output this
function never computes: it returns 0 there. MoH's routers give unchosen heads no gradient path
(weighted gates are masked, binary gates are ``mask * (1 + p - p.detach())``), so a model's
gradients are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SparsePlan:
    """How `head_sparse_attention` lays out the routed lanes. The defaults are measured (CPU, torch
    2.14 flash kernel); tests pass other plans to reach every path with tiny inputs. Any plan gives
    the same result."""

    call_cost_rows: int = 34
    """Smaller chunks follow the causal staircase more closely (a chunk of r of M rows costs about
    (1 + r / M) / 2 of the full key length), but each call's backward also pays per key and lane
    about what this many more rows would cost. The product is smallest near r = sqrt(this * M)."""
    min_chunk_rows: int = 32
    chunk_rows: int | None = None
    """Rows per packed chunk; None: from ``call_cost_rows`` and ``min_chunk_rows``."""
    whole_lane_fraction: float = 0.6
    """A lane chosen by at least this fraction of its sequence's tokens is computed whole: packed
    rows cost about 1.5x more per row than the causal kernel (chunk overshoot, masks, shorter
    calls), so packing stops paying near 2/3 of the rows."""
    split_keys: bool = True
    """On CPU with torch's flash ops, split a packed chunk's keys into the prefix every row sees (no
    mask) and a masked band; False: one masked call per chunk (what other devices run)."""
    min_split_prefix: int = 128
    """Split only from this prefix length: a shorter one saves less mask than the extra call costs."""

    def rows_per_chunk(self, max_rows: int) -> int:
        """Rows per chunk for packed lanes of up to ``max_rows`` rows (a multiple of 16 by default)."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        rows = max(self.min_chunk_rows, math.isqrt(self.call_cost_rows * max_rows))
        return -(-rows // 16) * 16


def _flash_cpu_ops():
    """torch's CPU flash-attention forward and backward ops (they return and take the
    log-sum-exp, which the public SDPA hides), or None where this torch lacks them."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu_ops()


class _Blocks(torch.autograd.Function):
    """Views ``x[:n, a:b]`` of a ``[lanes, rows, d]`` tensor whose backward adds every block's
    gradient into one buffer; plain slicing would allocate a full-size zero gradient per block."""

    @staticmethod
    def forward(ctx, x: Tensor, spans: list[tuple[int, int, int]]) -> tuple[Tensor, ...]:
        ctx.shape, ctx.spans = x.shape, spans
        return tuple(x[:n, a:b] for n, a, b in spans)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor, None]:
        grad = grads[0].new_zeros(ctx.shape)
        for (n, a, b), g in zip(ctx.spans, grads):
            if g is not None:
                grad[:n, a:b] += g
        return grad, None


class _Unblocks(torch.autograd.Function):
    """The inverse of _Blocks: a ``[lanes, rows, d]`` tensor from blocks ``[:n, a:b]`` (rows no
    block covers are 0)."""

    @staticmethod
    def forward(ctx, spans: list[tuple[int, int, int]], shape: torch.Size,
                *blocks: Tensor) -> Tensor:
        ctx.spans = spans
        out = blocks[0].new_zeros(shape)
        for (n, a, b), block in zip(spans, blocks):
            out[:n, a:b] = block
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, None, *(grad[:n, a:b] for n, a, b in ctx.spans))


class _LaneKeys(torch.autograd.Function):
    """Key (or value) rows ``a .. z - 1`` of lanes ``lo .. hi - 1``, one view per span.

    ``source`` is ``[s, batch, groups, d]``; lane ``i`` reads ``(lane_b[i], lane_g[i])``. The
    lanes are copied once; the backward adds every span's gradient into one lane buffer, then
    sums lanes into their (batch, group) with one index_add (lanes of a GQA group add up).
    """

    @staticmethod
    def forward(ctx, source: Tensor, lane_b: Tensor, lane_g: Tensor,
                spans: list[tuple[int, int, int, int]]) -> tuple[Tensor, ...]:
        s, b, g, d = source.shape
        lane_bg = lane_b * g + lane_g
        ctx.save_for_backward(lane_bg)
        ctx.shape, ctx.spans = source.shape, spans
        lanes = source.permute(1, 2, 0, 3).reshape(b * g, s, d).index_select(0, lane_bg)
        return tuple(lanes[lo:hi, a:z] for lo, hi, a, z in spans)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        (lane_bg,) = ctx.saved_tensors
        s, b, g, d = ctx.shape
        lanes = grads[0].new_zeros(len(lane_bg), s, d)
        for (lo, hi, a, z), grad in zip(ctx.spans, grads):
            if grad is not None:
                lanes[lo:hi, a:z] += grad
        by_group = lanes.new_zeros(b * g, s, d).index_add_(0, lane_bg, lanes)
        return by_group.view(b, g, s, d).permute(2, 0, 1, 3), None, None, None


def _causal_rows(positions: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Additive causal mask ``[..., length]`` for rows at ``positions``: 0 on keys at or before
    the position, -inf after; a negative position (padding) sees key 0 only. Rows are copied out
    of one sliding window over a 0/-inf staircase, a single memory pass."""
    stair = torch.full((2 * length - 1,), float("-inf"), dtype=dtype, device=positions.device)
    stair[:length] = 0
    windows = stair.unfold(0, length, 1)  # row i: keys t <= length - 1 - i are visible
    rows = (length - 1 - positions).clamp_(max=length - 1).reshape(-1)
    return windows.index_select(0, rows).view(*positions.shape, length)


class _PrefixBandAttention(torch.autograd.Function):
    """Attention of rows ``q`` ``[n, 1, r, d]`` over a key prefix every row sees (``k_a``,
    ``v_a``, no mask) and a band after it (``k_b``, ``v_b``, additive ``band_mask``).

    Two CPU flash calls merged through their log-sum-exps. The backward runs the flash backward
    on each part with the merged output and log-sum-exp, which gives each part's exact share.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k_a: Tensor, v_a: Tensor, k_b: Tensor, v_b: Tensor,
                band_mask: Tensor, scale: float) -> Tensor:
        forward_op, _ = _FLASH_CPU
        out_a, lse_a = forward_op(q, k_a, v_a, 0.0, False, scale=scale)
        out_b, lse_b = forward_op(q, k_b, v_b, 0.0, False, attn_mask=band_mask, scale=scale)
        lse = torch.logaddexp(lse_a, lse_b)
        out = (torch.exp(lse_a - lse).unsqueeze(-1) * out_a
               + torch.exp(lse_b - lse).unsqueeze(-1) * out_b).to(q.dtype)
        ctx.save_for_backward(q, k_a, v_a, k_b, v_b, band_mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k_a, v_a, k_b, v_b, band_mask, out, lse = ctx.saved_tensors
        _, backward_op = _FLASH_CPU
        grad_out = grad_out.contiguous()
        dq_a, dk_a, dv_a = backward_op(grad_out, q, k_a, v_a, out, lse, 0.0, False, scale=ctx.scale)
        dq_b, dk_b, dv_b = backward_op(grad_out, q, k_b, v_b, out, lse, 0.0, False,
                                       attn_mask=band_mask, scale=ctx.scale)
        return dq_a.add_(dq_b), dk_a, dv_a, dk_b, dv_b, None, None


def _split_keys(start: int, device: torch.device, plan: SparsePlan) -> bool:
    """Whether a chunk whose rows all see keys ``[0, start)`` runs as prefix + masked band."""
    return (plan.split_keys and start >= plan.min_split_prefix and _FLASH_CPU is not None
            and device.type == "cpu")


def _plan_packed(chosen: Tensor, counts: Tensor, plan: SparsePlan):
    """Pack the chosen rows of lanes ``chosen`` ``[lanes, s]`` (sorted by ``counts``, most first)
    and cut them into chunks.

    Returns the packed positions ``[lanes, max_rows]`` (a lane's padding rows hold distinct
    positions it did not choose), the same with -1 on padding (for the masks), and per chunk
    ``(lanes, first row, end row, key length, keys every chosen row in it sees)``.
    """
    device = chosen.device
    # A stable sort of "not chosen" lists a lane's chosen positions first, in position order.
    positions = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices
    max_rows = int(counts[0])  # host sync
    rows = plan.rows_per_chunk(max_rows)
    starts = list(range(0, max_rows, rows))
    positions = positions[:, :max_rows]
    valid = torch.arange(max_rows, device=device)[None, :] < counts[:, None]
    causal_pos = torch.where(valid, positions, -1)  # padding must not widen a chunk
    # Per chunk: lanes that still have rows there, one past its largest position, its smallest.
    lanes_in_chunk = (counts[None, :] > torch.tensor(starts, device=device)[:, None]).sum(dim=1)
    padded = F.pad(causal_pos, (0, len(starts) * rows - max_rows), value=-1)
    padded = padded.view(-1, len(starts), rows)
    key_len = padded.amax(dim=(0, 2)) + 1
    seen_by_all = torch.where(padded < 0, chosen.shape[1], padded).amin(dim=(0, 2))
    plan = torch.stack([lanes_in_chunk, key_len, seen_by_all]).tolist()  # host sync
    chunks = [(n, a, min(a + rows, max_rows), length, start)
              for a, n, length, start in zip(starts, *plan)]
    return positions, causal_pos, chunks


def _sort_lanes(gates: Tensor, first: int, plan: SparsePlan) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """Lanes (sequence x routed head) by rows chosen, most first: the chosen mask ``[lanes, s]``,
    sorted counts, lane ids, and how many lanes are whole-lane busy and non-empty."""
    s, b, hp = gates.shape
    chosen = (gates[:, :, first:] != 0).permute(1, 2, 0).reshape(b * (hp - first), s)
    counts, lanes = torch.sort(chosen.sum(dim=1), descending=True, stable=True)
    whole_rows = max(1, math.ceil(plan.whole_lane_fraction * s))
    n_whole, active = torch.stack([(counts >= whole_rows).sum(), (counts > 0).sum()]).tolist()
    return chosen, counts, lanes, n_whole, active


def _routed_heads(query: Tensor, key: Tensor, value: Tensor, gates: Tensor, first: int,
                  scale: float, sorted_lanes: tuple[Tensor, Tensor, Tensor, int, int], plan: SparsePlan) -> Tensor:
    """Gated attention output ``[s, b, hp - first, d]`` of heads ``first ..``: computed for the
    rows whose gate is nonzero, 0 elsewhere. Lanes with most rows first: whole lanes, then
    packed lanes, then empty lanes (dropped)."""
    s, b, hp, d = query.shape
    num_routed = hp - first
    device = query.device
    out = query.new_zeros(s, b, num_routed, d)
    chosen, counts, lanes, n_whole, active = sorted_lanes
    if active == 0:  # nothing to compute; stay on the autograd graph (gate gradients are 0)
        return out * gates[:, :, first:, None].to(out.dtype)
    lane_b, lane_h = lanes[:active] // num_routed, first + lanes[:active] % num_routed
    lane_g = lane_h // (hp // key.shape[2])
    spans, pieces = [], []
    index = []  # (first lane, positions [lanes, rows]): the whole lanes, then the packed lanes

    if n_whole:
        spans.append((0, n_whole, 0, s))
        index.append((0, torch.arange(s, device=device).expand(n_whole, s)))
    if active > n_whole:
        positions, causal_pos, chunks = _plan_packed(chosen[lanes[n_whole:active]],
                                                     counts[n_whole:active], plan)
        index.append((n_whole, positions))
        for n, _, _, length, start in chunks:
            lo, hi = n_whole, n_whole + n
            if _split_keys(start, device, plan):
                spans += [(lo, hi, 0, start), (lo, hi, start, length)]
            else:
                spans.append((lo, hi, 0, length))
    keys = iter(_LaneKeys.apply(key, lane_b, lane_g, spans))
    values = iter(_LaneKeys.apply(value, lane_b, lane_g, spans))

    if n_whole:  # causal attention over every row of the lane
        q = query.permute(1, 2, 0, 3)[lane_b[:n_whole], lane_h[:n_whole]]  # [lanes, s, d]
        o = F.scaled_dot_product_attention(q[:, None], next(keys)[:, None], next(values)[:, None],
                                           is_causal=True, scale=scale)
        pieces.append(o[:, 0])
    if active > n_whole:
        q_packed = query[positions, lane_b[n_whole:, None], lane_h[n_whole:, None]]
        blocks = [(n, a, z) for n, a, z, _, _ in chunks]
        chunk_out = []
        for (n, a, z, length, start), q in zip(chunks, _Blocks.apply(q_packed, blocks)):
            q = q[:, None]
            if _split_keys(start, device, plan):
                k_a, v_a, k_b, v_b = next(keys), next(values), next(keys), next(values)
                band = _causal_rows(causal_pos[:n, a:z] - start, length - start, query.dtype)
                o = _PrefixBandAttention.apply(q, k_a[:, None], v_a[:, None], k_b[:, None],
                                               v_b[:, None], band[:, None], scale)
            else:
                mask = _causal_rows(causal_pos[:n, a:z], length, query.dtype)
                o = F.scaled_dot_product_attention(q, next(keys)[:, None], next(values)[:, None],
                                                   attn_mask=mask[:, None], scale=scale)
            chunk_out.append(o[:, 0])
        pieces.append(_Unblocks.apply(blocks, q_packed.shape, *chunk_out))

    rows = torch.cat([p.reshape(-1) for _, p in index])  # each output row's position ...
    lane = torch.cat([torch.arange(lo, lo + p.shape[0], device=device)[:, None].expand_as(p)
                      .reshape(-1) for lo, p in index])  # ... and lane
    batch, head = lane_b[lane], lane_h[lane]
    heads = torch.cat([p.reshape(-1, d) for p in pieces])
    # Times (gate != 0): same values, but the zero gates (unchosen rows of whole lanes, padding
    # rows of packed lanes, which sit on unchosen positions) get a zero gradient, as documented.
    row_gates = gates[rows, batch, head]
    row_gates = row_gates * (row_gates != 0)
    # Every (row, batch, head) triple is distinct, so a plain write puts each row in its place.
    return out.index_put_((rows, batch, head - first), heads * row_gates[:, None].to(heads.dtype))


def dense_causal_heads(query: Tensor, key: Tensor, value: Tensor, num_heads: int, scale: float) -> Tensor:
    """Causal SDPA of the first ``num_heads`` query heads over all rows: ``[s, b, n, d]``. Keys
    and values are shared by GQA without copies when the heads cover whole groups."""
    hp, g = query.shape[2], key.shape[2]
    per_group = hp // g
    q = query[:, :, :num_heads].permute(1, 2, 0, 3)  # [b, n, s, d]
    k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
    if num_heads % per_group == 0:
        k, v = k[:, : num_heads // per_group], v[:, : num_heads // per_group]
    else:  # the heads end inside a group: one copy of its keys and values per head
        group = torch.arange(num_heads, device=query.device) // per_group
        k, v = k.index_select(1, group), v.index_select(1, group)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != num_heads)
    return out.permute(2, 0, 1, 3)


def check_inputs(query: Tensor, key: Tensor, value: Tensor, gates: Tensor, num_dense_heads: int) -> None:
    """One-line errors for shapes the head-sparse cores cannot take (both paths share them)."""
    s, b, hp, d = query.shape
    g = key.shape[2]
    if key.shape != (s, b, g, d) or value.shape != key.shape or hp % g:
        raise ValueError(f"key/value {tuple(key.shape)}/{tuple(value.shape)} do not fit query "
                         f"{tuple(query.shape)}: need [s, b, g, d] with g dividing {hp}")
    if gates.shape != (s, b, hp):
        raise ValueError(f"gates {tuple(gates.shape)} should be [s, b, heads] = {(s, b, hp)}")
    if not 0 <= num_dense_heads <= hp:
        raise ValueError(f"num_dense_heads={num_dense_heads} must be between 0 and {hp}")


def head_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    gates: Tensor,
    num_dense_heads: int,
    softmax_scale: float | None = None,
    plan: SparsePlan = SparsePlan(),
) -> Tensor:
    """Gated causal attention that skips the query rows whose routed-head gate is exactly 0.

    Args:
        query: ``[s, b, hp, d]``, rotary embedding already applied.
        key, value: ``[s, b, g, d]``; ``g`` divides ``hp`` and group ``i`` serves query heads
            ``i * hp // g .. (i + 1) * hp // g - 1`` (GQA).
        gates: ``[s, b, hp]`` per-token head gates; a 0 in a routed head marks a row to skip.
        num_dense_heads: how many of the leading local heads are computed for every row (the
            shared heads of this tensor-parallel rank); the heads after them are routed.
        softmax_scale: defaults to ``1 / sqrt(d)``.
        plan: how the routed lanes are laid out (`SparsePlan`; the result does not depend on it).

    Returns:
        ``[s, b, hp * d]`` in ``query``'s dtype, equal to ``gate_heads(causal_attention(query,
        key, value), gates)``. Gradients are exact for query, key, value and nonzero gates; a
        routed gate that is 0 gets gradient 0 (see the module docstring for why that is safe).
    """
    s, b, hp, d = query.shape
    check_inputs(query, key, value, gates, num_dense_heads)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    sorted_lanes = None
    if num_dense_heads < hp:
        sorted_lanes = _sort_lanes(gates, num_dense_heads, plan)
        if sorted_lanes[3] == b * (hp - num_dense_heads):
            # Every routed lane is busy: all heads in one causal call, as cheap as it gets. Same
            # values; a zero routed gate gets a zero gradient, as on the sparse path.
            shared, routed = gates[:, :, :num_dense_heads], gates[:, :, num_dense_heads:]
            gates = torch.cat([shared, routed * (routed != 0)], dim=2)
            num_dense_heads, sorted_lanes = hp, None
    parts = []
    if num_dense_heads:
        dense = dense_causal_heads(query, key, value, num_dense_heads, scale)
        parts.append(dense * gates[:, :, :num_dense_heads, None].to(dense.dtype))
    if sorted_lanes is not None:
        parts.append(_routed_heads(query, key, value, gates, num_dense_heads, scale, sorted_lanes, plan))
    heads = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return heads.reshape(s, b, hp * d)
