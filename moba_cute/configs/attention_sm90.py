"""Tile configurations of the sm90 (wgmma/TMA) MoBA forward segment kernel, per head dim.

``bn``: keys per n-block (one TMA box of K and one of V; a chunk of ``C <= bn`` keys is loaded
once per work unit); ``sub``: 64-row sub-tiles per work unit (one CTA walks up to ``64 * sub``
consecutive entries of one (chunk, head) segment); ``kv_stages``: K/V n-block buffers. A fourth
field 2 (``consumers``) selects ``MobaFwdSm90Pair``: two consumer warpgroups that share every
streamed n-block, one CTA per SM (for chunks longer than ``bn``: half the L2 traffic per FLOP).
Otherwise two CTAs run per SM, each a producer and a consumer warpgroup. Shared memory: ``2 *
consumers * 64 * D * 2`` (two Q stages per consumer warpgroup) ``+ kv_stages * 2 * bn * D * 2``
bytes; the CTAs of one SM must fit in 227 KB. Chosen on the H200 (docs/design.md, section 8).
The pair tile ran 15-24% slower than (64, 8, 2) on moba-large while K and V shared one ring
stage (its two warpgroups hold a stage until both are done with it); since K and V have rings of
their own (``SplitKV``, 2026-12-06) it is the fastest tile on the H100 from 512-key chunks:
:data:`FWD_LONG_CHUNK_TILES`.
"""

from __future__ import annotations

# head_dim -> (bn, sub, kv_stages)
FWD_TILES = {
    64: (128, 8, 1),
    128: (128, 8, 1),
}

# alternatives compiled in CI, run by the GPU tests and timed by the tuner (moba_cute.tune):
# smaller units (more CTAs for short sequences), 64-key n-blocks with two K/V stages, and two
# consumer warpgroups sharing 128-key n-blocks (two stages)
ALT_TILES = {
    64: ((128, 4, 1), (64, 8, 2), (128, 8, 2, 2)),
    128: ((128, 4, 1), (64, 8, 2), (128, 8, 2, 2)),
}

# the wgmma causal diagonal (MobaDiagSm90): head_dim -> (bn, kv_stages). One 64-row Q stage and
# kv_stages K/V n-blocks: 16 + 64 KB at D = 128, two CTAs per SM. On the H100 at moba-large 128K
# (diagonal + merge, ms): (64, 2) 15.7, (64, 3) 15.9, (128, 1) 18.1, (128, 2) 24.4 (one CTA per SM).
DIAG_TILES = {
    64: (64, 2),
    128: (64, 2),
}
# chunks from which the causal diagonal runs on wgmma. H100, diagonal + merge, mma.sync -> wgmma
# with the staged merge, ms: C = 128, D = 128: 8K 0.299 -> 0.286, 32K 1.245 -> 1.197, 64K 2.49 ->
# 2.42; C = 128, D = 64: 8K 0.205 -> 0.174, 32K 0.820 -> 0.700; C = 256 (32K) 1.306 -> 1.227;
# 4096 (128K) 23.7 -> 15.0. Shorter chunks (not measured) keep the mma.sync kernel
DIAG_MIN_CHUNK = 128
# the wgmma diagonal's merge: partials staged in shared memory by cp.async, several slots in
# flight (MobaDiagSm90(staged_merge=True); MOBA_CUTE_FWD_DIAG_STAGED=0 keeps the register-layout
# loads). H100, diagonal + merge, ms, register loads -> staged: moba-large 128K 15.44 -> 14.99,
# flashmoba 64K (C = 128) 3.03 -> 2.42; bitwise the same result
DIAG_STAGED_MERGE = True
# the wgmma diagonal's n-blocks with FlashAttention-3's intra-warpgroup overlap (MobaDiagSm90(overlap=True),
# MOBA_CUTE_FWD_DIAG_OVERLAP; bitwise the same result). H100, whole forward, x of off, two runs:
# moba-large 128K 1.006 / 0.982, moba-large 32K 1.007, C = 2048 (64K) 0.924 / 1.016, C = 512 (32K)
# 1.024 / 1.011, flashmoba 8K 1.025, 64K 1.000: within the runs' spread, off
DIAG_OVERLAP = False

