"""One warm CuTe attention forward (or backward) between profiler start/stop, for Nsight Compute
(GPU machine):

    ncu --clock-control none --profile-from-start off --csv \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
        python3 -m benchmarks.ncu_attention [--S 65536] [--sm80] [--backward]

flashmoba shape (B=2, H=Hk=16, D=128, C=128, K=8, bf16, causal); the routing comes from the
reference so that only the attention's kernels are profiled. Divide the bytes by
``B * S * H`` for bytes per (row, head) (docs/design.md, sections 1 and 8).
"""

from __future__ import annotations

import argparse
import os

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=65536)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--sm80", action="store_true", help="the sm80 kernels instead of the sm90 ones")
    ap.add_argument("--backward", action="store_true",
                    help="profile the backward (attention_backward_cute: delta, pair lists, key-major kernel, dQ)")
    ap.add_argument("--summarize", default=None, help="print per-kernel ms / GB of an ncu --csv log and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.B * args.S * 16)
        return
    if args.sm80:
        os.environ["MOBA_CUTE_FWD_SM80"] = "1"
        os.environ["MOBA_CUTE_BWD_SM80"] = "1"
    from moba_cute import reference
    from moba_cute.kernels.attention_launch import attention_backward_cute, attention_cute

    B, S, H, D, C, K = args.B, args.S, 16, 128, 128, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B * S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cu = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * S
    r = reference.route(q, k, cu, cu, S, S, C, K, True)
    if args.backward:
        out, lse = attention_cute(q, k, v, r, None, True)
        dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g)

        def step():
            attention_backward_cute(q, k, v, out, lse, dout, None, r, None, True)
    else:
        def step():
            attention_cute(q, k, v, r, None, False)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"rows*heads = {B * S * H}")


def summarize(path, rows):
    """Per kernel: time (ms), DRAM read / write (GB), and the total bytes per (row, head)."""
    import csv

    lines = open(path).read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"ID"'))
    kern = {}
    for rec in csv.DictReader(lines[start:]):
        key = (rec["ID"], rec["Kernel Name"][:60])
        val = float(rec["Metric Value"].replace(",", ""))
        unit = rec["Metric Unit"]
        # ncu spells units either way depending on its version
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9,
                 "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "ns": 1e-6, "us": 1e-3, "ms": 1.0}.get(unit)
        if scale is None:
            raise ValueError(f"unknown ncu unit {unit!r} for {rec['Metric Name']}")
        kern.setdefault(key, {})[rec["Metric Name"]] = val * scale
    tot_t = tot_b = 0.0
    for (i, name), m in kern.items():
        t = m.get("gpu__time_duration.sum", 0)
        rd, wr = m.get("dram__bytes_read.sum", 0), m.get("dram__bytes_write.sum", 0)
        tot_t += t
        tot_b += rd + wr
        print(f"{i:>4} {name:60s} {t:8.3f} ms  read {rd / 1e9:7.3f} GB  write {wr / 1e9:7.3f} GB")
    print(f"total {tot_t:.3f} ms, {tot_b / 1e9:.2f} GB, {tot_b / rows:.0f} B per (row, head)")


if __name__ == "__main__":
    main()
