"""Host side of the CuTe routing: allocation, compile cache and the launch sequence.

``route_cute`` runs 7 kernels on the caller's stream, no host synchronization (all sizes come
from shapes and the host-known bounds of :mod:`moba_cute.routing`), so it can be captured in
a CUDA graph:

1. prep (1 CTA): ``cu_chunks``, query-tile and key-major block offsets, count-table bases
2. centroids: fp32 means + hi/lo split
3. top-k: tensor-core scoring and running top-k -> ``selection``
4. block counts, 5. column scan (segment counts), 6. segment scan -> ``offsets``,
7. ordered block write -> ``query_rows`` (ascending per segment, ``-1`` tail)

Per call the host work is small: everything that depends only on the shapes (bounds, tile
choices, workspace layout, the compiled kernels) is cached per shape (the top-k tile: the
tuner's choice or a tuned table's for the shape class and device, configs/tuned.py, else
configs/routing.py's rule), the scratch buffers
share one workspace allocation, and the kernels are called through
:class:`moba_cute.kernels.common.FastLauncher` with raw addresses.

Timings, per-kernel profile and a large-shape self-check: ``python -m benchmarks.routing``.
"""

from __future__ import annotations

import contextlib

import torch

from ..configs import routing as cfg
from ..configs import tuned
from ..routing import Routing, num_chunks_bound
from . import common

__all__ = ["route_cute", "route_unsupported_reason", "centroids_cute", "topk_family", "tile_override",
           "topk_tile_override"]

# what moba_cute.kernel_paths() reports: on sm90 the top-k scores with warpgroup MMA (head dims
# 64 / 128, configs/routing.py: topk_wgmma_ok; other head dims with mma.sync) and every routing
# kernel is built for sm_90a
KERNEL_FAMILIES = ("sm80", "sm90")

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
INT32_MAX = 2**31 - 1


def _llen(topk, causal):
    return max(1, topk - 1 if causal else topk)


def route_unsupported_reason(dtype, head_dim, chunk_size, topk, arch):
    """None if the CuTe routing kernels support the configuration, else a short reason."""
    if dtype not in _DTYPES:
        return f"routing kernels support float16/bfloat16, not {dtype}"
    if head_dim not in cfg.SUPPORTED_HEAD_DIMS:
        return f"routing kernels support head dims {cfg.SUPPORTED_HEAD_DIMS}, not {head_dim}"
    if not (1 <= int(topk) <= 64):
        return f"routing kernels support 1 <= topk <= 64, not {topk}"
    if int(chunk_size) < 1:
        return f"chunk_size must be positive, not {chunk_size}"
    fam = common.arch_family(arch)
    m = __import__("re").match(r"sm_?(\d+)", str(arch))
    if m is None or int(m.group(1)) < 80:
        return f"routing kernels need sm80 or newer, not {arch}"
    if cfg.topk_tile(fam, head_dim, cfg.list_cap(int(topk))) is None:
        return f"top-k kernel does not fit the shared memory for head_dim={head_dim}, topk={topk} on {arch}"
    return None


def _i32(x, what):
    if x > INT32_MAX:
        raise ValueError(f"moba_cute routing: {what} = {x} exceeds 2^31-1")
    return int(x)


# --- per-kernel fake argument lists (shared with tests/test_routing_compile.py) ---------------

def _P(n):
    import cutlass

    return tuple(common.fake_gptr(cutlass.Int32, 4) for _ in range(n))


def _I(n):
    import cutlass

    return tuple(cutlass.Int32(1) for _ in range(n))


def fake_args_prep():
    return _P(6) + _I(11) + (common.fake_stream(),)


def fake_args_centroids(dtype):
    import cutlass

    I = cutlass.Int32
    return (
        common.fake_gptr(dtype, 16), common.fake_gptr(I, 4), common.fake_gptr(I, 4),
        common.fake_gptr(cutlass.Float32, 16), common.fake_gptr(dtype, 16), common.fake_gptr(dtype, 16),
        common.fake_gptr(I, 4),
    ) + _P(4) + _I(13) + (common.fake_stream(),)