# the wgmma diagonal's tiles of a chunk launched short and long in turn (0, P - 1, 1, P - 2, ...
# of the chunk's P = C / 64 tiles; MobaDiagSm90(interleave=True), MOBA_CUTE_FWD_DIAG_INTERLEAVE;
# the same bits): in index order the CTAs resident together are tiles of about the same length,
# so the short tiles, bound by their merge's partial reads, run together and the long tiles,
# bound by the tensor cores, run together; interleaved, each SM's two CTAs tend to be one of each
DIAG_INTERLEAVE = False

# the segment kernel's streamed loop with Q in registers (RS QK^T; SegVariant(q_regs=True),
# MOBA_CUTE_FWD_QREGS). H100, segment kernel, SS -> RS: moba-large 128K 167.1 -> 163.9 ms, 32K
# 15.8 -> 15.9, C = 512 K = 4 32K 2.19 -> 2.38: off
FWD_Q_REGS = False

# the segment kernel in clusters of two CTAs sharing each K/V n-block by TMA multicast
# (SegVariant(mcast=2), MOBA_CUTE_FWD_MULTICAST): half the L2 -> SM traffic per FLOP. From chunks
# of this many keys, one-consumer tiles without the overlap. H100, segment kernel, ms, one CTA ->
# clusters: moba-large 128K (C = 4096, K = 12) (64, 8, 2) 160.3 -> 156.5 (three GPU starts: -1.4%
# to -2.9%), (128, 8, 1) 173.0 -> 166.1; C = 2048 (K = 8, 64K, B = 1, H = 32/8) (64, 8, 2)
# 27.91 -> 27.57; C = 512 (K = 3, 32K) (64, 8, 2) 1.366 -> 1.440, (128, 8, 1) 1.431 -> 1.475;
# flashmoba 64K (C = 128) 3.47 -> 4.82. With the overlap it is slower still (moba-large
# 176.4 -> 212.1): docs/design.md, section 8. The built-in tile of such chunks is now the pair
# tile (FWD_LONG_CHUNK_TILES, one CTA per SM, no clusters): this serves tuned or forced
# one-consumer tiles
FWD_KV_MULTICAST_MIN_CHUNK = 2048

# the segment kernel for chunks of one n-block (C <= bn) as a persistent walk over its units, two
# CTAs per SM taking units from a counter (SegVariant(persistent=True), MOBA_CUTE_FWD_PERSISTENT):
# the next unit's K/V and Q rows load while this one finishes, instead of each CTA starting with
# its unit decode and loads. H100, flashmoba 64K, segment kernel 3.485 -> 3.095 ms; attention
# given the routing x1.065 (8K) / x1.067 (64K); the same bits (docs/design.md, section 8). On
# since its mbarrier unit hand-over passed the GPU tests and racecheck / memcheck / synccheck
# (H100, 2026-12-07)
FWD_PERSISTENT = True

# the one-pass backward kernel for chunks of one key tile (C <= 128) as a persistent walk over its
# (chunk, KV head) units, about one CTA per SM taking units from a counter (MobaBwdSm90(persistent=
# True), MOBA_CUTE_BWD_PERSISTENT): its one 384-thread CTA per SM otherwise starts each unit with
# the K/V load and the first gathers exposed. H100, whole backward (benchmarks.fwd_env_ab
# --backward, one process, 3 interleaved rounds): flashmoba 8K 1.306 -> 1.265 ms (x1.033), 64K
# 10.44 -> 10.13 (x1.031); the same bits (docs/design.md, section 9). On since its spill-free
# version (ring states from counters, a K/V load per unit) passed test_backward_persistent and
# racecheck / memcheck / synccheck (H100, 2026-12-07); flashmoba f+b 64K 15.95 ms (12.0x FA4)
BWD_PERSISTENT = True

# the sm90 training forward's pair-list kernel also writes the sm90 backward's lists (one pair
# index per routing entry, in place), which the backward takes instead of its own pair-list
# launch (the slot look-ups, ~0.19 ms at flashmoba 64K on the H100); held from the forward to the
# backward in place of the backward's buffer (total_q * H * topk * 4 bytes). On since its tests
# and sanitizer cases passed (H100, 2026-12-07); flashmoba f+b 64K 15.95 -> 15.84 ms, 8K 1.89 -> 1.86
KEEP_BWD_PAIRS = True

