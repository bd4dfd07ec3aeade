"""Tile configurations of the sm80 (mma.sync) MoBA forward, per head dim.

``bm``: query rows per CTA tile (gathered rows of one (pass, chunk, head) segment, or
contiguous rows of the dense causal diagonal); ``bn``: keys per n-block (a chunk is walked in
n-blocks of ``bn`` with online softmax); ``threads``: 32 per 16 query rows (one mma.sync m16
row strip per warp). Shared memory: ``(bm + 2 * bn) * (head_dim + 8) * 2 + bm * 8`` bytes
(Q tile, one K and one V n-block, padded rows for conflict-free ldmatrix, row table).
"""

from __future__ import annotations

# head_dim -> (bm, bn, threads, stages)
# D = 64: bn = 80. ptxas (sm_80) allocates ~254 of its 255 registers for bn >= 80, so small
# differences decide whether it spills: bn = 128 spilled 8 bytes in the bf16 non-causal first pass
# with nvidia-cutlass-dsl[cu13] 4.8.1 (issue 13), bn = 64 spills 8 bytes in the bf16 diagonal
# pass with both sets, bn = 112 and bm = 128 spill with cu13, bm = 32 with both; bn = 80 (and 96) compile
# clean with both sets and both stage counts (make test-cu13). A chunk is walked in whole
# n-blocks, so bn = 80 computes 1.25x the keys of a C = 64 / 128 / 256 chunk (bn = 128: 2x at
# C = 64, 1x at 128); benchmarks/fwd_tile_ab.py measures the A/B on a GPU.
FWD_TILES = {
    64: (64, 80, 128, 1),
    96: (64, 64, 128, 1),
    128: (64, 64, 128, 1),
}

SUPPORTED_HEAD_DIMS = tuple(sorted(FWD_TILES))

# shared memory a CTA may use on sm80-class parts (bytes; sm86/89 have less, 99 KiB)
SMEM_LIMIT = 99 * 1024


def fwd_smem_bytes(head_dim: int, bm: int, bn: int, stages: int = 1) -> int:
    return (bm + 2 * bn * stages) * (head_dim + 8) * 2 + 3 * bm * 4 + 512


# --- backward (moba_cute/kernels/moba_bwd_sm80.py) ------------------------------------------
# head_dim -> (bm, bn, threads): dK/dV kernel (bn keys per CTA = 16 per warp; bm gathered
# (row, head) entries per inner tile) and dQ pass kernel (bm rows = 16 per warp; bn keys per
# n-block). Shared memory of both: ``2 * (bm + bn) * (head_dim + 8) * 2`` bytes + row tables.
BWD_DKV_TILES = {
    64: (64, 64, 128),
    96: (64, 64, 128),
    128: (64, 64, 128),
}
BWD_DQ_TILES = {
    64: (64, 64, 128),
    96: (64, 32, 128),
    128: (64, 32, 128),
}


def bwd_smem_bytes(head_dim: int, bm: int, bn: int) -> int:
    return 2 * (bm + bn) * (head_dim + 8) * 2 + 5 * bm * 4 + 512