def fake_args_topk(dtype):
    return (
        common.fake_gptr(dtype, 16), common.fake_gptr(dtype, 16), common.fake_gptr(dtype, 16),
    ) + _P(5) + _I(10) + (common.fake_stream(),)


def fake_args_count():
    return _P(6) + _I(7) + (common.fake_stream(),)


def fake_args_colscan():
    return _P(5) + _I(4) + (common.fake_stream(),)


def fake_args_scan():
    return _P(3) + _I(2) + (common.fake_stream(),)


def fake_args_write():
    return _P(10) + _I(12) + (common.fake_stream(),)


def topk_family(arch) -> str:
    """The tuner's tile family of the top-k kernel on ``arch`` (configs/tuned.py)."""
    return common.arch_family(arch) + "_topk"


def topk_choice(head_dim, dtype_name, causal, C, K, rows, arch, device):
    """The tuner's forced top-k tile, else a tuned table's for the call's shape class on CUDA
    device index ``device`` (None: no table applies), else None (configs/routing.py's rule)."""
    fam = topk_family(arch)
    t = tuned.forced(fam, head_dim)
    if t is None and device is not None:
        t = tuned.lookup(fam, head_dim, tuned.shape_class(dtype_name, head_dim, causal, C, K, rows), device)
    return t


