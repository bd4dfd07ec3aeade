"""Kernel-level timing of the CuTe attention forward and backward (GPU machine), without the
public API around them: forward given a routing, routing + forward, backward, forward +
backward, extra peak memory, and the FA2 baselines, at the flashmoba shape.

    python -m benchmarks.attention_kernels --bench [--sizes 8192,32768,65536] [--json out.json]

The suites of SPEC section 4 are ``python -m benchmarks.run``; this is for working on the
attention kernels themselves.
"""

from __future__ import annotations

import torch

from moba_cute import reference
from moba_cute.kernels.attention_launch import attention_backward_cute, attention_cute

from .timing import time_idle


def _median_ms(fn, iters=10, warm=3):
    return time_idle(fn, "cuda", reps=iters, warmup=warm).median_ms


def _bench_one(S, B=2, H=16, Hk=16, D=128, C=128, K=8, dtype=torch.bfloat16, check=False, fwd_only=False):
    from moba_cute.kernels import common
    from moba_cute.kernels.attention_launch import uses_sm90

    dev = "cuda"
    fam = "sm90" if uses_sm90(str(dtype), D, common.arch_of(torch.device(dev))) else "sm80"
    rec = dict(suite="flashmoba", impl=f"moba_cute.{fam}", B=B, H=H, Hk=Hk, D=D, C=C, K=K, S=S, dtype=str(dtype),
               causal=True, device=torch.cuda.get_device_name())
    q = torch.randn(B * S, H, D, device=dev, dtype=dtype)
    k = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    v = torch.randn(B * S, Hk, D, device=dev, dtype=dtype)
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * S
    route = None
    try:
        from moba_cute.kernels.route_launch import route_cute

        def route():
            return route_cute(q, k, cu, cu, S, S, C, K, True)
        r = route()
        rec["routing"] = "route_cute"
    except Exception as e:  # noqa: BLE001
        rec["routing"] = f"reference ({type(e).__name__}: {str(e)[:120]})"
        route = None
        r = reference.route(q, k, cu, cu, S, S, C, K, True)
    torch.cuda.synchronize()
    rec["attn_ms"] = _median_ms(lambda: attention_cute(q, k, v, r, None, False))
    if route is not None:
        rec["routing_ms"] = _median_ms(route)
        rec["fwd_ms"] = _median_ms(lambda: attention_cute(q, k, v, route(), None, False))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention_cute(q, k, v, r, None, False)
    torch.cuda.synchronize()
    rec["attn_extra_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    pairs = B * H * S * (K - 1) * C + B * H * S * (C + 1) / 2  # approx attended (q, k) pairs
    rec["eff_tflops_attn"] = 4 * D * pairs / (rec["attn_ms"] * 1e-3) / 1e12
    if check:
        out, lse = attention_cute(q, k, v, r, None, False)
        o32, l32 = reference.attention(q, k, v, r)
        olp, _ = reference.attention(q, k, v, r, compute_dtype=dtype)
        rec["check_err"] = (out.float() - o32).abs().max().item()
        rec["check_ref_lowp_err"] = (olp.float() - o32).abs().max().item()
    if fwd_only:
        return rec
    # ---- backward and forward + backward (routing included)
    dout = torch.randn_like(q)
    out, lse = attention_cute(q, k, v, r, None, False)
    rec["bwd_ms"] = _median_ms(lambda: attention_backward_cute(q, k, v, out, lse, dout, None, r, None, False))
    del out, lse

    def fwdbwd():
        rr = route() if route is not None else r
        o, l = attention_cute(q, k, v, rr, None, False)
        attention_backward_cute(q, k, v, o, l, dout, None, rr, None, False)

    rec["fwdbwd_ms"] = _median_ms(fwdbwd)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    rec["fwdbwd_extra_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    rec["eff_tflops_fwdbwd"] = 3.5 * 4 * D * pairs / (rec["fwdbwd_ms"] * 1e-3) / 1e12
    del r
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qq, kk, vv = (t.view(B, S, -1, D).transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
        do4 = dout.view(B, S, -1, D).transpose(1, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            with torch.no_grad():
                rec["fa2_fwd_ms"] = _median_ms(
                    lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True))

            def fa2_fb():
                o4 = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                torch.autograd.grad(o4, (qq, kk, vv), do4)

            rec["fa2_fwdbwd_ms"] = _median_ms(fa2_fb)
        rec["speedup_fwdbwd_vs_fa2"] = rec["fa2_fwdbwd_ms"] / rec["fwdbwd_ms"]
    except Exception as e:  # noqa: BLE001
        rec["fa2_fwd_ms"] = rec.get("fa2_fwd_ms")
        rec["fa2_note"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sizes", default="8192,32768,65536")
    ap.add_argument("--fwd-only", action="store_true", help="skip the backward and the FA2 baselines")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return
    recs = []
    for i, S in enumerate(int(x) for x in args.sizes.split(",")):
        try:
            rec = _bench_one(S, check=(i == 0), fwd_only=args.fwd_only)
        except Exception as e:  # noqa: BLE001
            rec = dict(S=S, error=f"{type(e).__name__}: {str(e)[:400]}")
        print(json.dumps(rec), flush=True)
        recs.append(rec)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
