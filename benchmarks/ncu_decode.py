"""One warm decode step per case between profiler start/stop, for Nsight Compute (GPU machine):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section WarpStateStats --section LaunchStats --metrics dram__bytes_read.sum \\
        python3 -m benchmarks.ncu_decode 8:32768:dense,8:32768:sdpa,1:131072:4096:12

A case is ``B:L:C:K`` (B sequences of L cached tokens plus one new query, H=32, Hk=8, D=128,
bf16, as ``benchmarks.decode``): ``C:K`` a MoBA step with the full chunks' centroids cached,
``dense`` a dense layer as the transformers integration runs it (one chunk, topk 1), ``sdpa``
the dense SDPA baseline on the same cache (docs/design.md section 10, the H100 profile).
"""

from __future__ import annotations

import argparse


def parse_cases(text):
    """``[(B, L, kind, C, K)]`` with ``kind`` one of "moba", "dense", "sdpa"."""
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            if len(parts) == 3 and parts[2] in ("dense", "sdpa"):
                cases.append((int(parts[0]), int(parts[1]), parts[2], None, None))
            elif len(parts) == 4:
                cases.append((int(parts[0]), int(parts[1]), "moba", int(parts[2]), int(parts[3])))
            else:
                raise ValueError
        except ValueError:
            raise SystemExit(f"case {item!r}: expected B:L:C:K, B:L:dense or B:L:sdpa") from None
        if min(x for x in cases[-1] if isinstance(x, int)) < 1:
            raise SystemExit(f"case {item!r}: sizes must be positive")
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", help="comma-separated B:L:C:K, B:L:dense or B:L:sdpa")
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.ncu_decode needs a CUDA GPU")
    import moba_cute as mc

    from .decode import Shape, dense_layer_chunk, make_decode_inputs, moba_call, moba_centroid_call, sdpa_call
    from .ncu_attention import profile_once

    for B, L, kind, C, K in cases:
        s = Shape(B, L, 1)
        inp = make_decode_inputs(s, "cuda")
        if kind == "sdpa":
            fn = sdpa_call(inp)
        elif kind == "dense":
            fn = moba_call(mc, inp, dense_layer_chunk(s.Sk), 1, "cute")
        else:
            fn = moba_centroid_call(mc, inp, C, K, "cute")
        profile_once(fn, warmup=3)
        print(f"{s.label()} {kind} C={C} K={K}: profiled", flush=True)


if __name__ == "__main__":
    main()
