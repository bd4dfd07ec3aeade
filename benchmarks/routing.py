"""Routing alone on the GPU machine (the CuTe routing of ``moba_cute.kernels.route_launch``):

    python -m benchmarks.routing [--check] [--profile] [--bench [--json OUT.json]]

* ``--check``: large-shape self-check (flashmoba 64K, moba-large 128K): bit-identical repeats,
  the key-major index equal to the transpose of the selection, own chunk in slot 0, no
  duplicate chunks in a row;
* ``--profile``: per-kernel GPU times (torch.profiler) and the host time of one call;
* ``--bench``: one call between CUDA events (median of 30) at flashmoba 8K / 64K / 512K and
  moba-large 128K, and FA4's dense causal forward at 64K for scale (docs/routing.md).
"""

from __future__ import annotations

import torch

from moba_cute.kernels.route_launch import route_cute


def _random_inputs(B, H, Hk, D, S, dtype, dev="cuda"):
    """B sequences of S tokens: random q (B*S, H, D), k (B*S, Hk, D) and their cu_seqlens."""
    q = torch.randn(B * S, H, D, device=dev, dtype=dtype)
    k = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * S
    return q, k, cu


def _median_ms(fn, iters):
    """Median of ``iters`` single calls of ``fn``, each between CUDA events with the GPU idle
    before it (so it includes the host's time before the first kernel starts), after 3
    warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def _bench_one(B, H, Hk, D, C, K, S, dtype=torch.bfloat16, causal=True, iters=30):
    """Routing alone, median of ``iters`` calls (30 samples: the host part varies)."""
    q, k, cu = _random_inputs(B, H, Hk, D, S, dtype)
    return _median_ms(lambda: route_cute(q, k, cu, cu, S, S, C, K, causal), iters)


def _bench_fa4(S, B=2, H=16, D=128, iters=30):
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001
        return f"FA4 not importable: {e}"
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    return _median_ms(lambda: flash_attn_func(q, k, v, causal=True), iters)


def _profile(B, H, Hk, D, C, K, S, dtype=torch.bfloat16, causal=True):
    """Per-kernel GPU times (torch.profiler) and the host time of one call."""
    import time

    q, k, cu = _random_inputs(B, H, Hk, D, S, dtype)
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
            for tag in ("ChunkPrep", "Centroids", "Topk", "BlockCount", "ColumnScan", "SegmentScan", "BlockWrite"):
                if tag in name:
                    name = tag
            out[name] = out.get(name, 0.0) + e.device_time_total / 1000.0
    return host_ms, out


def _check(B, H, Hk, D, C, K, S, dtype=torch.bfloat16, causal=True):
    """Large-shape self-check: bit-identical repeats, key-major == transpose of the selection,
    selection rows well formed (own chunk first, distinct, in range)."""
    dev = "cuda"
    q, k, cu = _random_inputs(B, H, Hk, D, S, dtype, dev)
    r1 = route_cute(q, k, cu, cu, S, S, C, K, causal)
    r2 = route_cute(q, k, cu, cu, S, S, C, K, causal)
    same = all(torch.equal(getattr(r1, f), getattr(r2, f)) for f in ("selection", "offsets", "query_rows"))
    sel = r1.selection
    total_q = sel.shape[0]
    bidx = torch.repeat_interleave(torch.arange(B, device=dev), (cu[1:] - cu[:-1]).long(), output_size=total_q)
    rows = torch.arange(total_q, device=dev).view(-1, 1, 1).expand_as(sel)
    heads = torch.arange(H, device=dev).view(1, -1, 1).expand_as(sel)
    valid = sel >= 0
    seg = ((r1.cu_chunks[bidx].long().view(-1, 1, 1) + sel.long()) * H + heads)[valid]
    key = seg * (total_q + 1) + rows[valid]
    key, _ = torch.sort(key)
    counts = torch.bincount(seg, minlength=r1.num_chunks_bound * H)
    off = torch.zeros_like(r1.offsets, dtype=torch.int64)
    off[1:] = counts.cumsum(0)
    qr = torch.full_like(r1.query_rows, -1)
    qr[: key.numel()] = (key % (total_q + 1)).int()
    t_ok = torch.equal(r1.offsets.long(), off) and torch.equal(r1.query_rows, qr)
    pos = (torch.arange(total_q, device=dev) - cu[bidx]).view(-1, 1)
    own_ok = bool((sel[:, :, 0] == (pos // C)).all()) if causal else True
    s2 = torch.sort(sel, -1).values
    dup = bool(((s2[..., 1:] == s2[..., :-1]) & (s2[..., 1:] >= 0)).any())
    return dict(repeat_bit_identical=same, keymajor_is_transpose=t_ok, own_chunk_slot0=own_ok, duplicates=dup)


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        for cfgt in [(2, 16, 16, 128, 128, 8, 65536), (1, 32, 8, 128, 4096, 12, 131072)]:
            print("check", cfgt, _check(*cfgt), flush=True)
            torch.cuda.empty_cache()
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
    r64 = [r["routing_ms"] for r in recs if r["suite"] == "flashmoba" and r["S"] == 65536]
    if r64 and isinstance(r64[0], float) and isinstance(fa4, float):
        print(f"routing at 64K = {r64[0]:.3f} ms = {100 * r64[0] / fa4:.2f} % of FA4 dense causal fwd ({fa4:.2f} ms)")
    recs.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
