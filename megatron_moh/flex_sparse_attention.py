"""Head-sparse MoH attention on FlexAttention: one fused kernel call for every routed head.

The same function as ``megatron_moh.sparse_attention.head_sparse_attention`` (the plain-torch
reference and the CPU path), laid out for ``torch.nn.attention.flex_attention`` so that a GPU
skips the query rows a routed head was not chosen for at the granularity of the kernel's tiles.

Layout, per sequence (``b`` sequences, ``s`` tokens, ``E`` routed heads, each token keeps ``k``):

* every (sequence, routed head) *lane* lists its chosen query rows in position order on one packed
  query axis; each lane is padded to a multiple of the tile size ``block`` by repeating its last
  position, so every query tile belongs to one lane. As every token chooses at most ``k`` routed
  heads, the axis has a fixed length ``C = roundup(s * k + E * (block - 1), block)``; rows past
  the last lane (the tail) see no key. Fixed shapes: one compiled kernel serves every routing.
* keys and values of the ``g`` KV groups lie end to end on one axis of length ``g * s`` (GQA
  without copies). A packed row of head ``h`` at position ``p`` sees keys
  ``[lo, lo + p]`` with ``lo = group(h) * s``: ``mask_mod`` is causal inside its group's segment.
* the ``BlockMask`` is computed from the rows' key ranges per tile (key tiles inside every row's
  range are full, tiles touching some row's range partial), never by evaluating ``mask_mod`` over
  ``C x g * s`` points.
* offsets come from cumsums, rows are gathered and scattered by index and padded rows are written
  to a discarded slot: no host synchronisation and no data-dependent shape in forward or
  backward, so the whole function can later be captured in a CUDA graph.

Shared heads run torch's causal SDPA over every row (flash / cuDNN kernels on a GPU). Gradients
are those of ``head_sparse_attention``: exact for query, key, value and nonzero gates; a routed
gate that is 0 gets gradient 0 (MoH's routers give unchosen heads no gradient path anyway).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron_moh.sparse_attention import check_inputs, dense_causal_heads

# flex_attention's default tile: 128 query rows x 128 keys.
BLOCK = 128

FlexKernel = Callable[..., Tensor]


def packed_length(tokens: int, topk: int, routed_heads: int, block: int = BLOCK) -> int:
    """Length ``C`` of the packed query axis: room for ``tokens * topk`` chosen rows plus each
    lane's padding to a multiple of ``block``, rounded up to whole tiles."""
    rows = tokens * min(topk, routed_heads) + routed_heads * (block - 1)
    return -(-rows // block) * block


@dataclass
class PackedRows:
    """Where each row of the packed query axis comes from, ``[b, C]`` each."""

    position: Tensor
    """Token position of the row (padding repeats its lane's last chosen position)."""
    head: Tensor
    """Local query head of the row's lane."""
    valid: Tensor
    """True for a chosen row, False for padding and tail rows (their outputs are discarded)."""
    kv_lo: Tensor
    """First key the row may see on the concatenated key axis (its group's first key)."""
    kv_hi: Tensor
    """Last key the row may see; ``kv_lo - 1`` (nothing) on tail rows."""


def pack_routed_rows(gates: Tensor, first: int, heads_per_group: int, topk: int,
                     block: int = BLOCK) -> PackedRows:
    """Lay out the chosen rows of routed heads ``first ..`` of ``gates`` ``[s, b, hp]`` (a row is
    chosen where its gate is nonzero; at most ``topk`` routed heads per token) on the packed axis."""
    s, b, hp = gates.shape
    routed = hp - first
    device = gates.device
    length = packed_length(s, topk, routed, block)
    chosen = (gates[:, :, first:] != 0).permute(1, 2, 0)  # [b, E, s]
    rank = chosen.cumsum(-1)
    count = rank[..., -1]  # [b, E] chosen rows per lane
    # Each lane's chosen positions in order; unchosen tokens go to a discarded slot s.
    slot = torch.where(chosen, rank - 1, s)
    positions = torch.arange(s, device=device).expand(b, routed, s)
    in_order = torch.zeros(b, routed, s + 1, dtype=torch.long, device=device).scatter_(-1, slot, positions)
    padded = (count + block - 1) // block * block
    end = padded.cumsum(-1)  # [b, E] one past each lane's last packed row
    torch._assert_async((end[:, -1] <= length).all(),
                        "a token chose more routed heads than topk: the packed rows overflow")
    row = torch.arange(length, device=device).expand(b, length).contiguous()
    lane = torch.searchsorted(end, row, right=True)  # E on tail rows
    tail = lane == routed
    lane = lane.clamp(max=routed - 1)
    index = row - (end - padded).gather(1, lane)  # row index inside its lane
    lane_count = count.gather(1, lane)
    valid = (index < lane_count) & ~tail
    index = torch.minimum(index, (lane_count - 1).clamp(min=0))
    position = in_order.view(b, -1).gather(1, lane * (s + 1) + index)
    head = first + lane
    kv_lo = (head // heads_per_group) * s
    kv_hi = torch.where(tail, kv_lo - 1, kv_lo + position)
    return PackedRows(position, head, valid, kv_lo.to(torch.int32), kv_hi.to(torch.int32))


def _ordered(table: Tensor) -> tuple[Tensor, Tensor]:
    """A ``[b, 1, q_tiles, kv_tiles]`` boolean table as flex's (count, indices of True first)."""
    table = table.to(torch.int32)
    indices = torch.argsort(table, dim=-1, descending=True, stable=True)
    return table.sum(-1, dtype=torch.int32), indices.to(torch.int32)


def routed_block_mask(rows: PackedRows, kv_length: int, block: int = BLOCK) -> BlockMask:
    """The BlockMask of the packed rows against ``kv_length`` keys, from per-tile key ranges.

    Relies on every query tile holding rows of one lane (one ``kv_lo``) or only tail rows, which
    ``pack_routed_rows`` guarantees.
    """
    kv_lo, kv_hi = rows.kv_lo, rows.kv_hi
    b, length = kv_lo.shape
    tiles = lambda t: t.view(b, 1, length // block, block)
    lo, hi_min, hi_max = tiles(kv_lo).amax(-1), tiles(kv_hi).amin(-1), tiles(kv_hi).amax(-1)
    kv_first = torch.arange(0, kv_length, block, device=kv_lo.device)
    kv_last = kv_first + block - 1  # past kv_length on a short last tile: never full
    lo, hi_min, hi_max = lo[..., None], hi_min[..., None], hi_max[..., None]
    full = (kv_first >= lo) & (kv_last <= hi_min)
    partial = (kv_last >= lo) & (kv_first <= hi_max) & (hi_max >= lo) & ~full

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx >= kv_lo[batch, q_idx]) & (kv_idx <= kv_hi[batch, q_idx])

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(length, kv_length))


@functools.cache
def compiled_flex_attention() -> FlexKernel:
    """flex_attention compiled once per process (Triton kernels on a GPU, C++ on CPU)."""
    return torch.compile(flex_attention, dynamic=False)


def flex_available(device: torch.device) -> bool:
    """Whether the layer uses this path on ``device``: a CUDA device with Triton. On CPU the
    compiled kernel has no backward, so training uses the plain path there."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def flex_head_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    gates: Tensor,
    num_dense_heads: int,
    topk: int,
    softmax_scale: float | None = None,
    block: int = BLOCK,
    kernel: FlexKernel | None = None,
) -> Tensor:
    """Gated causal attention that skips the query rows whose routed-head gate is exactly 0.

    Args:
        query: ``[s, b, hp, d]``, rotary embedding already applied.
        key, value: ``[s, b, g, d]``; ``g`` divides ``hp`` (GQA groups, as in megatron).
        gates: ``[s, b, hp]``; a 0 in a routed head marks a row to skip. Each token may have at
            most ``topk`` nonzero routed gates.
        num_dense_heads: the leading local heads computed for every row (shared heads).
        topk: routed heads per token (``moh_topk``); fixes the packed length.
        softmax_scale: defaults to ``1 / sqrt(d)``.
        block: flex tile size (128 on GPUs; tests use smaller tiles on small shapes).
        kernel: called as ``kernel(q, k, v, block_mask=..., scale=...)``; defaults to the compiled
            ``flex_attention``.

    Returns:
        ``[s, b, hp * d]``, equal to ``head_sparse_attention`` with the same arguments.
    """
    s, b, hp, d = query.shape
    check_inputs(query, key, value, gates, num_dense_heads)
    if num_dense_heads < hp and topk < 1:
        raise ValueError(f"topk={topk}: routed heads need topk >= 1")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    parts = []
    if num_dense_heads:
        shared = dense_causal_heads(query, key, value, num_dense_heads, scale)
        parts.append(shared * gates[:, :, :num_dense_heads, None].to(shared.dtype))
    if num_dense_heads < hp:
        parts.append(_routed_heads(query, key, value, gates, num_dense_heads, topk, scale, block,
                                   kernel or compiled_flex_attention()))
    heads = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return heads.reshape(s, b, hp * d)


def _routed_heads(query: Tensor, key: Tensor, value: Tensor, gates: Tensor, first: int, topk: int,
                  scale: float, block: int, kernel: FlexKernel) -> Tensor:
    """Gated outputs ``[s, b, hp - first, d]`` of the routed heads (0 on unchosen rows)."""
    s, b, hp, d = query.shape
    g = key.shape[2]
    rows = pack_routed_rows(gates, first, hp // g, topk, block)
    batch = torch.arange(b, device=query.device)[:, None]
    q = query.permute(1, 2, 0, 3)[batch, rows.head, rows.position]  # [b, C, d]
    k = key.permute(1, 2, 0, 3).reshape(b, 1, g * s, d)
    v = value.permute(1, 2, 0, 3).reshape(b, 1, g * s, d)
    out = kernel(q[:, None], k, v, block_mask=routed_block_mask(rows, g * s, block), scale=scale)
    row_gates = gates[rows.position, batch, rows.head]
    out = out[:, 0] * row_gates[..., None].to(out.dtype)
    # Padding and tail rows go to slot s, which is cut off: each chosen row lands in its place.
    target = torch.where(rows.valid, rows.position, s)
    routed = out.new_zeros(s + 1, b, hp - first, d)
    routed = routed.index_put((target, batch, rows.head - first), out)
    return routed[:s]
