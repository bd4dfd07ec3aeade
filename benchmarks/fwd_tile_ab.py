"""A/B of sm80 forward tiles (``configs/attention_sm80.py`` FWD_TILES) in one process (GPU): per
variant and shape, the CuTe forward's median ms given a routing (the sm80 slot passes,
``MOBA_CUTE_FWD_SM80=1`` is set for the run), and whether the output equals the first
variant's bit for bit (it need not: the n-block split changes the online softmax's rounding).
Variants are "bm,bn,threads,stages" strings.

    python -m benchmarks.fwd_tile_ab --D 64 64,128,128,1 64,80,128,1 64,80,128,2
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SHAPES = {  # name -> (B, S, H, Hk, C, K)
    "8K-C128": (2, 8192, 16, 16, 128, 8),
    "32K-C128": (2, 32768, 16, 16, 128, 8),
    "32K-C64": (2, 32768, 16, 16, 64, 8),
    "32K-C512-gqa4": (1, 32768, 32, 8, 512, 3),
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("variants", nargs="*", default=["64,128,128,1", "64,80,128,1"])
    args = ap.parse_args(argv)
    os.environ["MOBA_CUTE_FWD_SM80"] = "1"
    from moba_cute.configs import attention_sm80 as cfg
    from moba_cute.kernels import attention_launch as L

    from .common import routed_batch
    from .timing import time_idle

    saved = cfg.FWD_TILES[args.D]
    dev = "cuda"
    out = []
    try:
        for name in args.shapes.split(","):
            B, S, H, Hk, C, K = SHAPES[name]
            q, k, v, cu, r = routed_batch(B, S, H, Hk, args.D, C, K, dev)
            base = None
            for rnd in range(2):  # interleaved rounds: drift shows up as round-to-round change
                for var in args.variants:
                    cfg.FWD_TILES[args.D] = tuple(int(x) for x in var.split(","))
                    L.FWD_PLANS.clear()
                    o, _ = L.attention_cute(q, k, v, r, None, False)
                    if base is None:
                        base = o.clone()
                    ms = time_idle(lambda: L.attention_cute(q, k, v, r, None, False), dev, reps=20,
                                   warmup=3).median_ms
                    rec = dict(shape=name, D=args.D, tile=var, round=rnd, fwd_ms=round(ms, 4),
                               same_bits_as_first=bool(torch.equal(o, base)),
                               max_diff_vs_first=float((o.float() - base.float()).abs().max()),
                               device=torch.cuda.get_device_name())
                    print(json.dumps(rec), flush=True)
                    out.append(rec)
            del q, k, v, r
            torch.cuda.empty_cache()
    finally:
        cfg.FWD_TILES[args.D] = saved
        L.FWD_PLANS.clear()
    return out


if __name__ == "__main__":
    main()
