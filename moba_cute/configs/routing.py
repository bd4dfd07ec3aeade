"""Tile configurations of the routing kernels, per arch family, head dim and list capacity.

Top-k kernel: ``bm`` packed query rows per CTA (``bm`` threads, one row per thread in the
selection, ``bm/32`` warps stacked along M for mma.sync m16n8k16, or one warpgroup for
wgmma), ``bn`` centroids per tile,
``stages`` centroid buffers. Shared memory: centroid tiles ``stages*2*bn*(D+8)*2`` (hi and lo),
the query tile ``bm*(D+8)*2``, the score tile ``bn*(bm+4)*4`` (aliased onto the query tile when
the query fragments live in registers, D <= 128, and it fits) and, for list capacities above
16, the running lists ``bm*cap*8``.

Two tile families (measured on an H200, docs/routing.md):

* warpgroup MMA (sm90, D = 64 and 128): 128 rows (one warpgroup), 32-column tiles, one
  centroid buffer (the next tile is fetched while the current one is selected), RS wgmma
  m64n32k16 (query fragments in registers, centroid slabs 128-byte swizzled), 4 CTAs per SM
  where ptxas fits it in 128 registers (``TOPK_WGMMA_4CTA_MAX_CAP``). H200, 64K flashmoba
  top-k: 1.05 ms with the mma.sync one-stage tile it replaces, 0.87 ms with it;
* mma.sync two-stage (sm80, and the other head dims on sm90): the first of
  ``TOPK_TILE_CANDIDATES`` that fits, 32-column tiles, two centroid buffers (tile t+1 loads
  during tile t), 32-column MMA passes.

Key-major index: blocks of ``km_block_rows`` query rows (host-chosen power of two >= 256 so
that the per-(block, chunk) count table stays within the selection's size).
"""

from __future__ import annotations

import os

TOPK_TILE_CANDIDATES = ((128, 32), (128, 16), (64, 32), (64, 16))

# shared memory a CTA may use (bytes)
SMEM_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}

# static capacities of the running top-k lists: register lists (<= 16) are compiled for their
# exact length; longer lists live in shared memory with capacity 32 or 64
LIST_CAPS = (8, 16, 32, 64)

# sm90 warpgroup-MMA tile (D = 64 and 128): 32-column tiles, one centroid buffer, 32-column
# wgmma passes; 4 CTAs per SM (<= 128 registers) up to these register-list lengths, where ptxas
# fits it without spilling, else ptxas's own register count (3 CTAs per SM)
TOPK_WGMMA_4CTA_MAX_CAP = {64: 16, 128: 12}

SUPPORTED_HEAD_DIMS = (64, 96, 128, 192, 256)

# rows per key-major block at least (H200, 64K flashmoba: 256 -> 512 made the count and column
# scan passes 20 us faster; 1024 slows the write pass)
KM_MIN_BLOCK_ROWS = 512


# batches of up to this many sequences skip the prep kernel: the centroids kernel computes the
# chunk bookkeeping with one warp lane per sequence (kernels/centroids.py)
PREP_FUSED_MAX_SEQS = 32

def list_cap(list_len: int) -> int:
    """Static list capacity: the exact length for register lists (<= 16), else 32 or 64."""
    if list_len <= 16:
        return max(1, list_len)
    for c in LIST_CAPS:
        if list_len <= c:
            return c
    raise ValueError(f"top-k list length {list_len} > {LIST_CAPS[-1]}")


def topk_smem_bytes(head_dim: int, bm: int, bn: int, cap: int, stages: int = 2) -> int:
    dp = head_dim + 8
    alias = head_dim <= 128 and bn * (bm + 4) * 4 <= bm * dp * 2
    s = stages * 2 * bn * dp * 2 + bm * dp * 2 + (0 if alias else bn * (bm + 4) * 4)
    if cap > 16:
        s += bm * cap * 8
    return s + 1024


