"""Per-kernel GPU time of one public MoBA call (GPU machine), from the PyTorch profiler:

    python -m benchmarks.kernel_times [--S 8192,65536] [--backward] [--tiles bn,sub,stages[,2]]
    python -m benchmarks.kernel_times --B 1 --H 32 --Hk 8 --C 4096 --K 12 --S 131072   # moba-large

flashmoba shape by default (B=2, H=Hk=16, D=128, C=128, K=8, bf16, causal), routing included,
after warm-up. Prints each kernel's mean time over ``--reps`` calls, grouped by kernel name, and the
sum; ours and PyTorch's alike, so fixed costs at short lengths show which launch to remove.
``--tiles`` sets ``MOBA_CUTE_SM90_TILES`` (the sm90 forward's tile) for the process.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict


def profile_call(fn, reps):
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            per[ev.name][0] += ev.device_time_total / 1e3  # us -> ms
            per[ev.name][1] += 1
    return {name: (t / reps, n // reps) for name, (t, n) in per.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", default="8192,65536")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--Hk", type=int, default=None, help="KV heads (default: H)")
    ap.add_argument("--C", type=int, default=128, help="chunk size")
    ap.add_argument("--K", type=int, default=8, help="topk")
    ap.add_argument("--D", type=int, default=128, help="head dim")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backward", action="store_true", help="forward + backward instead of the forward")
    ap.add_argument("--tiles", default=None, help="MOBA_CUTE_SM90_TILES for this process")
    args = ap.parse_args(argv)
    if args.tiles:
        os.environ["MOBA_CUTE_SM90_TILES"] = args.tiles
    import torch

    import moba_cute

    B, H, D, C, K = args.B, args.H, args.D, args.C, args.K
    Hk = args.Hk or H
    print(f"device {torch.cuda.get_device_name()}, paths {moba_cute.kernel_paths()}, tiles {args.tiles}, "
          f"B={B} H={H}/{Hk} D={D} C={C} K={K}")
    for S in (int(x) for x in args.S.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B * S, h, D, device="cuda", dtype=torch.bfloat16, generator=g,
                               requires_grad=args.backward) for h in (H, Hk, Hk))
        cu = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * S
        dout = torch.randn_like(q) if args.backward else None

        def call():
            out = moba_cute.varlen_attention(q, k, v, cu, cu, S, S, C, K, causal=True)
            if args.backward:  # (autograd.grad: no .grad accumulation kernels in the list)
                torch.autograd.grad(out, (q, k, v), dout)

        if args.backward:
            fn = call
        else:
            def fn():
                with torch.no_grad():
                    call()
        per = profile_call(fn, args.reps)
        tot = sum(t for t, _ in per.values())
        print(f"S={S}: {tot:.3f} ms of kernels per call, {sum(n for _, n in per.values())} launches")
        for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            print(f"  {t:8.3f} ms  x{n:<3d} {name[:110]}")
        del q, k, v, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