# head_dim -> (chunk size from which it is the built-in tile, tile): the pair tile for long chunks
# (below: FWD_TILES). H100, whole forward (benchmarks.fwd_env_ab, one process), ms, previous
# default -> (128, 8, 2, 2). D = 128: moba-large 128K (C = 4096, K = 12) 173.8 -> 152.7 (the then
# tuned (64, 8, 2), in clusters); moba-large 32K 19.14 -> 17.23; C = 2048 (K = 8, 64K, H = 32/8)
# 33.70 -> 29.76 ((128, 8, 1) in clusters); C = 512 (K = 3, 32K) 2.468 -> 2.335; at C = 128 it
# loses (flashmoba 64K 6.19 -> 7.50, 8K 0.88 -> 1.04). D = 64, (128, 8, 1) -> pair: moba-large
# 128K 117.2 -> 104.2, C = 2048 22.23 -> 19.48, C = 512 1.610 -> 1.641 (a loss: not from 512)
FWD_LONG_CHUNK_TILES = {
    64: (2048, (128, 8, 2, 2)),
    128: (512, (128, 8, 2, 2)),
}

# the segment kernel's streamed loops skip O's rescale in a warp whose row maxima all stayed put
# (SegVariant(rescale_skip=True), MOBA_CUTE_FWD_RESCALE_SKIP; bitwise the same result). H100,
# whole forward with the pair tile, random inputs, two runs of 2 and 4 interleaved rounds, x of
# off: moba-large 128K 1.009 / 1.009, moba-large 32K 1.049 / 0.993, C = 2048 0.92 / 0.94 (rounds
# from 1.02 to 0.84), C = 512 0.998 / 0.996: no gain: off
FWD_RESCALE_SKIP = False

