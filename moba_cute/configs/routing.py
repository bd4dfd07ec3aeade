"""Tile configurations of the routing kernels, per arch family, head dim and list capacity.

Top-k kernel: ``bm`` packed query rows per CTA (``bm`` threads, one row per thread in the
selection, ``bm/32`` warps stacked along M for mma.sync m16n8k16), ``bn`` centroids per tile,
``stages`` centroid buffers. Shared memory: centroid tiles ``stages*2*bn*(D+8)*2`` (hi and lo),
the query tile ``bm*(D+8)*2``, the score tile ``bn*(bm+4)*4`` (aliased onto the query tile when
the query fragments live in registers, D <= 128, and it fits) and, for list capacities above
16, the running lists ``bm*cap*8``.

Two tile families (measured on an H200, docs/routing.md):

* narrow (default): the first of ``TOPK_TILE_CANDIDATES`` that fits, 32-column tiles, two
  centroid buffers;
* wide (sm90, rows of >= ``TOPK_WIDE_MIN_CHUNKS`` chunks, D <= 64 or list length <= 7 at
  D = 128): 64-column tiles, one centroid buffer (fetched while the previous tile is
  selected), 3 CTAs per SM. Wider tiles mean fewer, larger insertion rounds (less of the
  per-warp maximum over 32 rows wasted), which pays on long rows; on short rows the single
  buffer's exposed load latency and the partial last tile cost more than that saves.

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

# rows (in chunks) from which the wide top-k tile is used, and its shared-memory budget (three
# CTAs per SM on sm90)
TOPK_WIDE_MIN_CHUNKS = 256
TOPK_WIDE_SMEM = 75 * 1024

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


def topk_wide_ok(fam: str, head_dim: int, cap: int) -> bool:
    """Whether the wide tile (128, 64, 1 stage) is shipped for this configuration: sm90, and
    it keeps 3 CTAs per SM without spilling (ptxas: D <= 64, or list length <= 7 at D = 128)."""
    return (fam == "sm90" and cap <= 16 and (head_dim <= 64 or (head_dim == 128 and cap <= 7))
            and topk_smem_bytes(head_dim, 128, 64, cap, 1) <= TOPK_WIDE_SMEM)


def topk_tile(fam: str, head_dim: int, cap: int, wide: bool = False):
    """(bm, bn, stages) of the top-k kernel, or None if nothing fits the arch's shared memory."""
    if wide and topk_wide_ok(fam, head_dim, cap):
        return 128, 64, 1
    for bm, bn in TOPK_TILE_CANDIDATES:
        if topk_smem_bytes(head_dim, bm, bn, cap) <= SMEM_LIMIT[fam]:
            return bm, bn, 2
    return None
