"""A/B of the sm90 forward's switches in one process (GPU): per shape and variant, the CuTe
forward's median ms given a routing (segment kernel, diagonal/merge and index; no routing), in
interleaved rounds so that drift shows as round-to-round change, and whether the output equals
the first variant's bit for bit (the overlap, multicast and the pair tile must; tiles of another
``bn`` need not). A variant is a ``;``-separated list of ``MOBA_CUTE_*`` settings, ``""`` for
the defaults; each is applied alone (the others' settings are undone) and its plans rebuilt.
Ratios against the first variant are printed at the end. ``--backward`` times the CuTe backward
instead (given the forward's output, computed once with the defaults) and compares dQ, dK and dV
with the first variant's; ``--training`` times forward + backward as a training step runs them
(the forward keeps what the backward takes) and compares out, dQ, dK and dV.

    python -m benchmarks.fwd_env_ab --shapes moba-large-128K \\
        "MOBA_CUTE_SM90_TILES=64,8,2" "MOBA_CUTE_SM90_TILES=64,8,2;MOBA_CUTE_FWD_OVERLAP=1"
"""

from __future__ import annotations

import argparse
import json
import statistics

SHAPES = {  # name -> (B, S, H, Hk, C, K)
    "flashmoba-8K": (2, 8192, 16, 16, 128, 8),
    "flashmoba-64K": (2, 65536, 16, 16, 128, 8),
    "C512-32K": (1, 32768, 32, 8, 512, 3),
    "C2048-64K": (1, 65536, 32, 8, 2048, 8),
    "moba-large-32K": (1, 32768, 32, 8, 4096, 12),
    "moba-large-128K": (1, 131072, 32, 8, 4096, 12),
}


def parse_variant(text: str) -> dict:
    """``"NAME=VALUE;NAME=VALUE"`` -> {NAME: VALUE}; names must be ``MOBA_CUTE_*`` and appear once."""
    env = {}
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name.startswith("MOBA_CUTE_") or name in env:
            raise ValueError(f"variant {text!r}: each item must be MOBA_CUTE_NAME=VALUE, once per name "
                             f"(items separated by ';'), not {item!r}")
        env[name] = value.strip()
    return env


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--shapes", default="moba-large-32K", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backward", action="store_true", help="time the backward (dq, dk, dv)")
    ap.add_argument("--training", action="store_true",
                    help="time forward + backward as a training step runs them (the forward keeps what the "
                         "backward takes: switches such as MOBA_CUTE_KEEP_BWD_PAIRS act on both)")
    ap.add_argument("variants", nargs="+", help='e.g. "" "MOBA_CUTE_FWD_OVERLAP=1"')
    args = ap.parse_args(argv)
    variants = [(v, parse_variant(v)) for v in args.variants]
    shapes = args.shapes.split(",")
    for name in shapes:
        if name not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {name!r} (known: {', '.join(SHAPES)})")
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit("--rounds and --reps must be >= 1")
    if args.backward and args.training:
        raise SystemExit("--backward and --training: pick one (--training times both directions)")
    names = sorted({n for _, env in variants for n in env})

    import torch

    from moba_cute.kernels import attention_launch as L

    from .common import environment, routed_batch
    from .timing import time_idle

    dev = "cuda"
    out, ms = [], {}
    for shape in shapes:
        B, S, H, Hk, C, K = SHAPES[shape]
        q, k, v, cu, r = routed_batch(B, S, H, Hk, args.D, C, K, dev)
        if args.backward:
            o0, lse0 = L.attention_cute(q, k, v, r, None, True)
            dout = torch.randn_like(o0)

            def call():
                return torch.cat([g.flatten() for g in L.attention_backward_cute(q, k, v, o0, lse0, dout, None, r,
                                                                                 None, True)])
        elif args.training:
            dout = torch.randn_like(q)

            def call():
                o, lse, kept = L.attention_cute(q, k, v, r, None, True, keep_index=True)
                grads = L.attention_backward_cute(q, k, v, o, lse, dout, None, r, None, True, index=kept)
                return torch.cat([o.flatten()] + [g.flatten() for g in grads])
        else:
            def call():
                return L.attention_cute(q, k, v, r, None, False)[0]
        cache = L.BWD_PLANS if args.backward else L.FWD_PLANS
        direction = "backward" if args.backward else "training" if args.training else "forward"
        base = None
        for rnd in range(args.rounds):
            for text, env in variants:
                with environment(env, names):
                    for c in (L.FWD_PLANS, L.BWD_PLANS):
                        c.clear()  # (plans read the switches when they are built)
                    o = call()
                    if base is None:
                        base = o.clone()
                    t = time_idle(call, dev, reps=args.reps, warmup=2).median_ms
                    plan = next(iter(cache.plans.values()))
                sv = getattr(plan, "variant", None)  # (sm90 forward plans)
                rec = dict(shape=shape, D=args.D, variant=text, round=rnd, ms=round(t, 4),
                           direction=direction,
                           tile=list(getattr(plan, "tile", ())), mcast=sv.mcast if sv else None,
                           overlap=sv.overlap if sv else None, same_bits_as_first=bool(torch.equal(o, base)),
                           max_diff_vs_first=float((o.float() - base.float()).abs().max()),
                           device=torch.cuda.get_device_name())
                print(json.dumps(rec), flush=True)
                out.append(rec)
                ms.setdefault((shape, text), []).append(t)
        del q, k, v, cu, r, base
        for c in (L.FWD_PLANS, L.BWD_PLANS):
            c.clear()
        torch.cuda.empty_cache()
    for shape in shapes:
        first = statistics.median(ms[(shape, variants[0][0])])
        for text, _ in variants:
            m = statistics.median(ms[(shape, text)])
            print(f"{shape:18s} {m:9.3f} ms  x{first / m:5.3f} vs first  {text or '(defaults)'}")
    return out


if __name__ == "__main__":
    main()
