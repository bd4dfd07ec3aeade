"""Host side of the CuTe routing: allocation, compile cache and the launch sequence.

``route_cute`` runs 7 kernels on the caller's stream, no host synchronization (all sizes come
from shapes and the host-known bounds of :mod:`moba_cute.routing`), so it can be captured in
a CUDA graph:

1. prep (1 CTA): ``cu_chunks`` and the query-tile offsets from ``cu_seqlens`` (clamped)
2. centroids: fp32 means + hi/lo split; zeroes the segment counters
3. top-k: tensor-core scoring and running top-k -> ``selection``
4. count, 5. scan -> ``offsets``, 6. scatter, 7. per-segment sort -> ``query_rows``

Run ``python -m moba_cute.kernels.route_launch --bench`` on a GPU for timings.
"""

from __future__ import annotations

import torch

from ..configs import routing as cfg
from ..routing import Routing, num_chunks_bound
from . import common

__all__ = ["route_cute", "route_unsupported_reason", "centroids_cute"]

_DTYPES = (torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1


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
    bm, bn = cfg.TOPK_TILES[fam][head_dim]
    need = cfg.topk_smem_bytes(head_dim, bm, bn, cfg.list_cap(int(topk)))
    if need > cfg.SMEM_LIMIT[fam]:
        return f"top-k kernel needs {need} bytes of shared memory for head_dim={head_dim}, topk={topk} on {arch}"
    return None


def _i32(x, what):
    if x > INT32_MAX:
        raise ValueError(f"moba_cute routing: {what} = {x} exceeds 2^31-1")
    return int(x)


def _ptr(t, align=16):
    return common.gptr(t, align=align)


def _compiled(key, make_kernel, fake_args, arch):
    import cutlass.cute as cute

    def build():
        return cute.compile(make_kernel(), *fake_args, options=common.compile_options(arch))

    return common.cached_compile(key + (arch,), build)


# --- per-kernel fake argument lists (shared with tests/test_routing_compile.py) ---------------

def fake_args_prep():
    import cutlass

    I = cutlass.Int32
    P = lambda: common.fake_gptr(I, 4)  # noqa: E731
    return (P(), P(), P(), P()) + tuple(I(1) for _ in range(8)) + (common.fake_stream(),)


def fake_args_centroids(dtype):
    import cutlass

    I = cutlass.Int32
    return (
        common.fake_gptr(dtype, 16), common.fake_gptr(I, 4), common.fake_gptr(I, 4),
        common.fake_gptr(cutlass.Float32, 16), common.fake_gptr(dtype, 16), common.fake_gptr(dtype, 16),
        common.fake_gptr(I, 4),
    ) + tuple(I(1) for _ in range(6)) + (common.fake_stream(),)


def fake_args_topk(dtype):
    import cutlass

    I = cutlass.Int32
    return (
        common.fake_gptr(dtype, 16), common.fake_gptr(dtype, 16), common.fake_gptr(dtype, 16),
    ) + tuple(common.fake_gptr(I, 4) for _ in range(5)) + tuple(I(1) for _ in range(10)) + (common.fake_stream(),)


def fake_args_count():
    import cutlass

    I = cutlass.Int32
    return tuple(common.fake_gptr(I, 4) for _ in range(7)) + tuple(I(1) for _ in range(6)) + (common.fake_stream(),)


def fake_args_scan():
    import cutlass

    I = cutlass.Int32
    return tuple(common.fake_gptr(I, 4) for _ in range(3)) + (I(1), common.fake_stream())


def fake_args_sort():
    import cutlass

    I = cutlass.Int32
    return tuple(common.fake_gptr(I, 4) for _ in range(5)) + tuple(I(1) for _ in range(4)) + (common.fake_stream(),)


def kernel_specs(dtype_name, head_dim, topk, causal, arch):
    """(key, factory, fake args) of every kernel a routing call with this config compiles."""
    import cutlass

    from .centroids import CentroidsKernel, ChunkPrepKernel
    from .key_major_index import SegmentCountKernel, SegmentScanKernel, SegmentSortKernel
    from .topk_routing import TopkRoutingKernel

    dt = {"float16": cutlass.Float16, "bfloat16": cutlass.BFloat16}[dtype_name]
    fam = common.arch_family(arch)
    bm, bn = cfg.TOPK_TILES[fam][head_dim]
    llen = max(1, topk - 1 if causal else topk)
    cap = cfg.list_cap(llen)
    return [
        (("prep",), ChunkPrepKernel, fake_args_prep()),
        (("centroids", dtype_name, head_dim), lambda: CentroidsKernel(dt, head_dim), fake_args_centroids(dt)),
        (("topk", dtype_name, head_dim, cap, bool(causal), bm, bn),
         lambda: TopkRoutingKernel(dt, head_dim, cap, bool(causal), bm, bn), fake_args_topk(dt)),
        (("kmcount", False), lambda: SegmentCountKernel(False), fake_args_count()),
        (("kmcount", True), lambda: SegmentCountKernel(True), fake_args_count()),
        (("kmscan",), SegmentScanKernel, fake_args_scan()),
        (("kmsort",), SegmentSortKernel, fake_args_sort()),
    ]


_KSETS = {}


def _kernels(dtype, head_dim, topk, causal, arch):
    """The compiled kernels of one configuration (dict by role), cached per configuration."""
    llen = max(1, topk - 1 if causal else topk)
    sk = (dtype, head_dim, cfg.list_cap(llen), bool(causal), arch)
    ks = _KSETS.get(sk)
    if ks is None:
        name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        specs = kernel_specs(name, head_dim, topk, causal, arch)
        ks = {s[0][0] + ("_s" if s[0] == ("kmcount", True) else ""): _compiled(s[0], s[1], s[2], arch) for s in specs}
        _KSETS[sk] = ks
    return ks


def _prep_inputs(x):
    if not x.is_contiguous() or x.data_ptr() % 16 != 0:
        x = x.contiguous() if not x.is_contiguous() else x.clone()
    return x


def _cu(x):
    return x if x.is_contiguous() else x.contiguous()


def _centroids_stage(ks, k, cu_k, cu_q, B, total_q, total_k, Hk, H, C, nbound, group, rows_tile, mt_bound, counts, stream):
    dev = k.device
    D = k.shape[-1]
    cu_chunks = torch.empty(B + 1, dtype=torch.int32, device=dev)
    cu_mtiles = torch.empty(B + 1, dtype=torch.int32, device=dev)
    cent = torch.empty(max(nbound, 1), Hk, D, dtype=torch.float32, device=dev)
    c_hi = torch.empty(Hk, max(nbound, 1), D, dtype=k.dtype, device=dev)
    c_lo = torch.empty_like(c_hi)
    ks["prep"](_ptr(cu_q, 4), _ptr(cu_k, 4), _ptr(cu_chunks, 4), _ptr(cu_mtiles, 4), B, total_q, total_k,
               C, group, rows_tile, nbound, mt_bound, stream)
    if nbound > 0 and Hk > 0:
        ks["centroids"](_ptr(k), _ptr(cu_k, 4), _ptr(cu_chunks, 4), _ptr(cent), _ptr(c_hi), _ptr(c_lo),
                        _ptr(counts, 4), B, total_k, Hk, H, C, nbound, stream)
    return cu_chunks, cu_mtiles, cent[:nbound], c_hi, c_lo


def centroids_cute(k, cu_seqlens_k, chunk_size):
    """fp32 chunk centroids ``(num_chunks_bound, Hk, D)`` computed by the CuTe kernel."""
    k = _prep_inputs(k)
    cu_k = _cu(cu_seqlens_k)
    total_k, Hk, D = k.shape
    B = cu_k.shape[0] - 1
    C = int(chunk_size)
    nbound = num_chunks_bound(total_k, B, C)
    arch = common.device_arch(k.device)
    ks = _kernels(k.dtype, D, 1, True, arch)
    stream = common.current_stream()
    dummy = torch.empty(1, dtype=torch.int32, device=k.device)
    _, _, cent, _, _ = _centroids_stage(ks, k, cu_k, cu_k, B, 0, _i32(total_k, "total_k"), Hk, 0, C, nbound, 1, 1, 0,
                                        dummy, stream)
    return cent


def route_cute(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, chunk_size, topk, causal):
    """MoBA routing with the CuTe kernels; returns a :class:`moba_cute.routing.Routing`."""
    q = _prep_inputs(q)
    k = _prep_inputs(k)
    cu_q = _cu(cu_seqlens_q)
    cu_k = _cu(cu_seqlens_k)
    total_q, H, D = q.shape
    total_k, Hk, _ = k.shape
    B = cu_q.shape[0] - 1
    C = int(chunk_size)
    K = int(topk)
    causal = bool(causal)
    G = H // Hk
    dev = q.device
    arch = common.device_arch(dev)
    fam = common.arch_family(arch)
    bm, bn = cfg.TOPK_TILES[fam][D]
    rows_tile = G * (bm // G) if G <= bm else bm
    nbound = num_chunks_bound(total_k, B, C)
    nseg = nbound * H
    cap = total_q * H * K
    mt_bound = (total_q * G + B * (rows_tile - 1)) // rows_tile
    for v, what in ((cap, "total_q*H*topk"), (nseg + 1, "num_chunks_bound*H+1"), (total_q * H, "total_q*H"),
                    (total_k * Hk * D // 8, "total_k*Hk*D/8"), (mt_bound, "query tiles")):
        _i32(v, what)
    ks = _kernels(q.dtype, D, K, causal, arch)
    stream = common.current_stream()

    selection = torch.empty(total_q, H, K, dtype=torch.int32, device=dev)
    counts = torch.empty(max(nseg, 1), dtype=torch.int32, device=dev)
    offsets = torch.empty(nseg + 1, dtype=torch.int32, device=dev)
    query_rows = torch.empty(cap, dtype=torch.int32, device=dev)

    cu_chunks, cu_mtiles, _cent, c_hi, c_lo = _centroids_stage(
        ks, k, cu_k, cu_q, B, total_q, total_k, Hk, H, C, nbound, G, rows_tile, mt_bound, counts, stream)
    if nseg == 0:
        offsets.zero_() if offsets.numel() else None
    if mt_bound > 0 and Hk > 0:
        ks["topk"](_ptr(q), _ptr(c_hi), _ptr(c_lo), _ptr(cu_q, 4), _ptr(cu_k, 4), _ptr(cu_chunks, 4),
                   _ptr(cu_mtiles, 4), _ptr(selection, 4), B, total_q, total_k, H, Hk, C, K, max(nbound, 1),
                   mt_bound, rows_tile, stream)
    if nseg > 0:
        nrow = total_q * H
        nblk = (nrow + 255) // 256
        cursor = torch.empty(nseg, dtype=torch.int32, device=dev)
        scratch = torch.empty(max(cap, 1), dtype=torch.int32, device=dev)
        if nblk > 0:
            ks["kmcount"](_ptr(selection, 4), _ptr(cu_q, 4), _ptr(cu_chunks, 4), _ptr(counts, 4), _ptr(offsets, 4),
                          _ptr(scratch, 4), _ptr(query_rows, 4), B, total_q, H, K, nseg, nblk, stream)
        ks["kmscan"](_ptr(counts, 4), _ptr(offsets, 4), _ptr(cursor, 4), nseg, stream)
        if nblk > 0:
            ks["kmcount_s"](_ptr(selection, 4), _ptr(cu_q, 4), _ptr(cu_chunks, 4), _ptr(cursor, 4), _ptr(offsets, 4),
                            _ptr(scratch, 4), _ptr(query_rows, 4), B, total_q, H, K, nseg, nblk, stream)
        ks["kmsort"](_ptr(scratch, 4), _ptr(offsets, 4), _ptr(query_rows, 4), _ptr(cu_q, 4), _ptr(cu_chunks, 4),
                     B, total_q, H, nseg, stream)
    return Routing(
        selection=selection, offsets=offsets, query_rows=query_rows, cu_chunks=cu_chunks,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), chunk_size=C, topk=K, causal=causal, num_kv_heads=Hk,
    )


# --- timing ---------------------------------------------------------------------------------

def _bench_one(B, H, Hk, D, C, K, S, dtype=torch.bfloat16, causal=True, iters=10):
    dev = "cuda"
    q = torch.randn(B * S, H, D, device=dev, dtype=dtype)
    k = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * S
    for _ in range(3):
        route_cute(q, k, cu, cu, S, S, C, K, causal)
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        route_cute(q, k, cu, cu, S, S, C, K, causal)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def _bench_fa4(S, B=2, H=16, D=128, iters=10):
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001
        return f"FA4 not importable: {e}"
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    for _ in range(3):
        flash_attn_func(q, k, v, causal=True)
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        flash_attn_func(q, k, v, causal=True)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def _profile(B, H, Hk, D, C, K, S, dtype=torch.bfloat16, causal=True):
    """Per-kernel GPU times (torch.profiler) and the host time of one call."""
    import time

    dev = "cuda"
    q = torch.randn(B * S, H, D, device=dev, dtype=dtype)
    k = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * S
    for _ in range(3):
        route_cute(q, k, cu, cu, S, S, C, K, causal)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        route_cute(q, k, cu, cu, S, S, C, K, causal)
    host_ms = (time.perf_counter() - t0) * 100
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        route_cute(q, k, cu, cu, S, S, C, K, causal)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "device_time", 0):
            name = e.key
            for tag in ("ChunkPrep", "Centroids", "Topk", "SegmentCount", "SegmentScan", "SegmentSort"):
                if tag in name:
                    name = tag
            out[name] = out.get(name, 0.0) + e.device_time_total / 1000.0
    return host_ms, out


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.profile:
        for cfgt in [(2, 16, 16, 128, 128, 8, 8192), (2, 16, 16, 128, 128, 8, 65536), (1, 32, 8, 128, 4096, 12, 131072)]:
            host_ms, per = _profile(*cfgt)
            print("profile", cfgt, f"host_ms_per_call={host_ms:.3f}", {k: round(v, 4) for k, v in per.items()}, flush=True)
    if not args.bench:
        ap.print_help()
        return
    name = torch.cuda.get_device_name()
    recs = []
    for label, (B, H, Hk, D, C, K, S) in [
        ("flashmoba", (2, 16, 16, 128, 128, 8, 8192)),
        ("flashmoba", (2, 16, 16, 128, 128, 8, 65536)),
        ("flashmoba", (2, 16, 16, 128, 128, 8, 524288)),
        ("moba-large", (1, 32, 8, 128, 4096, 12, 131072)),
    ]:
        try:
            ms = _bench_one(B, H, Hk, D, C, K, S)
        except Exception as e:  # noqa: BLE001
            ms = f"error: {type(e).__name__}: {e}"[:300]
        rec = dict(suite=label, B=B, H=H, Hk=Hk, D=D, C=C, K=K, S=S, routing_ms=ms, device=name)
        print(json.dumps(rec), flush=True)
        recs.append(rec)
        torch.cuda.empty_cache()
    fa4 = _bench_fa4(65536)
    rec = dict(suite="fa4-dense-causal-fwd", B=2, H=16, D=128, S=65536, fwd_ms=fa4, device=name)
    print(json.dumps(rec), flush=True)
    recs.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
