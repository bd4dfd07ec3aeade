"""Sanitizer sweep (issue 13): small adversarial calls through every CuTe kernel family, to run
under compute-sanitizer on the GPU machine. ``benchmarks/sanitize_all.sh OUT_DIR`` runs it once
plainly (the kernels compile into the DSL's disk cache outside the sanitized runs) and then
under memcheck, racecheck, synccheck and initcheck, and writes one summary line per tool to
``OUT_DIR/summary.txt``. By hand:

    python3 -m benchmarks.sanitize --list            # the cases and what each covers
    compute-sanitizer --tool memcheck --report-api-errors no python3 -m benchmarks.sanitize
    python3 -m benchmarks.sanitize --only tiny       # cases whose name contains "tiny"

What runs: the routing (chunk prep, centroids with and without the fused prep, the top-k in
each tile flavour that ``configs/routing.py`` can pick: warpgroup MMA at 4 and 3 CTAs per SM,
register and shared-memory lists, and the mma.sync two-stage tiles forced with
``route_launch.topk_tile_override``; head dims 96/192/256 as routing-only calls), the key-major
index (with and without 16-byte selection loads), the per-slot index, the attention forward of
the device's family (on sm90 also the wgmma diagonal at short chunks, ``MOBA_CUTE_FWD_DIAG_SM90=1``) and the sm80
slot passes (``MOBA_CUTE_FWD_SM80=1``, one- and two-stage), and
the backward (prep with and without dLSE, dK/dV, dQ passes, dQ conversion); on empty and
1-token sequences, Sq > Sk (empty rows), Sq < Sk, chunk sizes that do not divide the lengths,
topk above the chunk count, GQA 8:1, non-causal, thousands of tiny sequences, fp16 and bf16,
head dims 64 and 128, NaN inputs, and wrong ``cu_seqlens`` values without strict checks (the
kernels must clamp, never read or write out of bounds). ``tests/test_sanitize_cases.py``
checks on the CPU that the case list covers all of that. Each case prints ``ok: NAME (s)``;
the exit status is 1 if any case raised. ``--shard K/N`` runs every N-th case (the driver's
warm-up compiles in parallel processes; the DSL's disk cache is shared and written atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Case:
    name: str
    lens_q: tuple
    lens_k: tuple
    H: int = 4
    Hk: int = 4
    D: int = 64
    C: int = 64
    K: int = 4
    causal: bool = True
    dtype: str = "bfloat16"
    grad: bool = True  # forward + backward (else the forward alone, no kept index)
    fwd: str = "auto"  # "auto": the device's forward family; "sm80": MOBA_CUTE_FWD_SM80=1
    stages: int = 0  # sm80 forward stages (MOBA_CUTE_FWD_STAGES), 0: shipped
    # sm90 forward: the partials in windows (MOBA_CUTE_FWD_PARTIAL_BYTES=1: windows of 64 query
    # rows of one head; ``partial_bytes``: that bound, e.g. one KV head's partials)
    windows: bool = False
    partial_bytes: int = 0
    staged: bool = True  # sm90 forward: the segment kernel's staged epilogue (False: MOBA_CUTE_FWD_STAGED=0)
    sm90_tile: tuple = ()  # sm90 forward tile (MOBA_CUTE_SM90_TILES), e.g. (128, 8, 2, 2): two consumer warpgroups
    overlap: bool = False  # sm90 forward: MOBA_CUTE_FWD_OVERLAP=1 (two-stage one-consumer tiles)
    q_regs: bool = False  # sm90 forward: MOBA_CUTE_FWD_QREGS=1 (Q in registers for streamed n-blocks)
    mcast: bool = False  # sm90 forward: MOBA_CUTE_FWD_MULTICAST=1 (clusters of two CTAs, K/V multicast)
    persistent: bool = False  # sm90 forward: MOBA_CUTE_FWD_PERSISTENT=1 (the segment kernel's persistent walk)
    diag_sm90: bool = False  # sm90: the causal diagonal on wgmma at any chunk (MOBA_CUTE_FWD_DIAG_SM90=1)
    diag_staged: bool = False  # ... its merge staged in shared memory (MOBA_CUTE_FWD_DIAG_STAGED=1; else 0)
    diag_interleave: bool = False  # ... its tiles short and long in turn (MOBA_CUTE_FWD_DIAG_INTERLEAVE=1; else 0)
    topk_tile: tuple = ()  # (bm, bn, stages, mma_n, ctas, wgmma): configs/routing.py override
    route_only: bool = False  # head dims the attention kernels do not serve
    nan: bool = False  # NaN in one q row and one key
    bwd_chain: bool = False  # sm90 backward, chunks over 128 keys: the 5-GEMM dQ chain (MOBA_CUTE_BWD_DQ_CHAIN=1)
    chain_pipe: bool = False  # the chain's semaphores released one sub-tile later (MOBA_CUTE_BWD_CHAIN_PIPE=1)
    # the sm90 one-pass backward's sub-tiles in the sequential order (MOBA_CUTE_BWD_OVERLAP=0; else
    # FA3/FA4's, the default where it fits the registers)
    bwd_sequential: bool = False
    bwd_persistent: bool = False  # the one-pass backward's persistent walk (MOBA_CUTE_BWD_PERSISTENT=1)
    keep_pairs: bool = False  # sm90: the training forward writes the backward's pair lists (MOBA_CUTE_KEEP_BWD_PAIRS=1)
    # wrong cu_seqlens values (non-strict): replace the offsets built from the lengths, which
    # still give the tensors' sizes
    cu_q: tuple = ()
    cu_k: tuple = ()
    tags: tuple = field(default=(), compare=False)


def _cyc(pattern, n):
    return tuple(pattern[i % len(pattern)] for i in range(n))


ODD = (1, 17, 113, 300)
PAIR = (128, 8, 2, 2)  # the sm90 forward's two-consumer tile (configs/attention_sm90.py ALT_TILES)
WRONG_LENS = (20, 40)  # 60 query and 60 key tokens
WRONG_CU = {  # name -> (cu_seqlens_q, cu_seqlens_k)
    "past-total": ((0, 20, 200), (0, 20, 60)),
    "start-not-0": ((0, 20, 60), (10, 20, 60)),
    "decreasing": ((0, 50, 30), (0, 20, 60)),
    "negative": ((0, -20, 60), (0, 20, 60)),
    "huge": ((0, 2**31 - 1, 60), (0, 2**31 - 1, 2**31 - 1)),
    "short-total": ((0, 20, 50), (0, 20, 60)),
    "all-past-end": ((0, 100, 200), (0, 100, 200)),
}

# Attention cases use four (dtype, head dim, mode) combinations, so that the warm-up run compiles
# few kernel sets: A = bf16, D 64, causal (topk 4); B = fp16, D 128, non-causal (topk 3);
# C = bf16, D 128, causal; N = fp16, D 64, non-causal.
A = dict(D=64, dtype="bfloat16", causal=True)
B = dict(D=128, dtype="float16", causal=False)
Cc = dict(D=128, dtype="bfloat16", causal=True)
N = dict(D=64, dtype="float16", causal=False)

CASES = [
    # varlen with a 1-token sequence, chunk sizes that do not divide the lengths
    Case("odd", ODD, ODD, 4, 4, C=64, K=4, **A),
    Case("odd-gqa4-fwd-only", ODD, ODD, 8, 2, C=48, K=4, grad=False, **Cc),
    # Sq < Sk, an empty query sequence with keys, Sq > Sk (empty rows); GQA 8:1
    Case("sq-ne-sk-gqa8", (50, 0, 70), (90, 5, 40), 8, 1, C=32, K=4, **A),
    Case("sq-ne-sk-gqa8-noncausal", (50, 0, 70), (90, 5, 40), 16, 2, C=16, K=3, **B),
    # non-causal, topk above the chunk count
    Case("noncausal-topk-above", (40, 90), (40, 90), 2, 2, C=48, K=3, **B),
    Case("noncausal-gqa8", (100, 7, 64, 0), (30, 129, 64, 9), 16, 2, C=16, K=3, **N),
    # own chunk only (no gather pass; non-causal: one slot)
    Case("topk1", (100, 33), (100, 33), 4, 2, C=32, K=1, **A),
    Case("topk1-noncausal", (100, 33), (120, 1), 4, 2, C=32, K=1, **B),
    # thousands of tiny sequences (separate chunk prep: more than PREP_FUSED_MAX_SEQS)
    Case("tiny-2000", _cyc((1, 2, 3), 2000), _cyc((1, 2, 3), 2000), 2, 2, C=16, K=2, **A),
    Case("tiny-1500-noncausal", _cyc((0, 1, 3, 2), 1500), _cyc((2, 0, 3, 1), 1500), 4, 1, C=16, K=3, **B),
    # empty batches
    Case("zero-tokens", (0,), (0,), 4, 2, C=16, K=4, **A),
    Case("zero-tokens-many", (0, 0, 0), (0, 0, 0), 4, 2, C=16, K=3, **B),
    Case("no-queries", (0,), (37,), 4, 2, C=16, K=4, **A),
    Case("no-keys", (19,), (0,), 4, 2, C=16, K=4, **A),
    Case("no-keys-noncausal", (19, 5), (0, 3), 4, 2, C=16, K=3, **B),
    # top-k flavours (on sm90: warpgroup MMA at 4 CTAs/SM for short lists, 3 above
    # TOPK_WGMMA_4CTA_MAX_CAP, shared-memory lists above 16; mma.sync two-stage tiles forced)
    Case("topk-wgmma-3cta", (600, 333), (600, 333), 4, 2, C=32, K=16, **Cc),
    Case("topk-smem-list64", (700, 64), (700, 64), 2, 2, C=16, K=40, **A),
    Case("topk-smem-list32-noncausal", (300,), (300,), 2, 1, C=16, K=20, **B),
    Case("topk-mma-128x32", (257, 31), (257, 31), 4, 4, C=32, K=8, topk_tile=(128, 32, 2, 32, 0, 0), **A),
    Case("topk-mma-64x16", (129, 500), (129, 500), 4, 1, C=16, K=6, topk_tile=(64, 16, 2, 16, 0, 0), **Cc),
    Case("topk-mma-128x16-smem-list", (200, 90), (200, 90), 2, 2, C=16, K=24, topk_tile=(128, 16, 2, 16, 0, 0),
         **N),
    # routing-only head dims (mma.sync top-k; 192/256: query fragments not kept in registers)
    Case("route-d96", (300, 1, 77), (300, 1, 77), 4, 2, 96, 32, 4, route_only=True),
    Case("route-d192", (300, 1, 77), (300, 1, 77), 4, 2, 192, 32, 4, route_only=True),
    Case("route-d256-noncausal", (90, 200), (150, 200), 4, 4, 256, 16, 32, causal=False, route_only=True),
    # the sm80 forward slot passes (on Hopper too), one- and two-stage
    Case("sm80fwd-odd", ODD, ODD, 4, 4, C=64, K=4, fwd="sm80", **A),
    Case("sm80fwd-sq-ne-sk-gqa8", (50, 0, 70), (90, 5, 40), 8, 1, C=32, K=4, fwd="sm80", **A),
    Case("sm80fwd-noncausal-topk-above", (40, 90), (40, 90), 2, 2, C=48, K=3, fwd="sm80", **B),
    Case("sm80fwd-2stage", ODD, ODD, 4, 2, C=16, K=4, fwd="sm80", stages=2, **A),
    Case("sm80fwd-tiny", _cyc((1, 2, 3), 1200), _cyc((1, 2, 3), 1200), 2, 2, C=16, K=4, fwd="sm80", **Cc),
    # the sm90 forward's partials one window at a time (forced): windows of 64 query rows of one
    # head (causal, non-causal), and of one KV head (431 rows x 2 heads x 3 pairs x 132 bytes)
    Case("fwd-windows-odd", ODD, ODD, 8, 4, C=64, K=4, windows=True, **A),
    Case("fwd-windows-noncausal-sq-ne-sk", (50, 0, 70), (90, 5, 40), 8, 2, C=32, K=3, windows=True, **B),
    Case("fwd-windows-kv-odd", ODD, ODD, 8, 4, C=64, K=4, windows=True, partial_bytes=431 * 2 * 3 * 132, **A),
    # the segment kernel's fragment stores (MOBA_CUTE_FWD_STAGED=0; the staged epilogue is the
    # default), with windows
    Case("fwd-unstaged-odd", ODD, ODD, 8, 4, C=64, K=4, windows=True, staged=False, **A),
    # the segment kernel's persistent walk (chunks of one n-block): windows of query rows (many
    # small units), non-causal Sq != Sk with an empty sequence, V tails (C = 112 at D = 128), NaN
    Case("fwd-persistent-odd", ODD, ODD, 8, 4, C=64, K=4, windows=True, persistent=True, **A),
    Case("fwd-persistent-noncausal-sq-ne-sk", (50, 0, 70), (90, 5, 40), 8, 2, C=32, K=3, persistent=True, **B),
    Case("fwd-persistent-tail-nan", (700, 90, 333), (700, 90, 333), 8, 4, C=112, K=4, grad=False, nan=True,
         persistent=True, **Cc),
    # two consumer warpgroups sharing each streamed n-block (MobaFwdSm90Pair): chunks of 2 n-blocks
    # with a V tail, odd sub-tile counts (one warpgroup idle in a unit's last step), short chunks
    # streamed per step, windows of query rows
    Case("fwd-pair-long-chunks", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, grad=False, sm90_tile=PAIR,
         **A),
    Case("fwd-pair-noncausal-sq-ne-sk", (700, 1, 260), (600, 90, 300), 8, 2, C=320, K=2, grad=False,
         sm90_tile=PAIR, **B),
    Case("fwd-pair-short-chunks-windows", ODD, ODD, 8, 4, C=48, K=4, grad=False, windows=True, sm90_tile=PAIR,
         **Cc),
    # the intra-warpgroup overlap of a two-stage one-consumer tile, 4 n-blocks a chunk with a V tail
    Case("fwd-overlap-long-chunks", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, grad=False,
         sm90_tile=(64, 8, 2), overlap=True, **A),
    # Q in registers (RS QK^T) for streamed n-blocks, the Q stage handed back before the first one
    Case("fwd-qregs-long-chunks-windows", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, grad=False,
         sm90_tile=(64, 8, 2), q_regs=True, windows=True, **Cc),
    # K/V multicast in clusters of two CTAs: odd sub-tile counts (rank 1 idle in a unit's last
    # step), V tails in streamed blocks, chunks of one n-block streamed per step
    Case("fwd-mcast-long-chunks", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, grad=False,
         sm90_tile=(64, 8, 2), mcast=True, **A),
    Case("fwd-mcast-short-chunks-windows", (700, 90, 333), (700, 90, 333), 8, 4, C=128, K=4, grad=False,
         sm90_tile=(128, 8, 1), mcast=True, windows=True, **Cc),
    # ... with the intra-warpgroup overlap (a stage held across the next block's wait, on both CTAs)
    Case("fwd-mcast-overlap-long-chunks-windows", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, grad=False,
         sm90_tile=(64, 8, 2), mcast=True, overlap=True, windows=True, **Cc),
    # the causal diagonal on wgmma: Sq > Sk (rows without keys) with tiles across chunks of 48, a
    # chunk of several n-blocks with the last row's block partly past the sequence, windows of
    # query rows, topk 1 (no partials)
    Case("fwd-diag90-sq-ne-sk", (50, 0, 70), (90, 5, 40), 8, 1, C=48, K=4, grad=False, diag_sm90=True, **A),
    Case("fwd-diag90-long-chunks-windows", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, grad=False,
         windows=True, diag_sm90=True, **Cc),
    Case("fwd-diag90-topk1", (100, 33), (100, 33), 4, 2, C=32, K=1, grad=False, diag_sm90=True, **A),
    # the same with the merge staged in shared memory (more partials a row than merge buffers)
    Case("fwd-diag90s-sq-ne-sk", (50, 0, 70), (90, 5, 40), 8, 1, C=16, K=8, grad=False, diag_sm90=True,
         diag_staged=True, **A),
    Case("fwd-diag90s-long-chunks-windows", (450, 17, 300), (450, 17, 300), 4, 2, C=64, K=6, grad=False,
         windows=True, diag_sm90=True, diag_staged=True, **Cc),
    # ... with the tiles of each chunk interleaved (groups of C / 64 tiles; the last group shorter)
    Case("fwd-diag90-interleave-long-chunks-windows", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3,
         grad=False, windows=True, diag_sm90=True, diag_staged=True, diag_interleave=True, **Cc),
    Case("fwd-diag90-interleave-sq-ne-sk", (50, 0, 700), (90, 5, 640), 8, 1, C=256, K=4, grad=False,
         diag_sm90=True, diag_staged=True, diag_interleave=True, **A),
    # chunks over 128 keys (on sm90: the dK/dV-only backward per 128-key tile and the dQ kernel
    # streaming a chunk's key tiles); the last tile of a chunk partly past the sequence
    Case("long-chunks-208", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, **A),
    Case("long-chunks-512-noncausal-gqa4", (700, 1, 260), (600, 90, 300), 8, 2, C=512, K=2, **B),
    Case("long-chunks-nan", (400, 130), (400, 130), 4, 2, C=144, K=3, nan=True, **Cc),
    # the 5-GEMM chain: each key tile's CTA adds its dQ in key-tile order (global semaphores)
    Case("long-chunks-208-chain", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, bwd_chain=True, **A),
    Case("long-chunks-nan-chain", (400, 130), (400, 130), 4, 2, C=144, K=3, nan=True, bwd_chain=True, **Cc),
    Case("long-chunks-512-noncausal-gqa4-chain", (700, 1, 260), (600, 90, 300), 8, 2, C=512, K=2, bwd_chain=True,
         **B),
    Case("long-chunks-208-chain-pipe", (450, 17, 300), (450, 17, 300), 4, 2, C=208, K=3, bwd_chain=True,
         chain_pipe=True, **A),
    # the one-pass backward's sequential order (dK, drain, dQ, drain, stage; the others run FA3/FA4's)
    Case("bwd-sequential-odd", (450, 17, 300), (450, 17, 300), 4, 2, C=64, K=3, bwd_sequential=True, **A),
    Case("bwd-sequential-nan", (400, 130), (300, 200), 8, 2, C=128, K=2, nan=True, bwd_sequential=True, **Cc),
    # ... as a persistent walk over its units (a counter per window of KV heads)
    Case("bwd-persistent-odd", (450, 17, 300), (450, 17, 300), 4, 2, C=64, K=3, bwd_persistent=True, **A),
    Case("bwd-persistent-nan", (400, 130), (300, 200), 8, 2, C=128, K=2, nan=True, bwd_persistent=True, **Cc),
    Case("bwd-persistent-noncausal-gqa8", (100, 7, 64, 0), (30, 129, 64, 9), 16, 2, C=16, K=3,
         bwd_persistent=True, **N),
    # the backward's pair lists written by the training forward's pair-list kernel
    Case("bwd-kept-pairs-odd", (450, 17, 300), (450, 17, 300), 4, 2, C=64, K=3, keep_pairs=True, **A),
    Case("bwd-kept-pairs-noncausal", (100, 7, 64, 0), (30, 129, 64, 9), 16, 2, C=16, K=3, keep_pairs=True, **N),
    # both defaults together: the persistent walk reading the kept lists
    Case("bwd-persistent-kept-pairs", (450, 17, 300), (450, 17, 300), 4, 2, C=64, K=3, bwd_persistent=True,
         keep_pairs=True, **A),
    # NaN in q and k
    Case("nan-inputs", (130, 70), (130, 70), 4, 2, C=16, K=4, nan=True, **A),
    # decode steps (<= 16 queries per sequence, no gradient: kernels/decode.py): selective with
    # GQA, every chunk selected (head groups), several key splits + merge with NaN inputs
    Case("decode-gqa4", (1, 3, 16), (4097, 700, 16), 8, 2, C=128, K=8, grad=False, **Cc),
    Case("decode-every-chunk-noncausal", (2, 1), (300, 50), 8, 2, C=32, K=16, grad=False, **B),
    Case("decode-splits-nan", (1, 1), (9000, 5000), 8, 2, C=1024, K=3, grad=False, nan=True, **A),
    # splits sized by the longest row: the short row's few tiles dealt out, most splits empty
    Case("decode-splits-uneven", (1, 1), (40000, 20), 8, 2, C=40000, K=1, grad=False, **A),
    Case("nan-inputs-sm80fwd", (130, 70), (130, 70), 4, 2, C=16, K=3, nan=True, fwd="sm80", **B),
] + [
    # wrong cu_seqlens values without strict checks: meaningless results, never out of bounds
    Case(f"wrong-cu-{n}", WRONG_LENS, WRONG_LENS, 4, 2, C=16, K=4, cu_q=cq, cu_k=ck, **A)
    for n, (cq, ck) in WRONG_CU.items()
] + [
    Case(f"wrong-cu-{n}-sm80fwd-noncausal", WRONG_LENS, WRONG_LENS, 4, 2, C=16, K=3, fwd="sm80", cu_q=cq, cu_k=ck,
         **B)
    for n, (cq, ck) in WRONG_CU.items()
]


# --------------------------------------------------------------------------------------------
# what a case covers (computed from its parameters; tests/test_sanitize_cases.py checks the union)


def _nchunks(n, C):
    return (n + C - 1) // C


def topk_flavour(case: Case, fam: str = "sm90") -> str:
    """The top-k tile family the routing of ``case`` gets on ``fam`` (configs/routing.py)."""
    from moba_cute.configs import routing as cfg

    llen = max(1, case.K - 1 if case.causal else case.K)
    cap = cfg.list_cap(llen)
    saved = cfg._TILE_OVERRIDE
    try:
        cfg._TILE_OVERRIDE = tuple(case.topk_tile)
        bm, bn, st, mn, ctas, wg = cfg.topk_tile(fam, case.D, cap, case.causal)
    finally:
        cfg._TILE_OVERRIDE = saved
    lists = "reglist" if cap <= 16 else "smemlist"
    if wg:
        return f"wgmma-{ctas or 3}cta-{lists}"
    return f"mma-{bm}x{bn}-{st}stage-{lists}"


def covers(case: Case, fam: str = "sm90") -> set:
    """Properties of a case, computed from its parameters."""
    from moba_cute.configs import routing as rcfg

    t = set()
    lq, lk = case.lens_q, case.lens_k
    t.add(case.dtype)
    t.add(f"D{case.D}")
    t.add("causal" if case.causal else "noncausal")
    if case.cu_q:
        kind = next(n for n, v in WRONG_CU.items() if v == (case.cu_q, case.cu_k))
        t.add(f"wrong-cu:{kind}")
        t.add("fwd-sm80" if case.fwd == "sm80" else "fwd-device")
        return t | {"grad"} if case.grad else t
    if 0 in lq or 0 in lk:
        t.add("empty-seq")
    if 1 in lq or 1 in lk:
        t.add("1-token")
    if sum(lq) == 0:
        t.add("zero-total-q")
    if sum(lk) == 0:
        t.add("zero-total-k")
    if any(a > b for a, b in zip(lq, lk)):
        t.add("sq>sk")
    if any(a < b for a, b in zip(lq, lk)):
        t.add("sq<sk")
    if any(n % case.C for n in lk if n):
        t.add("chunk-not-dividing")
    if case.K > max([_nchunks(n, case.C) for n in lk] + [0]):
        t.add("topk>chunks")
    if case.H // case.Hk == 8:
        t.add("gqa8")
    if len(lq) >= 1000:
        t.add("thousands-of-seqs")
    if case.nan:
        t.add("nan")
    t.add("centroids-fused-prep" if len(lk) <= rcfg.PREP_FUSED_MAX_SEQS else "centroids-separate-prep")
    t.add(f"topk:{topk_flavour(case, fam)}")
    t.add("kmindex-vec16" if case.K % 4 == 0 else "kmindex-scalar")
    if case.route_only:
        t.add("route-only")
        return t
    t.add("fwd-sm80" if case.fwd == "sm80" else "fwd-device")
    if case.fwd == "sm80" and case.stages == 2:
        t.add("fwd-sm80-2stage")
    if case.windows and case.fwd != "sm80" and case.Hk > 1:
        t.add("fwd-windows-kv" if case.partial_bytes else "fwd-windows-rows")
    if case.fwd != "sm80":
        if len(case.sm90_tile) > 3 and case.sm90_tile[3] == 2:
            t.add("fwd-pair")  # (fragment stores: the staged flag does not apply)
        elif case.overlap or case.q_regs or case.mcast:
            t.update(tag for tag, on in (("fwd-overlap", case.overlap), ("fwd-qregs", case.q_regs),
                                         ("fwd-mcast", case.mcast)) if on)
        else:
            t.add("fwd-staged" if case.staged else "fwd-unstaged")
            if case.persistent and case.staged and case.C <= 128:
                t.add("fwd-persistent")
        if case.diag_sm90 and case.causal:
            t.add("fwd-diag90")
            if case.diag_staged:
                t.add("fwd-diag90-staged")
            if case.diag_interleave:
                t.add("fwd-diag90-interleave")
    if case.K == 1:
        t.add("own-chunk-only")
    if case.C > 128:
        t.add("chunk>128")
        if case.bwd_chain and case.grad:
            t.add("bwd-chain-pipe" if case.chain_pipe else "bwd-chain")
    if case.grad and (case.C <= 128 or case.bwd_chain):  # (the one-pass kernel: either sub-tile order)
        t.add("bwd-sequential" if case.bwd_sequential else "bwd-overlap")
        if case.bwd_persistent and case.C <= 128 and not case.bwd_sequential:
            t.add("bwd-persistent")
    if case.grad and case.keep_pairs:
        t.add("bwd-kept-pairs")
    t.add("grad" if case.grad else "fwd-only")
    return t


# --------------------------------------------------------------------------------------------
# running


def _cu(lens, dev):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=dev)


def build(case: Case, device="cuda", seed=0):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a case."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = getattr(torch, case.dtype)
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    q = torch.randn(tq, case.H, case.D, generator=g).to(device=device, dtype=dt)
    k = torch.randn(tk, case.Hk, case.D, generator=g).to(device=device, dtype=dt)
    v = torch.randn(tk, case.Hk, case.D, generator=g).to(device=device, dtype=dt)
    if case.nan:
        q[tq // 2, 0, 1] = float("nan")
        k[tk // 3, 0, 2] = float("nan")
    if case.cu_q:
        cq = torch.tensor(case.cu_q, dtype=torch.int32, device=device)
        ck = torch.tensor(case.cu_k, dtype=torch.int32, device=device)
    else:
        cq, ck = _cu(case.lens_q, device), _cu(case.lens_k, device)
    return q, k, v, cq, ck, max(case.lens_q + (0,)), max(case.lens_k + (0,))


_ENV_NAMES = ("MOBA_CUTE_FWD_SM80", "MOBA_CUTE_FWD_STAGES", "MOBA_CUTE_FWD_PARTIAL_BYTES", "MOBA_CUTE_FWD_STAGED",
              "MOBA_CUTE_SM90_TILES", "MOBA_CUTE_FWD_OVERLAP", "MOBA_CUTE_FWD_DIAG_SM90", "MOBA_CUTE_FWD_DIAG_STAGED",
              "MOBA_CUTE_FWD_DIAG_INTERLEAVE",
              "MOBA_CUTE_FWD_QREGS", "MOBA_CUTE_FWD_MULTICAST", "MOBA_CUTE_FWD_RESCALE_SKIP", "MOBA_CUTE_BWD_DQ_CHAIN",
              "MOBA_CUTE_BWD_DQ_PAIR", "MOBA_CUTE_BWD_DKV_PINGPONG", "MOBA_CUTE_BWD_REACH_SKIP",
              "MOBA_CUTE_BWD_CHAIN_PIPE", "MOBA_CUTE_BWD_OVERLAP", "MOBA_CUTE_FWD_PERSISTENT",
              "MOBA_CUTE_BWD_PERSISTENT", "MOBA_CUTE_KEEP_BWD_PAIRS")


@contextlib.contextmanager
def _env(case: Case):
    """The forward family / stages / partial windows and top-k tile a case asks for (launch
    plans re-planned); the switches a case does not set are unset (their defaults)."""
    from moba_cute.kernels import attention_launch, route_launch

    from .common import environment

    env = {"MOBA_CUTE_FWD_SM80": "1" if case.fwd == "sm80" else "0",
           "MOBA_CUTE_FWD_OVERLAP": "1" if case.overlap else "0",
           "MOBA_CUTE_FWD_QREGS": "1" if case.q_regs else "0",
           "MOBA_CUTE_FWD_MULTICAST": "1" if case.mcast else "0",
           "MOBA_CUTE_FWD_PERSISTENT": "1" if case.persistent else "0",
           "MOBA_CUTE_FWD_STAGED": "1" if case.staged else "0",
           "MOBA_CUTE_BWD_DQ_CHAIN": "1" if case.bwd_chain else "0",
           "MOBA_CUTE_BWD_CHAIN_PIPE": "1" if case.chain_pipe else "0",
           "MOBA_CUTE_BWD_OVERLAP": "0" if case.bwd_sequential else "1",
           "MOBA_CUTE_BWD_PERSISTENT": "1" if case.bwd_persistent else "0",
           "MOBA_CUTE_KEEP_BWD_PAIRS": "1" if case.keep_pairs else "0"}
    if case.diag_sm90:  # (other cases: the chunk-size default; both merges have cases of their own)
        env["MOBA_CUTE_FWD_DIAG_SM90"] = "1"
        env["MOBA_CUTE_FWD_DIAG_STAGED"] = "1" if case.diag_staged else "0"
        env["MOBA_CUTE_FWD_DIAG_INTERLEAVE"] = "1" if case.diag_interleave else "0"
    if case.sm90_tile:
        env["MOBA_CUTE_SM90_TILES"] = ",".join(map(str, case.sm90_tile))
    if case.windows:
        env["MOBA_CUTE_FWD_PARTIAL_BYTES"] = str(case.partial_bytes or 1)
    if case.stages:
        env["MOBA_CUTE_FWD_STAGES"] = str(case.stages)
    tile = route_launch.topk_tile_override(case.topk_tile) if case.topk_tile else contextlib.nullcontext()
    with environment(env, _ENV_NAMES):
        attention_launch.FWD_PLANS.clear()
        attention_launch.BWD_PLANS.clear()
        try:
            with tile:
                yield
        finally:
            attention_launch.FWD_PLANS.clear()
            attention_launch.BWD_PLANS.clear()


def run_case(case: Case, device="cuda", backend="cute", grad=None):
    """One case through the public API (``grad``: override the case's forward+backward)."""
    import moba_cute

    grad = case.grad if grad is None else grad
    q, k, v, cq, ck, mq, mk = build(case, device)
    with _env(case):
        if case.route_only:
            moba_cute.route(q, k, cq, ck, mq, mk, case.C, case.K, case.causal, backend=backend)
        else:
            if grad:
                for t in (q, k, v):
                    t.requires_grad_(True)
            o, lse = moba_cute.varlen_attention(q, k, v, cq, ck, mq, mk, case.C, case.K, case.causal,
                                                return_lse=True, backend=backend)
            if grad:
                w = torch.linspace(-1, 1, o.shape[-1], device=o.device)
                loss = (o.float() * w).nan_to_num().sum() + lse.nan_to_num(0.0, 0.0, 0.0).sum()
                loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the cases and what each covers")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th case from the K-th (parallel warm-up)")
    args = ap.parse_args(argv)
    k, n = (int(x) for x in args.shard.split("/"))
    cases = [c for i, c in enumerate(c for c in CASES if args.only in c.name) if i % n == k]
    if args.list:
        for c in cases:
            print(f"{c.name}: {' '.join(sorted(covers(c)))}")
        return 0
    torch.manual_seed(0)
    failed = 0
    t_all = time.perf_counter()
    for c in cases:
        t0 = time.perf_counter()
        try:
            run_case(c)
        except Exception as e:  # noqa: BLE001 (report every case; the exit status says it failed)
            failed += 1
            print(f"FAILED: {c.name}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"ok: {c.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"sanitize: {len(cases) - failed}/{len(cases)} cases ok in {time.perf_counter() - t_all:.1f} s",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