def topk_wgmma_ok(fam: str, head_dim: int, bm: int) -> bool:
    """Whether the top-k kernel can score with warpgroup MMA: sm90, one warpgroup of 128 rows,
    query fragments in registers and 128-byte swizzled centroid slabs (D = 64 or 128)."""
    return fam == "sm90" and bm == 128 and head_dim in (64, 128)


# tuning override for A/B measurements: MOBA_TOPK_TILE="bm,bn,stages,mma_n,ctas,wgmma" replaces
# the choice below for every configuration it fits (read once, at import; within one process:
# kernels/route_launch.py::topk_tile_override)
_TILE_OVERRIDE = tuple(int(x) for x in os.environ.get("MOBA_TOPK_TILE", "").split(",") if x.strip())

# head dims whose top-k tiles the tuner times (moba_cute.tune, configs/tuned.py families
# "sm90_topk" / "sm80_topk"); tests/test_routing_compile.py compiles every candidate for them
TOPK_TUNE_HEAD_DIMS = (64, 128)


def _rule_tiles(fam: str, head_dim: int) -> tuple:
    """The top-k tiles in the built-in rule's order of preference, as ``(bm, bn, stages,
    wgmma)``: the warpgroup-MMA tile where the arch has it (sm90, D = 64 / 128), then the
    mma.sync two-stage ``TOPK_TILE_CANDIDATES``."""
    wg = ((128, 32, 1, 1),) if topk_wgmma_ok(fam, head_dim, 128) else ()
    return wg + tuple((bm, bn, 2, 0) for bm, bn in TOPK_TILE_CANDIDATES)


def topk_tune_tiles(fam: str, head_dim: int) -> tuple:
    """The top-k tiles the tuner may choose among for ``head_dim`` on arch family ``fam``: the
    rule's tiles (:func:`_rule_tiles`, the built-in choice first) at ``TOPK_TUNE_HEAD_DIMS``,
    where every one fits the shared memory of both archs for every list capacity."""
    return _rule_tiles(fam, head_dim) if head_dim in TOPK_TUNE_HEAD_DIMS else ()


def _expand(fam: str, head_dim: int, cap: int, choice):
    """A tile ``(bm, bn, stages, wgmma)`` as a full one (``mma_n`` 32; warpgroup MMA aims at 4
    CTAs per SM up to ``TOPK_WGMMA_4CTA_MAX_CAP``), or None where it does not fit."""
    bm, bn, st, wg = (int(x) for x in choice)
    if topk_smem_bytes(head_dim, bm, bn, cap, st) > SMEM_LIMIT[fam] or (wg and not topk_wgmma_ok(fam, head_dim, bm)):
        return None
    ctas = (4 if cap <= TOPK_WGMMA_4CTA_MAX_CAP[head_dim] else 0) if wg else 0
    return bm, bn, st, 32, ctas, bool(wg)


def topk_tile(fam: str, head_dim: int, cap: int, causal: bool = True, choice=None):
    """(bm, bn, stages, mma_n, ctas_per_sm, wgmma) of the top-k kernel (``ctas_per_sm`` 0: no
    occupancy target; ``wgmma``: sm90 warpgroup MMA instead of mma.sync), or None if nothing
    fits the arch's shared memory. First ``MOBA_TOPK_TILE`` (the A/B override), then ``choice``
    (a :func:`topk_tune_tiles` entry: the tuner's or a tuned table's), where they fit; else the
    first of the rule's tiles that fits."""
    if len(_TILE_OVERRIDE) == 6:
        bm, bn, st, mn, ctas, wg = _TILE_OVERRIDE
        if topk_smem_bytes(head_dim, bm, bn, cap, st) <= SMEM_LIMIT[fam] and (
                not wg or topk_wgmma_ok(fam, head_dim, bm)):
            return bm, bn, st, mn, ctas, bool(wg)
    for c in ((choice,) if choice is not None else ()) + _rule_tiles(fam, head_dim):
        t = _expand(fam, head_dim, cap, c)
        if t is not None:
            return t
    return None
