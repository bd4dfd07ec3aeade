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
#: ... and from this chunk size 1024 threads (few CTAs, each streaming a long chunk; H200, B = 1,
#: 128K cached, C = 4096, Nsight Compute: 223 us with 128 threads, 121 with 256; the whole step
#: 0.290 -> 0.247 ms from 256 to 1024)
SCORE_WIDE_THREADS = 1024
SCORE_WIDE_MIN_CHUNK = 1024
SCORE_UNROLL = 4  # key rows per thread in flight in the centroid sum
#: chunks per warp when the centroids are cached (a warp loads their centroids together and each
#: query row once for all of them; with one chunk per warp, B = 8, 128K cached, C = 128 launched
#: 16K CTAs that read 33.7 MB in 44.6 us on the H200, bound by CTA starts and latency)
SCORE_CACHED_CHUNKS_PER_WARP = 4
ATTEND_WARPS = 8  # attend kernels: one CTA per (query row, head or head group, key split)
#: launch bound of the attend kernels (ptxas otherwise caps them at 64 registers and spills)
ATTEND_MIN_CTAS = 2
KEYS_PER_PIECE = 32  # keys per warp step of the per-head kernel (one per lane in QK^T)
ATTEND_V_UNROLL = 8  # value rows in flight per warp in the per-head kernel
MERGE_THREADS = 128
#: group kernel (the query heads of a KV head per CTA): heads per CTA at most (a lane keeps 8
#: dims of each head's query and output in fp32 registers)
GROUP_MAX_HEADS = 4
#: keys per lane and tile, and tiles in a lane's cp.async ring (one in flight while one is used:
#: 128 KB of shared memory, so one CTA per SM, which also lifts the register cap). H200, graph
#: replay, ms per step at B = 1 / 8, 128K cached, C = 4096, K = 12: (8, 2) 0.247 / 1.725, (8, 3)
#: 0.247 / 1.721, (4, 3) 0.267 / 1.898, (4, 4) 0.267 / 1.902 (fits sm80's 163 KB too)
GROUP_KEYS_PER_LANE = 8
GROUP_STAGES = 2
GROUP_MIN_CTAS = 1
#: head dims whose group kernel runs on tensor cores (DecodeGroupMmaKernel: mma.sync with up to 16
#: query heads of a KV head as the m16 tile's rows), and its head-group sizes
GROUP_MMA_HEAD_DIMS = (32, 64, 128)
GROUP_MMA_SIZES = (1, 2, 4, 8, 16)
#: cp.async ring stages per warp of the tensor-core group kernel (stages - 1 tiles of 16 keys in
#: flight per warp while one is used). H200, B = 1 / 8, 32K / 128K cached, C = 4096 / 1024 /
#: dense: 3 stages within -3 % .. +2 % of 2 (1 CTA per SM either way: ~240 registers a thread).
#: H100, graph replay, x SDPA with (stages, warps) (2, 8) / (3, 8) / (2, 4) / (3, 4) / (4, 4):
#: dense B = 8 at 32K 0.979 / 0.963 / 0.970 / 0.950 / 0.966, at 128K 0.968 / 0.957 / 0.962 /
#: 0.950 / 0.963; cached C = 4096, B = 1, 128K 1.110 / 1.094 / 1.103 / 1.088 / 1.077
GROUP_MMA_STAGES = 2
#: warps per CTA of the tensor-core group kernel (8: one CTA per SM; 4: two). H200, graph replay,
#: x SDPA with 8 / 4 warps at their best waves: B = 1, 32K 0.90 / 0.94, B = 8, 32K 0.91 / 0.93
#: (dense layers), B = 1, 128K, C = 4096, K = 12 0.56 / 0.56, B = 8 0.64 / 0.62: within a few %,
#: so one configuration ships (4 warps at D = 32 would also need a larger selection buffer)
GROUP_MMA_WARPS = 8
#: selective calls take the group kernel (the union of a head group's chunks read once) from
#: this chunk size, with at most GROUP_MAX_CHUNKS chunks; smaller chunks the per-head kernel
GROUP_SELECT_MIN_CHUNK = 1024
GROUP_MAX_CHUNKS = 512
MAX_SPLITS = 64
#: CTAs per SM the key splits may reach at most (8 measured no faster on the H200), and the
#: fewest 32-key pieces per warp of a split
WAVES = 2
MIN_PIECES_PER_WARP = 2
#: a CTA's fixed cost (selection, query load, ring fill, the warps' merge and the split's state
#: write) in 32-key pieces of its main loop, for the split count's makespan model
#: (decode_launch.splits_for): ~4 us against ~0.5 us a piece per SM at 3.8 TB/s (H200, D = 128)
SPLIT_OVERHEAD_PIECES = 8
#: the decode family's tiles for the tuner (moba_cute.tune, configs/tuned.py): the most CTAs per
#: SM the key splits may reach (host-side only: every choice runs the same compiled kernels);
#: WAVES first
WAVE_CHOICES = (2, 1, 3, 4)
