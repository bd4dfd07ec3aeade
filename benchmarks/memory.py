"""Peak memory at one suite size (issues 11 and 12: the forward's and the training step's peak
against FlashAttention-2's), with one timing of each.

    python -m benchmarks.memory [--suite flashmoba] [--S 512K] [--impls moba_cute,fa2[,fa4]] [--json OUT.json]

For every implementation, on the same inputs (``benchmarks.common.make_inputs``: q, k, v and
dout, leaves that require grad): the inference forward under ``torch.no_grad()`` (``fwd``; for
moba_cute ``varlen_attention`` with its own routing, so the forward may take its
inference-only windows and write its pair lists over that routing) and the forward + backward
(``fwdbwd``). Each is called once to compile and warm, then once more from freed memory with the
peak statistics reset: ``peak_gb`` is ``torch.cuda.max_memory_allocated`` (inputs included),
``over_inputs_gb`` that less what was allocated before the call, ``ms`` the one call's wall time.
GB = 1e9 bytes. FA2 is PyTorch SDPA's flash backend (at 512K one forward + backward takes ~25 s on
an H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def measure(fn, what: str, base: int) -> dict:
    """One warm call of ``fn`` (``what``: "fwd" under no_grad, or "fwdbwd"), then one measured
    call from freed memory."""
    import torch

    from .common import no_grad_fn
    from .timing import free_memory

    call = no_grad_fn(fn) if what == "fwd" else fn
    try:
        x = call()
        del x
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        x = call()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del x
        peak = torch.cuda.max_memory_allocated()
        return {"peak_gb": round(peak / 1e9, 3), "over_inputs_gb": round((peak - base) / 1e9, 3),
                "ms": round(dt * 1e3, 1)}
    except Exception as e:  # noqa: BLE001 (an OOM or a missing baseline is a result here)
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        free_memory()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="flashmoba", help="suite whose config at --S is measured")
    p.add_argument("--S", default="512K", help="sequence length (e.g. 512K)")
    p.add_argument("--impls", default="moba_cute,fa2", help="comma-separated subset of moba_cute,fa2,fa4")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    from .configs import parse_size, suite_configs

    S = parse_size(args.S)
    impls = [x for x in args.impls.split(",") if x]
    bad = sorted(set(impls) - {"moba_cute", "fa2", "fa4"})
    if bad:
        p.error(f"--impls: unknown {bad}; choose from moba_cute, fa2, fa4")
    try:
        cfgs = [c for c in suite_configs(args.suite, [S]) if c.S == S]
    except ValueError as e:
        p.error(f"--suite/--S: {e}")
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.memory needs a CUDA GPU", file=sys.stderr)
        return 2
    import moba_cute

    from .baselines import fa2_runner, fa4_runner
    from .common import make_inputs
    from .moba import moba_runner
    from .results import git_commit
    from .run import _versions

    cfg = cfgs[0]
    inp = make_inputs(cfg, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    res = {"suite": args.suite, "S": S, "B": cfg.B, "inputs_q_k_v_dout_gb": round(inp.nbytes() / 1e9, 3),
           "device": torch.cuda.get_device_name(), **_versions(), "commit": git_commit(),
           "command": "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])}
    makers = {"moba_cute": lambda: moba_runner(inp, "cute", moba_cute.kernel_paths()),
              "fa2": lambda: fa2_runner(inp), "fa4": lambda: fa4_runner(inp)}
    for name in impls:
        r = makers[name]()
        res[name] = {what: measure(getattr(r, what), what, base) for what in ("fwd", "fwdbwd")}
        if getattr(r, "cleanup", None):
            r.cleanup()
        print(name, res[name], flush=True)
    if "moba_cute" in res and "fa2" in res:
        for what in ("fwd", "fwdbwd"):
            a, b = res["moba_cute"][what].get("peak_gb"), res["fa2"][what].get("peak_gb")
            if a and b:
                print(f"{what}: moba_cute peak {a:.2f} GB = {a / b:.3f}x FA2's {b:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