def kernel_specs(dtype_name, head_dim, topk, causal, arch, choice=None, tile=None):
    """(key, factory, fake args) of every kernel a routing call with this config may compile
    (the top-k tile: ``tile``, a full one a plan resolved, else ``choice``, a tuner tile where it
    fits, else configs/routing.py's rule)."""
    import cutlass

    from .centroids import CentroidsKernel, ChunkPrepKernel
    from .key_major_index import BlockCountKernel, BlockWriteKernel, ColumnScanKernel, SegmentScanKernel
    from .topk_routing import TopkRoutingKernel

    dt = {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[dtype_name]
    fam = common.arch_family(arch)
    cap = cfg.list_cap(_llen(topk, causal))
    bm, bn, st, mn, ctas, wg = tile if tile is not None else cfg.topk_tile(fam, head_dim, cap, bool(causal), choice)
    vec = int(topk) % 4 == 0  # selection rows 16-byte aligned: vector loads in the key-major passes
    return [
        (("prep",), ChunkPrepKernel, fake_args_prep()),
        (("centroids", dtype_name, head_dim), lambda: CentroidsKernel(dt, head_dim), fake_args_centroids(dt)),
        (("centroids_prep", dtype_name, head_dim), lambda: CentroidsKernel(dt, head_dim, True),
         fake_args_centroids(dt)),
        (("topk", dtype_name, head_dim, cap, bool(causal), bm, bn, st, mn, ctas, wg),
         lambda: TopkRoutingKernel(dt, head_dim, cap, bool(causal), bm, bn, st, mn, ctas, wg), fake_args_topk(dt)),
        (("kmcount", vec), lambda: BlockCountKernel(vec), fake_args_count()),
        (("kmcolscan",), ColumnScanKernel, fake_args_colscan()),
        (("kmscan",), SegmentScanKernel, fake_args_scan()),
        (("kmwrite", vec), lambda: BlockWriteKernel(vec), fake_args_write()),
    ]


_KSETS = {}


def _kernels(dtype, head_dim, topk, causal, arch, tile=None):
    """The kernels of one configuration (by role, compiled on first use), cached per configuration
    and top-k ``tile`` (the full tile :func:`cfg.topk_tile` gave a plan; None: the rule's)."""
    cap = cfg.list_cap(_llen(topk, causal))
    if tile is None:
        tile = cfg.topk_tile(common.arch_family(arch), head_dim, cap, bool(causal))
    sk = (dtype, head_dim, cap, bool(causal), arch, int(topk) % 4 == 0, tile)
    ks = _KSETS.get(sk)
    if ks is None:
        specs = kernel_specs(_DTYPES[dtype], head_dim, topk, causal, arch, tile=tile)
        ks = common.KernelSet({s[0][0]: s for s in specs}, arch)
        _KSETS[sk] = ks
    return ks


def _km_block_rows(total_q, total_k, B, C, H, cap):
    """Rows per key-major block and the per-head count-table bound (host, shapes only)."""
    br = cfg.KM_MIN_BLOCK_ROWS
    budget = max(cap, 1 << 22)
    nbound = num_chunks_bound(total_k, B, C)
    while True:
        kb_bound = (total_q + B * (br - 1)) // br
        # sum_b ceil(Sq_b/br) * ceil(Sk_b/C) <= sum_b (Sq_b/br + 1) (Sk_b/C + 1)
        tb = (total_q * total_k) // (br * C) + total_q // br + total_k // C + B + 3
        tb = min(tb, kb_bound * nbound)
        if H * tb <= budget or br >= max(total_q, 1):
            return br, kb_bound, max(tb, 1)
        br *= 2


class _Plan:
    """Everything of a routing call that depends only on shapes (cached)."""

    def __init__(self, dtype, total_q, H, D, total_k, Hk, B, C, K, causal, arch, device=None):
        G = H // Hk
        fam = common.arch_family(arch)
        cap_l = cfg.list_cap(_llen(K, causal))
        choice = topk_choice(D, _DTYPES[dtype], causal, C, K, total_q * H, arch, device)
        self.topk_tile = tile = cfg.topk_tile(fam, D, cap_l, causal, choice)
        bm = tile[0]
        self.rows_tile = G * (bm // G) if G <= bm else bm
        self.nbound = num_chunks_bound(total_k, B, C)
        self.nseg = self.nbound * H
        self.cap = total_q * H * K
        self.mt_bound = (total_q * G + B * (self.rows_tile - 1)) // self.rows_tile
        self.km_rows, self.kb_bound, self.tb_bound = _km_block_rows(total_q, total_k, B, C, H, self.cap)
        for v, what in ((self.cap, "total_q*H*topk"), (self.nseg + 1, "num_chunks_bound*H+1"),
                        (total_q * H, "total_q*H"), (total_k * Hk * D // 8, "total_k*Hk*D/8"),
                        (self.mt_bound, "query tiles"), (self.tb_bound * H, "key-major count table"),
                        (self.mt_bound * Hk, "query tiles * Hk"), (self.nbound * Hk, "num_chunks_bound*Hk"),
                        (self.nbound * Hk * D, "num_chunks_bound*Hk*D"),
                        (self.cap + 2 * self.kb_bound * H + 1024, "total_q*H*topk + key-major blocks")):
            _i32(v, what)
        self.ks = _kernels(dtype, D, K, causal, arch, tile)
        nb1 = max(self.nbound, 1)
        esz = 2
        # one workspace: fp32 centroids, their hi/lo split, segment counts, the key-major count
        # table, query-tile / key-major block / table offsets, head-major segment offsets
        lay = common.WorkspaceLayout()
        for sz in (nb1 * Hk * D * 4, Hk * nb1 * D * esz, Hk * nb1 * D * esz, max(self.nseg, 1) * 4,
                   self.tb_bound * H * 4, (B + 1) * 4, (B + 1) * 4, (B + 1) * 4, max(self.nseg, 1) * 4):
            lay.add(str(len(lay.offsets)), sz)
        self.offs = list(lay.offsets.values())
        self.ws_bytes = lay.nbytes


PLANS = common.PlanCache(_Plan)


@contextlib.contextmanager
def tile_override(family, tile):
    """Within the block, every routing of ``family`` ("sm90_topk" / "sm80_topk") uses the top-k
    ``tile`` (bm, bn, stages, wgmma), one of its shipped candidates (configs/tuned.py), over the
    tuned tables (``MOBA_TOPK_TILE`` still comes first): what the tuner times. Plans and kernel
    sets are dropped on entry and exit, so calls re-plan with the tile in force."""
    with tuned.forcing(family, tile, cfg.TOPK_TUNE_HEAD_DIMS, _clear_plans):
        yield


def _clear_plans():
    _KSETS.clear()
    PLANS.clear()


@contextlib.contextmanager
def topk_tile_override(tile):
    """Within the block, the top-k kernel uses ``tile`` = (bm, bn, stages, mma_n, ctas_per_sm,
    wgmma) wherever it fits (``configs/routing.py``); for A/B measurements and tests. Cached
    kernel sets and plans are dropped on entry and exit, so calls re-plan with the tile in force."""
    saved = cfg._TILE_OVERRIDE
    try:
        cfg._TILE_OVERRIDE = tuple(int(x) for x in tile)
        _KSETS.clear()
        PLANS.clear()
        yield
    finally:
        cfg._TILE_OVERRIDE = saved
        _KSETS.clear()
        PLANS.clear()


def route_cute(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal):
    """MoBA routing with the CuTe kernels; returns a :class:`moba_cute.routing.Routing`."""
    q = common.kernel_input(q)
    k = common.kernel_input(k)
    cu_q = common.contiguous(cu_seqlens_q)
    cu_k = common.contiguous(cu_seqlens_k)
    total_q, H, D = q.shape
    total_k, Hk, _ = k.shape
    B = cu_q.shape[0] - 1
    C = int(chunk_size)
    K = int(topk)
    causal = bool(causal)
    dev = q.device
    pk = (q.dtype, total_q, H, D, total_k, Hk, B, C, K, causal, dev.index)
    plan = PLANS.get(pk, q.dtype, total_q, H, D, total_k, Hk, B, C, K, causal, common.arch_of(dev), dev.index)
    ks = plan.ks
    nbound, nseg, cap = plan.nbound, plan.nseg, plan.cap
    G = H // Hk
    stream = common.raw_stream(dev)

    # the first two kernels are launched before the outputs they do not touch are allocated:
    # the GPU starts sooner (a timed call otherwise waits for the host's allocations)
    cu_chunks = torch.empty(B + 1, dtype=torch.int32, device=dev)
    ws = torch.empty(plan.ws_bytes, dtype=torch.uint8, device=dev)
    w = ws.data_ptr()
    p_cent, p_hi, p_lo, p_counts, p_table, p_mt, p_kb, p_tb, p_ohm = (w + o for o in plan.offs)
    p_q, p_k, p_cq, p_ck = q.data_ptr(), k.data_ptr(), cu_q.data_ptr(), cu_k.data_ptr()
    p_cc = cu_chunks.data_ptr()
    nb1 = max(nbound, 1)

    cargs = (p_k, p_ck, p_cc, p_cent, p_hi, p_lo, p_counts, p_cq, p_mt, p_kb, p_tb, B, total_k, Hk, H, C, nbound,
             total_q, G, plan.rows_tile, plan.mt_bound, plan.km_rows, plan.kb_bound, plan.tb_bound, stream)
    if B <= cfg.PREP_FUSED_MAX_SEQS and nbound > 0 and Hk > 0:
        # few sequences: the centroids kernel does the prep itself (one launch, no host gap)
        ks["centroids_prep"](*cargs)
    else:
        ks["prep"](p_cq, p_ck, p_cc, p_mt, p_kb, p_tb, B, total_q, total_k, C, G, plan.rows_tile, nbound,
                   plan.mt_bound, plan.km_rows, plan.kb_bound, plan.tb_bound, stream)
        if nbound > 0 and Hk > 0:
            ks["centroids"](*cargs)
    selection = torch.empty(total_q, H, K, dtype=torch.int32, device=dev)
    p_sel = selection.data_ptr()
    if plan.mt_bound > 0 and Hk > 0:
        ks["topk"](p_q, p_hi, p_lo, p_cq, p_ck, p_cc, p_mt, p_sel, B, total_q, total_k, H, Hk, C, K, nb1,
                   plan.mt_bound, plan.rows_tile, stream)
    offsets = torch.empty(nseg + 1, dtype=torch.int32, device=dev)
    query_rows = torch.empty(cap, dtype=torch.int32, device=dev)
    p_off, p_qr = offsets.data_ptr(), query_rows.data_ptr()
    if nseg > 0 and H > 0:
        if plan.kb_bound > 0:
            ks["kmcount"](p_sel, p_cq, p_cc, p_kb, p_tb, p_table, B, total_q, H, K, plan.km_rows, plan.kb_bound,
                          plan.tb_bound, stream)
        ks["kmcolscan"](p_cc, p_kb, p_tb, p_table, p_counts, B, H, plan.tb_bound, nbound, stream)
        ks["kmscan"](p_counts, p_off, p_ohm, nseg, H, stream)
        if plan.kb_bound > 0:
            ks["kmwrite"](p_sel, p_cq, p_ck, p_cc, p_kb, p_tb, p_table, p_off, p_ohm, p_qr, B, total_q, total_k, H, K, C,
                          int(causal), plan.km_rows, plan.kb_bound, plan.tb_bound, nseg, cap, stream)
        elif cap > 0:
            query_rows.fill_(-1)
    else:
        offsets.zero_()
        if cap > 0:
            query_rows.fill_(-1)
    return Routing(
        selection=selection, offsets=offsets, query_rows=query_rows, cu_chunks=cu_chunks,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), chunk_size=C, topk=K, causal=causal, num_kv_heads=Hk,
    )


def centroids_cute(k, cu_seqlens_k, chunk_size):
    """fp32 chunk centroids ``(num_chunks_bound, Hk, D)`` computed by the CuTe kernel."""
    k = common.kernel_input(k)
    cu_k = common.contiguous(cu_seqlens_k)
    total_k, Hk, D = k.shape
    B = cu_k.shape[0] - 1
    C = int(chunk_size)
    nbound = num_chunks_bound(total_k, B, C)
    _i32(total_k * Hk * D // 8, "total_k*Hk*D/8")
    _i32(nbound * Hk, "num_chunks_bound*Hk")
    dev = k.device
    ks = _kernels(k.dtype, D, 1, True, common.arch_of(dev))
    stream = torch.cuda.current_stream(dev).cuda_stream
    nb1 = max(nbound, 1)
    cu_chunks = torch.empty(B + 1, dtype=torch.int32, device=dev)
    small = torch.empty(3 * (B + 1) + nb1, dtype=torch.int32, device=dev)
    cent = torch.empty(nb1, Hk, D, dtype=torch.float32, device=dev)
    c_hi = torch.empty(Hk, nb1, D, dtype=k.dtype, device=dev)
    c_lo = torch.empty_like(c_hi)
    sp = small.data_ptr()
    ks["prep"](cu_k.data_ptr(), cu_k.data_ptr(), cu_chunks.data_ptr(), sp, sp + 4 * (B + 1), sp + 8 * (B + 1),
               B, 0, total_k, C, 1, 1, nbound, 0, 256, 0, 0, stream)
    if nbound > 0 and Hk > 0:
        ks["centroids"](k.data_ptr(), cu_k.data_ptr(), cu_chunks.data_ptr(), cent.data_ptr(), c_hi.data_ptr(),
                        c_lo.data_ptr(), sp + 12 * (B + 1), cu_k.data_ptr(), sp, sp + 4 * (B + 1), sp + 8 * (B + 1),
                        B, total_k, Hk, 0, C, nbound, 0, 1, 1, 0, 256, 0, 0, stream)
    return cent[:nbound]