# the backward's dQ kernel for chunks over 128 keys: two consumer warpgroups on two sub-tiles
# sharing each 64-key K/V tile (MobaBwdDqSm90Pair; MOBA_CUTE_BWD_DQ_PAIR) instead of splitting
# each 128-key tile's keys over them for one sub-tile (MobaBwdDqSm90). H100, whole backward
# (benchmarks.fwd_env_ab --backward, both with the dK/dV ping-pong and reach skip; the pair
# kernel then without its own skip), ms: moba-large 128K 635.7 -> 592.2, moba-large 32K 69.07 ->
# 65.98, C = 512 (K = 3, 32K) 7.664 -> 7.037; the same bits. Its first version (K and V two
# stages each, K held until the next tile's S and dP were done) was 3.5% slower: tensor pipe 47%
# at half the L2 traffic
BWD_DQ_PAIR = True
# the backward's dK/dV-only kernel (chunks over 128 keys): its two consumer warpgroups (64 keys of
# a 128-key tile each) take turns issuing their wgmmas (MOBA_CUTE_BWD_DKV_PINGPONG; bitwise the
# same dK/dV). H100, whole backward (benchmarks.fwd_env_ab --backward), ms, off -> on: moba-large
# 128K 652.8 -> 642.8, moba-large 32K 72.50 -> 70.53, C = 512 (K = 3, 32K) 7.897 -> 7.773
BWD_DKV_PINGPONG = True
# the long-chunk backward skips a sub-tile's key tiles past its rows' last visible keys (causal
# own-chunk rows; dK/dV: the whole sub-tile in a CTA whose key tile none of its rows sees; dQ: the
# streamed tiles past its reach; MobaBwdDqSm90Pair: per warpgroup). MOBA_CUTE_BWD_REACH_SKIP.
# H100, whole backward with MobaBwdDqSm90 and the ping-pong, ms, off -> on: moba-large 128K
# 657.4 -> 635.7, moba-large 32K 72.92 -> 69.07, C = 512 7.955 -> 7.664; the same bits. The pair
# kernel's own skip (next session, another H100, not an interleaved A/B): 592.2 -> 573.5, 65.98 ->
# 61.76, 7.037 -> 6.927
BWD_REACH_SKIP = True
# the 5-GEMM backward for chunks over 128 keys (MobaBwdSm90(chain=True), MOBA_CUTE_BWD_DQ_CHAIN):
# each 128-key tile's CTA adds its dQ contribution to the pair's fp32 accumulator in key-tile order
# (bulk reduce-adds) instead of the dQ kernel recomputing S and dP. H100, whole backward: moba-large
# 128K 582.7 -> 518.3 ms, 32K 65.0 -> 55.8, C = 512 32K 6.99 -> 5.88 (docs/design.md section 9)
BWD_DQ_CHAIN = True
# ... where its fp32 partials for one KV head (K / Hk times the fp32 dQ accumulator FA2 and FA4
# hold, beyond its 1 GiB floor) are at most this many of those accumulators: topk <= 2 x KV heads
# (moba-large: 1.5, training peak 9.23 GB against FA4's 8.64); above, the pair dQ kernel's bf16
# partials (half the bytes) keep a step that fitted before from running out of memory
BWD_CHAIN_MAX_BOUNDS = 2
# the one-pass kernel's sub-tile (chunks of one key tile, and the chain's per-tile kernel) in
# FA3/FA4's order (MobaBwdSm90(overlap=True)): dV, dQ and dK issued back to back and dQ staged
# while dK runs, instead of dK, drain, dQ, drain, stage; the same bits. H100, whole backward, one
# process, 3 interleaved rounds (sequential -> overlapped): moba-large 128K 521.4 -> 507.9 ms
# (2.7%), moba-large 32K 57.0 -> 55.6, C=512 32K 5.82 -> 5.72, flashmoba 64K 10.64 -> 10.51,
# 8K 1.320 -> 1.312. MOBA_CUTE_BWD_OVERLAP=0 keeps the sequential order everywhere
BWD_OVERLAP = True
#: (dtype, head_dim, causal, chain) whose overlapped kernel spills (ptxas, default or cu13 DSL
#: libraries; dQ, dK and dV in flight together leave little of CONSUMER_REGS): the sequential
#: order serves these (the chain's pipelined hand-over too)
BWD_OVERLAP_SPILLS = frozenset({("float16", 128, False, False), ("bfloat16", 128, False, True),
                                ("float16", 128, True, True), ("float16", 128, False, True)})
# the chain's adding warps pass a sub-tile's semaphore on after issuing the next sub-tile's bulk
# adds (its writes finish meanwhile) and return the staging buffer once read, not written.
# Correct, not faster (H100: 521.4 / 59.7 / 5.90 ms on the shapes above): off
BWD_CHAIN_PIPE = False

SUPPORTED_HEAD_DIMS = tuple(sorted(FWD_TILES))

SMEM_PER_SM = 227 * 1024
CTAS_PER_SM = 2


def fwd_tile(head_dim: int, chunk_size=None) -> tuple:
    """The built-in segment-kernel tile of ``head_dim`` for chunks of ``chunk_size`` keys (None:
    the short-chunk tile)."""
    lo, tile = FWD_LONG_CHUNK_TILES.get(head_dim, (None, None))
    if chunk_size is not None and lo is not None and chunk_size >= lo:
        return tuple(tile)
    return tuple(FWD_TILES[head_dim])


def tile_consumers(tile) -> int:
    """Consumer warpgroups of a tile: its fourth field, else 1."""
    return tile[3] if len(tile) > 3 else 1


def ctas_per_sm(tile) -> int:
    """CTAs per SM the tile's kernel is built for: two with one consumer warpgroup, else one."""
    return CTAS_PER_SM if tile_consumers(tile) == 1 else 1


def fwd_smem_bytes(head_dim: int, bn: int, kv_stages: int, staged: bool = False, consumers: int = 1) -> int:
    # Q ring (2 stages of 64 rows per consumer warpgroup), K and V stages, mbarriers and
    # alignment; staged epilogue: the places of two sub-tiles' rows
    return (2 * consumers * 64 * head_dim * 2 + kv_stages * 2 * bn * head_dim * 2 + 1024 + 128
            + (2 * 64 * 4 if staged else 0))


def unit_rows(head_dim: int) -> int:
    return 64 * FWD_TILES[head_dim][1]
