"""Attended (query, key) pairs and FLOPs, SPEC section 4.

``pairs`` counts the (query, key) pairs a method actually attends, summed over all query heads
and all sequences of the batch. Forward FLOPs = 4 * D * pairs (two matmuls, QK^T and PV, of
2 * D FLOPs per pair); backward = 2.5 x forward, so forward+backward = 3.5 x forward.

* Dense causal (FA2, FA4): query i of a sequence with Sq queries and Sk keys sits at key
  position p = i + Sk - Sq and attends keys 0..p, i.e. min(max(p + 1, 0), Sk) pairs;
  S(S+1)/2 per head when Sq = Sk = S.
* MoBA: per query, the sum over its selected chunks j of the keys of chunk j
  ([jC, min((j+1)C, Sk))) that the causal mask keeps (t <= p). Computed from a routing
  selection (:func:`moba_pairs_from_selection`), or, in causal mode where it does not depend
  on the scores, in closed form (:func:`moba_causal_pairs`).
"""

from __future__ import annotations

import torch

__all__ = [
    "dense_pairs",
    "moba_causal_pairs",
    "moba_pairs_from_selection",
    "fwd_flops",
    "fwdbwd_flops",
    "tflops",
    "BWD_FACTOR",
]

BWD_FACTOR = 2.5


def dense_pairs(seqlens_q, seqlens_k, H: int, causal: bool = True) -> int:
    """Pairs of dense attention, summed over heads and sequences (bottom-right causal)."""
    total = 0
    for sq, sk in zip(seqlens_q, seqlens_k):
        sq, sk = int(sq), int(sk)
        if not causal:
            total += sq * sk
            continue
        # queries i = 0..sq-1 attend min(max(i + sk - sq + 1, 0), sk) keys
        off = sk - sq
        lo = max(0, -off)  # first query with p >= 0
        # for i in [lo, sq): count = min(i + off + 1, sk); i + off + 1 <= sk always (i < sq)
        n = sq - lo
        if n > 0:
            first = lo + off + 1
            total += n * first + n * (n - 1) // 2
    return total * H


def moba_causal_pairs(seqlens_q, seqlens_k, H: int, chunk_size: int, topk: int) -> int:
    """Closed-form MoBA pairs in causal mode (any valid selection gives this count).

    A query at key position p >= 0 attends the first p - cC + 1 keys of its own chunk
    c = p // C, plus min(topk - 1, c) whole past chunks (past chunks lie entirely before the
    own chunk, hence are full).
    """
    C, K = int(chunk_size), int(topk)
    total = 0
    for sq, sk in zip(seqlens_q, seqlens_k):
        sq, sk = int(sq), int(sk)
        p0 = max(0, sk - sq)
        if p0 >= sk:
            continue
        p = torch.arange(p0, sk, dtype=torch.int64)
        c = torch.div(p, C, rounding_mode="floor")
        total += int(((p - c * C + 1) + torch.clamp(c, max=K - 1) * C).sum())
    return total * H


def moba_pairs_from_selection(selection: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                              chunk_size: int, causal: bool = True, rows_per_step: int = 1 << 18) -> int:
    """Pairs attended under ``selection`` ((total_q, H, topk) int local chunk ids, -1 unused).

    Runs on the selection's device in steps of ``rows_per_step`` query rows (bounded memory).
    Selected chunk ids are assumed distinct per row (true of every valid routing).
    """
    dev = selection.device
    cu_q = cu_seqlens_q.to(device=dev, dtype=torch.int64)
    cu_k = cu_seqlens_k.to(device=dev, dtype=torch.int64)
    total_q = selection.shape[0]
    lens_q = cu_q[1:] - cu_q[:-1]
    lens_k = cu_k[1:] - cu_k[:-1]
    seq = torch.repeat_interleave(torch.arange(lens_q.numel(), device=dev), lens_q, output_size=total_q)
    C = int(chunk_size)
    total = torch.zeros((), dtype=torch.int64, device=dev)
    for r0 in range(0, total_q, rows_per_step):
        r1 = min(total_q, r0 + rows_per_step)
        s = seq[r0:r1]
        rows = torch.arange(r0, r1, device=dev, dtype=torch.int64)
        sk = lens_k[s]
        p = rows - cu_q[s] + sk - lens_q[s]  # key position of each query
        j = selection[r0:r1].to(torch.int64)
        start = j * C
        end = torch.minimum((j + 1) * C, sk.view(-1, 1, 1))
        if causal:
            end = torch.minimum(end, (p + 1).view(-1, 1, 1))
        n = torch.clamp(end - start, min=0) * (j >= 0)
        total += n.sum()
    return int(total)


def fwd_flops(pairs: int, D: int) -> int:
    return 4 * int(D) * int(pairs)


def fwdbwd_flops(pairs: int, D: int) -> float:
    return fwd_flops(pairs, D) * (1.0 + BWD_FACTOR)


def tflops(flops: float | None, ms: float | None) -> float | None:
    """Effective TFLOP/s, or None when either figure is missing."""
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12
