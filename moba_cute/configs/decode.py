"""Limits and launch shape of the decode-step kernels (:mod:`moba_cute.kernels.decode`), the same
on sm80 and sm90 (CUDA-core code: a decode step is bound by memory and latency, not by MMA).

A call takes the decode path when it needs no gradient, has at most ``MAX_QUERIES`` queries
per sequence, ``1 <= topk <= MAX_TOPK``, at most ``MAX_CHUNKS`` chunks per sequence (the attend
kernel holds one row's chunk scores in shared memory: 32 KB), a head dim in
``SUPPORTED_HEAD_DIMS``, ``num_heads <= MAX_GRID_Y`` and at most ``MAX_SCORES`` chunk scores;
else the general path.
"""

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
MAX_QUERIES = 16
MAX_TOPK = 64
MAX_CHUNKS = 8192
MAX_GRID_Y = 65535
#: chunk scores of a call (batch * max_seqlen_q * num_heads * chunks, fp32) at most: 1 GiB (a
#: varlen batch of many sequences with one long one would size them by the longest)
MAX_SCORES = 1 << 28

SCORE_THREADS = 128  # centroid + score kernel: one CTA per (sequence, chunk, KV head)
SCORE_UNROLL = 4  # key rows per thread in flight in the centroid sum
ATTEND_WARPS = 8  # attend kernel: one CTA per (sequence, row x head, key split)
#: launch bound of the attend kernel (ptxas otherwise caps it at 64 registers and spills)
ATTEND_MIN_CTAS = 2
KEYS_PER_PIECE = 32  # keys per warp step (one per lane in QK^T)
ATTEND_V_UNROLL = 8  # value rows in flight per warp in the per-head attend kernel
MERGE_THREADS = 128
#: every-chunk kernel: per-lane output registers of its heads (GT * D / 32) at most
GROUP_ACC_REGS = 16


def all_v_unroll(dtype_name: str, head_dim: int, group: int) -> int:
    """Value rows in flight per warp in the every-chunk kernel: 4 (H200, B=1, 32K cached, C=4096,
    4 heads per CTA: 0.080 ms; 2: 0.129 ms), 2 where 4 spills at 128 registers (ptxas: fp16
    with 4 heads of 128 or 7 of 64, bf16 with 8 heads of 64)."""
    if group * head_dim >= 448 and (dtype_name == "float16" or head_dim < 128):
        return 2
    return 4
#: and head dims up to this (D = 256: a key piece alone takes 128 registers)
GROUP_MAX_HEAD_DIM = 128
MAX_SPLITS = 64
#: CTAs per SM the key splits aim for (8 measured no faster on the H200), and the fewest 32-key
#: pieces per warp of a split
WAVES = 2
MIN_PIECES_PER_WARP = 2
