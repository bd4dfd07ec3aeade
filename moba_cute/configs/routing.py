"""Tile configurations of the routing kernels, per arch family, head dim and list capacity.

Top-k kernel: ``bm`` packed query rows per CTA (``bm`` threads, one row per thread in the
selection, ``bm/32`` warps stacked along M for mma.sync m16n8k16), ``bn`` centroids per tile.
Shared memory: centroid tiles ``4*bn*(D+8)*2`` (two stages of hi and lo), the query tile
``bm*(D+8)*2``, the score tile ``bn*(bm+4)*4`` (aliased onto the query tile when the query
fragments live in registers, D <= 128) and, for list capacities above 16, the running lists
``bm*cap*8``. The first candidate of ``TOPK_TILE_CANDIDATES`` that fits the arch is used.

Key-major index: blocks of ``km_block_rows`` query rows (host-chosen power of two >= 256 so
that the per-(block, chunk) count table stays within the selection's size).
"""

from __future__ import annotations

TOPK_TILE_CANDIDATES = ((128, 32), (128, 16), (64, 32), (64, 16))

# shared memory a CTA may use (bytes)
SMEM_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}

# static capacities of the running top-k lists: register lists (<= 16) are compiled for their
# exact length; longer lists live in shared memory with capacity 32 or 64
LIST_CAPS = (8, 16, 32, 64)

SUPPORTED_HEAD_DIMS = (64, 96, 128, 192, 256)

KM_MIN_BLOCK_ROWS = 256


def list_cap(list_len: int) -> int:
    """Static list capacity: the exact length for register lists (<= 16), else 32 or 64."""
    if list_len <= 16:
        return max(1, list_len)
    for c in LIST_CAPS:
        if list_len <= c:
            return c
    raise ValueError(f"top-k list length {list_len} > {LIST_CAPS[-1]}")


def topk_smem_bytes(head_dim: int, bm: int, bn: int, cap: int) -> int:
    dp = head_dim + 8
    hoist = head_dim <= 128
    s = 4 * bn * dp * 2 + bm * dp * 2 + (0 if hoist else bn * (bm + 4) * 4)
    if cap > 16:
        s += bm * cap * 8
    return s + 1024


def topk_tile(fam: str, head_dim: int, cap: int):
    """(bm, bn) of the top-k kernel, or None if nothing fits the arch's shared memory."""
    for bm, bn in TOPK_TILE_CANDIDATES:
        if topk_smem_bytes(head_dim, bm, bn, cap) <= SMEM_LIMIT[fam]:
            return bm, bn
    return None
