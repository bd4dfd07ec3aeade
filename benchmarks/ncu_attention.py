"""One warm CuTe attention forward (or backward) between profiler start/stop, for Nsight Compute
(GPU machine):

    ncu --clock-control none --profile-from-start off --csv \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
        python3 -m benchmarks.ncu_attention [--S 65536] [--sm80] [--backward]

flashmoba shape by default (B=2, H=Hk=16, D=128, C=128, K=8, bf16, causal; ``--H --Hk --C
--K`` for others, e.g. the moba-large proxy ``--B 1 --H 32 --Hk 8 --S 32768 --C 512 --K 3``);
the routing comes from the reference so that only the attention's kernels are profiled. Divide
the bytes by ``B * S * H`` for bytes per (row, head) (docs/design.md, sections 1 and 8).

Where a kernel's warps wait (docs/design.md section 8, update 5, measured)::

    ncu --clock-control none --profile-from-start off -k regex:MobaFwdSm90 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats -o seg python3 -m benchmarks.ncu_attention ...
    ncu --import seg.ncu-rep --page source --csv --print-source sass > seg.csv
    python3 -m benchmarks.ncu_attention --stalls seg.csv     # SASS lines by warp stall samples
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
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--Hk", type=int, default=16)
    ap.add_argument("--C", type=int, default=128)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--summarize", default=None, help="print per-kernel ms / GB of an ncu --csv log and exit")
    ap.add_argument("--stalls", default=None,
                    help="print the SASS lines with the most warp stall samples of an `ncu --page source --csv "
                         "--print-source sass` export and exit")
    ap.add_argument("--top", type=int, default=30, help="lines --stalls prints")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.B * args.S * args.H)
        return
    if args.stalls:
        try:
            lines = top_stalls(open(args.stalls, errors="replace").read(), args.top)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--stalls {args.stalls}: {e}") from None
        print("\n".join(lines))
        return
    if args.sm80:
        os.environ["MOBA_CUTE_FWD_SM80"] = "1"
        os.environ["MOBA_CUTE_BWD_SM80"] = "1"
    from moba_cute import reference
    from moba_cute.kernels.attention_launch import attention_backward_cute, attention_cute

    B, S, H, Hk, D, C, K = args.B, args.S, args.H, args.Hk, 128, args.C, args.K
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B * S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B * S, Hk, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
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
    profile_once(step, warmup=2)
    print(f"rows*heads = {B * S * H}")


def profile_once(step, warmup=2):
    """``warmup`` calls of ``step`` (compiles, plans), then one between profiler start and stop:
    what ``ncu --profile-from-start off`` records."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def top_stalls(text, top=30):
    """The ``top`` SASS lines with the most warp stall samples ("Warp Stall Sampling (All
    Samples)") of an ``ncu --page source --csv --print-source sass`` export, each with its share
    of all samples, its address and instruction; the first line gives the total."""
    import csv

    rows = list(csv.reader(text.splitlines()))
    head = next((i for i, r in enumerate(rows) if "Address" in r and "Source" in r), None)
    if head is None:
        raise ValueError("no 'Address' / 'Source' header: not an ncu --page source --csv export")
    hdr = rows[head]
    col = next((i for i, c in enumerate(hdr) if c.startswith("Warp Stall Sampling (All")), None)
    if col is None:
        raise ValueError("no 'Warp Stall Sampling (All Samples)' column: profile with --section SourceCounters")
    ai, si = hdr.index("Address"), hdr.index("Source")
    items = []
    for r in rows[head + 1:]:
        if len(r) > max(col, ai, si):
            try:
                items.append((float(r[col].replace(",", "") or 0), r[ai], r[si].strip()))
            except ValueError:
                continue
    total = sum(x[0] for x in items)
    items.sort(key=lambda x: -x[0])
    out = [f"{total:.0f} warp stall samples over {len(items)} SASS lines"]
    out += [f"{100 * n / max(total, 1):5.1f}%  {a}  {src}" for n, a, src in items[:top]]
    return out


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
