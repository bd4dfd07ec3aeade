"""A/B of top-k tile configurations in one process (GPU): per variant, the top-k kernel's GPU
time (torch.profiler), the whole routing's single-call median, and the rows whose selection
differs from the first variant's. Variants are "bm,bn,stages,mma_n,ctas,wgmma" strings.

    python -m benchmarks.topk_tile_ab [--shapes=flashmoba-64K,16K-K64] 128,32,1,16,4,0 128,32,1,32,4,1
"""

from __future__ import annotations

import json
import sys

import torch

from moba_cute.kernels import route_launch as rl

SHAPES = {
    "flashmoba-8K": (2, 16, 16, 128, 128, 8, 8192),
    "flashmoba-64K": (2, 16, 16, 128, 128, 8, 65536),
    "moba-large-128K": (1, 32, 8, 128, 4096, 12, 131072),
    # longer lists: 15 (register list past the 4-CTA limit) and 63 (shared-memory list)
    "flashmoba-64K-K16": (2, 16, 16, 128, 128, 16, 65536),
    "16K-K64": (2, 16, 16, 128, 64, 64, 16384),
}


def main(argv=None):
    args = list(argv if argv is not None else sys.argv[1:])
    only = None
    if args and args[0].startswith("--shapes="):
        only = args.pop(0).split("=", 1)[1].split(",")
    variants = args or ["128,32,1,16,4,0", "128,32,1,16,4,1"]
    name = torch.cuda.get_device_name()
    out = []
    for label, shp in SHAPES.items():
        if only is not None and label not in only:
            continue
        B, H, Hk, D, C, K, S = shp
        torch.manual_seed(0)
        q, k, cu = rl._random_inputs(B, H, Hk, D, S, torch.bfloat16)
        base = None
        for rnd in range(2):  # two rounds, interleaved: drift shows up as round-to-round change
            for v in variants:
                with rl.topk_tile_override(int(x) for x in v.split(",")):
                    sel = rl.route_cute(q, k, cu, cu, S, S, C, K, True).selection.clone()
                    if base is None:
                        base = sel
                    diff_rows = int((sel != base).any(-1).sum())
                    torch.manual_seed(0)
                    _, per = rl._profile(*shp)
                    torch.manual_seed(0)
                    ms = rl._bench_one(*shp)
                rec = dict(shape=label, variant=v, round=rnd, routing_ms=round(ms, 4),
                           topk_ms=round(per.get("Topk", float("nan")), 4),
                           kernels={kk: round(vv, 4) for kk, vv in per.items()},
                           rows_differing_from_first=diff_rows, rows=sel.shape[0] * sel.shape[1],
                           device=name)
                print(json.dumps(rec), flush=True)
                out.append(rec)
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
