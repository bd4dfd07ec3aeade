"""Long-context limit (issue 13, point 5): the longest single sequence whose MoBA forward+backward
fits in a memory cap (default 80 GB, an H100's), at the flashmoba shape, with peak memory against
FlashAttention-2's.

    python -m benchmarks.long_context [--json OUT.json] [--cap-gb 80] [--growth 1M,1.5M,2M,3M,4M,6M,8M]
                                      [--granularity 128K] [--fa2-sizes 16K,32K,64K,128K] [--time-budget 330]

Shape: B=1, H=Hk=16, D=128, C=128, K=8, bf16, causal; q, k, v require grad and the step is
``moba_cute.varlen_attention`` (backend "cute", routing included) then ``torch.autograd.grad`` to
q, k, v with a random upstream gradient. PyTorch's allocator is capped at ``cap / total memory``
(``torch.cuda.set_per_process_memory_fraction``), so an attempt that needs more raises
``torch.OutOfMemoryError``; one past the kernels' 32-bit indexing raises the library's ValueError
(``interface.kernel_size_limits``). The search tries the growth sizes in order until one fails,
then bisects between the last success and the first failure to ``--granularity`` tokens
(:func:`search_longest`, pure; tests/test_decode_long_context.py checks it). Every attempt
starts from freed memory; a fitting one records the peak allocated (and reserved) memory, inputs
and gradients included, and the median time of the step.

FA2 (SDPA flash backend, (B, H, S, D) layout, same step) at 1M tokens would take minutes per
step, so its peak is measured at ``--fa2-sizes`` and fitted by a line (its memory is linear in S);
the values at the MoBA sizes are that line's, marked extrapolated. MoBA is measured at the same
small sizes as well, for a measured comparison.

The cap covers PyTorch's allocator only: the CUDA context and the loaded kernels (about 1 GB) are
outside it, as they would be on an 80 GB card. The search assumes that fitting is monotone in S.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .configs import format_size

__all__ = ["Attempt", "SearchResult", "search_longest", "linear_fit", "parse_tokens", "size_limit_tokens",
           "LONG_KEYS", "normalize_long_record", "main"]

EXIT_NO_CUDA = 2
K_ = 1024
M_ = K_ * K_
SHAPE = {"B": 1, "H": 16, "Hk": 16, "D": 128, "C": 128, "K": 8, "dtype": "bfloat16", "causal": True}
#: base_allocated_gb: memory allocated when the attempt starts (freed beforehand: it should stay
#: near zero; growth across attempts would be memory kept from an earlier attempt)
LONG_KEYS = ("impl", "phase", "S", "outcome", "peak_allocated_gb", "peak_reserved_gb", "base_allocated_gb", "step_ms",
             "reps", "wall_s", "note")

# --------------------------------------------------------------------------------------------
# pure logic (CPU-tested)


@dataclass
class Attempt:
    S: int
    outcome: str  # "fits", "oom" (out of memory), "limit" (the kernels' size limits), "error"
    detail: str = ""
    phase: str = ""  # "growth" or "bisect"


@dataclass
class SearchResult:
    longest: Optional[int]  # largest size that fitted (None: none did)
    first_failure: Optional[int]  # smallest size that did not (None: every size tried fitted)
    stopped_by: str  # the outcome at first_failure ("oom", "limit: ...", "error: ..."), or why the search ended
    complete: bool  # the bracket was narrowed to the granularity (or the growth list fitted entirely)
    attempts: list = field(default_factory=list)


_FAILURES = ("oom", "limit", "error")


def search_longest(fits: Callable[[int], tuple[str, str]], growth, granularity: int,
                   budget_ok: Callable[[int], bool] = lambda S: True) -> SearchResult:
    """The longest size that fits, to ``granularity``.

    ``fits(S)`` returns ``(outcome, detail)``, outcome one of "fits", "oom", "limit", "error".
    The ``growth`` sizes (increasing multiples of ``granularity``) are tried in order until one
    fails; then sizes halfway between the last success (0 if none) and the first failure,
    rounded down to the granularity, until they are one granule apart. "error" (anything else
    than running out of memory or past the size limits) ends the search at once: a later
    attempt would not be trustworthy (a CUDA fault poisons the context). ``budget_ok(S)`` is
    asked before each attempt at S; False ends the search (``complete`` False).
    """
    growth = [int(s) for s in growth]
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    if not growth or any(s <= 0 or s % granularity for s in growth):
        raise ValueError(f"growth sizes must be positive multiples of the granularity {granularity}: {growth}")
    if any(b <= a for a, b in zip(growth, growth[1:])):
        raise ValueError(f"growth sizes must increase: {growth}")
    attempts: list[Attempt] = []
    lo, hi, hi_why = 0, None, ""

    def run(S, phase):
        outcome, detail = fits(S)
        if outcome not in ("fits",) + _FAILURES:
            raise ValueError(f"fits({S}) returned outcome {outcome!r}")
        attempts.append(Attempt(S, outcome, detail, phase))
        return outcome, detail

    def result(complete, why=None):
        return SearchResult(lo or None, hi, why if why is not None else hi_why, complete, attempts)

    for S in growth:
        if not budget_ok(S):
            return result(False, f"time budget (before {S})")
        outcome, detail = run(S, "growth")
        if outcome == "fits":
            lo = S
            continue
        if outcome == "error":
            return SearchResult(lo or None, S, f"error: {detail}", False, attempts)
        hi, hi_why = S, outcome + (f": {detail}" if outcome == "limit" and detail else "")
        break
    if hi is None:
        return result(True, f"every growth size fitted (up to {growth[-1]})")
    while hi - lo > granularity:
        mid = lo + (hi - lo) // (2 * granularity) * granularity  # lo < mid < hi: both are multiples
        if not budget_ok(mid):
            return result(False, f"time budget (bracket {lo}..{hi})")
        outcome, detail = run(mid, "bisect")
        if outcome == "fits":
            lo = mid
        elif outcome == "error":
            return SearchResult(lo or None, hi, f"error: {detail}", False, attempts)
        else:
            hi, hi_why = mid, outcome + (f": {detail}" if outcome == "limit" and detail else "")
    return result(True)


def linear_fit(points) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x`` through ``[(x, y), ...]`` (>= 2
    distinct x)."""
    pts = [(float(x), float(y)) for x, y in points]
    if len({x for x, _ in pts}) < 2:
        raise ValueError("linear_fit needs points at two distinct x at least")
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return my - b * mx, b


def parse_tokens(text: str) -> int:
    """'1M' -> 1048576, '1.5M' -> 1572864, '128K' -> 131072, '4097' -> 4097 (binary multiples;
    the result must be a whole number of tokens)."""
    t = str(text).strip().upper()
    mult = M_ if t.endswith("M") else K_ if t.endswith("K") else 1
    num = t[:-1] if mult > 1 else t
    try:
        val = float(num) * mult
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected a number, optionally with a K or M suffix") from None
    if val <= 0 or val != int(val):
        raise ValueError(f"bad size {text!r}: must be a positive whole number of tokens")
    return int(val)


def _token_list(text: str) -> list[int]:
    return [parse_tokens(p) for p in text.replace(",", " ").split() if p]


def fmt_tokens(n: Optional[int]) -> str:
    """1572864 -> '1.5M (1572864)'."""
    if n is None:
        return "-"
    if n >= M_:
        return f"{n / M_:g}M ({n})"
    return format_size(n)


def size_limit_tokens(fam: str, granularity: int, upper: int = 64 * M_) -> tuple[Optional[int], str]:
    """The longest single sequence (to ``granularity``, searched up to ``upper``) that the kernels'
    32-bit indexing admits at SHAPE for a forward+backward (``interface.kernel_size_limits``, host
    arithmetic), and the first rule it breaks past that ("" if none up to ``upper``)."""
    from moba_cute.interface import kernel_size_limits

    s = SHAPE
    limit = 2 ** 31 - 1

    def broken(S):
        rules = kernel_size_limits(S, s["H"], s["D"], S, s["Hk"], 1, s["C"], s["K"], True, fam=fam)
        return [rule for rule, val in rules if val > limit]

    growth = [granularity * 2 ** i for i in range(64) if granularity * 2 ** i <= upper]
    res = search_longest(lambda S: ("limit", broken(S)[0]) if broken(S) else ("fits", ""), growth, granularity)
    if res.first_failure is None:
        return res.longest, ""
    return res.longest, broken(res.first_failure)[0]


def normalize_long_record(rec: dict) -> dict:
    """LONG_KEYS in order (missing ones null), NaN/inf null, note a string; unknown keys are an error."""
    from .results import normalize_keys

    return normalize_keys(rec, LONG_KEYS, kind="long_context")


# --------------------------------------------------------------------------------------------
# GPU side


def _classify(e: BaseException) -> tuple[str, str]:
    from .timing import is_oom

    if is_oom(e):
        return "oom", "out of memory"
    msg = " ".join(str(e).split())
    if isinstance(e, ValueError) and "2^31-1" in msg:  # interface / launch modules' size checks
        return "limit", msg[:300]
    return "error", f"{type(e).__name__}: {msg[:300]}"


def _moba_step(S: int, backend: str):
    """(step, tensors): the MoBA forward+backward on fresh inputs of S tokens."""
    import torch

    import moba_cute as mc

    s = SHAPE
    g = torch.Generator(device="cuda")
    g.manual_seed(S)

    def rnd(h, grad):
        return torch.randn(S, h, s["D"], generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)

    q, k, v, dout = rnd(s["H"], True), rnd(s["Hk"], True), rnd(s["Hk"], True), rnd(s["H"], False)
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")

    def step():
        out = mc.varlen_attention(q, k, v, cu, cu, S, S, s["C"], s["K"], causal=True, backend=backend)
        return torch.autograd.grad(out, (q, k, v), dout)

    return step, [q, k, v, dout, cu]


def _fa2_step(S: int):
    """(step, tensors): dense causal FA2 (SDPA flash backend), (B, H, S, D), forward+backward."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = SHAPE
    g = torch.Generator(device="cuda")
    g.manual_seed(S)

    def rnd(grad):
        return torch.randn(1, s["H"], S, s["D"], generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)

    q, k, v, dout = rnd(True), rnd(True), rnd(True), rnd(False)

    def step():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    return step, [q, k, v, dout]


def measure(make_step, S: int, reps: int) -> dict:
    """One attempt: fresh inputs, a first step (whose peak memory is recorded), then ``reps``
    timed steps. Returns ``{"outcome", "detail", "peak_allocated_gb", "peak_reserved_gb",
    "base_allocated_gb", "step_ms", "reps", "wall_s"}``: running out of memory or past the size
    limits is an outcome, not an exception. Memory is freed before and after."""
    import torch

    from .timing import free_memory, time_idle

    t0 = time.monotonic()
    free_memory()
    res = {"outcome": "fits", "detail": "", "base_allocated_gb": torch.cuda.memory_allocated() / 1e9}
    step = tensors = None
    try:
        step, tensors = make_step(S)
        torch.cuda.synchronize()
        # inputs allocated, nothing else: the peak of the step counts them (and its gradients)
        torch.cuda.reset_peak_memory_stats()
        grads = step()
        torch.cuda.synchronize()
        del grads
        res["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        if reps > 0:
            t = time_idle(lambda: step(), "cuda", reps=reps, warmup=0)
            res["step_ms"], res["reps"] = t.median_ms, t.reps
    except Exception as e:  # noqa: BLE001 - classified; the exception (and the frames holding tensors) is dropped here
        res["outcome"], res["detail"] = _classify(e)
    finally:
        step = tensors = None
        free_memory()
    res["wall_s"] = time.monotonic() - t0
    return res


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None,
                   help="output file (default benchmarks/results/long-context_<device>_<date>.json)")
    p.add_argument("--cap-gb", type=float, default=80.0, help="memory cap in GB = 1e9 bytes (default 80)")
    p.add_argument("--growth", default="1M,1.5M,2M,3M,4M,6M,8M",
                   help="sizes tried in order until one fails (default 1M,1.5M,2M,3M,4M,6M,8M)")
    p.add_argument("--granularity", default="128K", help="bisection resolution in tokens (default 128K)")
    p.add_argument("--fa2-sizes", default="16K,32K,64K,128K",
                   help="sizes where FA2's (and MoBA's) peak is measured for the fit (default 16K,32K,64K,128K)")
    p.add_argument("--reps", type=int, default=2, help="timed steps per fitting size (median; default 2)")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds for the whole run (default 330); the search stops cleanly before an attempt "
                        "predicted to overrun it")
    args = p.parse_args(argv)
    try:
        args.growth = _token_list(args.growth)
        args.granularity = parse_tokens(args.granularity)
        args.fa2_sizes = _token_list(args.fa2_sizes)
    except ValueError as e:
        p.error(str(e))
    if len(set(args.fa2_sizes)) < 2:
        p.error("--fa2-sizes needs two sizes at least (for the line)")
    if args.reps < 0 or args.cap_gb <= 0:
        p.error("--reps >= 0 and --cap-gb > 0")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: PyTorch is not installed", file=sys.stderr)
        return EXIT_NO_CUDA
    if not torch.cuda.is_available():
        print("error: no CUDA device is available: the long-context search needs an NVIDIA GPU", file=sys.stderr)
        return EXIT_NO_CUDA

    from .moba import cute_impl_name, kernel_paths
    from .results import git_commit, results_path, write_results
    from .run import _versions

    t0 = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    name = torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    paths = kernel_paths()
    impl = cute_impl_name(paths) if paths.get("route") and paths.get("attention") else None
    if impl is None:
        print(f"error: no CuTe kernel path on this device (kernel_paths() = {paths})", file=sys.stderr)
        return 1
    cap = args.cap_gb * 1e9
    frac = min(1.0, cap / props.total_memory)
    torch.cuda.set_per_process_memory_fraction(frac)
    path = args.json or results_path(os.path.join("benchmarks", "results"), "long-context", name)
    meta = {"device": name, **_versions(), "commit": git_commit(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.long_context " + " ".join(argv), "kernel_paths": paths,
            "shape": SHAPE, "cap_bytes": min(cap, props.total_memory), "memory_fraction": frac,
            "total_memory_bytes": props.total_memory,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "step": "varlen_attention (routing included) + autograd.grad to q, k, v; inputs, upstream gradient "
                    "and gradients are counted in the peak",
            "granularity": args.granularity}
    lim, rule = size_limit_tokens(paths["attention"], args.granularity)
    meta["size_limit"] = {"longest_tokens": lim, "first_rule_broken": rule,
                          "note": "host arithmetic (interface.kernel_size_limits), no memory involved"}
    log(f"{name}: cap {cap / 1e9:.1f} GB of {props.total_memory / 1e9:.1f} GB (fraction {frac:.3f}); {impl}; "
        f"32-bit size limits admit up to {fmt_tokens(lim)} tokens" + (f" ({rule} beyond)" if rule else ""))
    records: list[dict] = []

    def add(impl_, phase, S, res):
        rec = {"impl": impl_, "phase": phase, "S": S, "outcome": res["outcome"], "note": res.get("detail", ""),
               **{k: res.get(k) for k in ("peak_allocated_gb", "peak_reserved_gb", "base_allocated_gb", "step_ms",
                                          "reps", "wall_s")}}
        records.append(rec)
        write_results(path, meta, records, normalize=normalize_long_record)
        peak = f"peak {rec['peak_allocated_gb']:.2f} GB" if rec.get("peak_allocated_gb") is not None else ""
        ms = f"step {rec['step_ms']:.0f} ms" if rec.get("step_ms") is not None else ""
        log(f"{impl_:<15} {phase:<7} S={fmt_tokens(S):<16} {res['outcome']:<5} {peak} {ms} "
            f"({res['wall_s']:.1f} s){'  ' + res['detail'] if res.get('detail') else ''}")

    def spent():
        return time.monotonic() - t0

    # 1. FA2 and MoBA at the small sizes (MoBA's first call compiles its kernels here)
    small_reps = 1
    for S in args.fa2_sizes:
        add("fa2", "fit", S, measure(_fa2_step, S, small_reps))
    for S in args.fa2_sizes:
        add(impl, "small", S, measure(lambda n: _moba_step(n, "cute"), S, small_reps))
    fa2_pts = [(r["S"], r["peak_allocated_gb"]) for r in records if r["impl"] == "fa2" and r["outcome"] == "fits"]

    # 2. the search; an attempt's wall time is predicted from the last one's, scaled by the size
    # squared (the routing's work grows as S^2), so that the run stops before the budget, not after
    last = {"S": None, "wall": None}

    def budget_ok(S):
        if last["S"] is None:
            return spent() < args.time_budget
        predicted = last["wall"] * (S / last["S"]) ** 2
        return spent() + predicted < args.time_budget

    search_recs: list[int] = []

    def fits(S):
        res = measure(lambda n: _moba_step(n, "cute"), S, args.reps)
        search_recs.append(len(records))
        add(impl, "search", S, res)
        if res["outcome"] == "fits":
            last["S"], last["wall"] = S, res["wall_s"]
        return res["outcome"], res["detail"]

    result = search_longest(fits, args.growth, args.granularity, budget_ok)
    for i, a in zip(search_recs, result.attempts):  # the phase each attempt belonged to
        records[i]["phase"] = a.phase
    meta["search"] = {"longest_tokens": result.longest, "first_failure_tokens": result.first_failure,
                      "stopped_by": result.stopped_by, "complete": result.complete,
                      "attempts": [(a.S, a.outcome) for a in result.attempts]}

    # 3. FA2's line, at the sizes MoBA fitted
    fitted = sorted({r["S"] for r in records if r["impl"] == impl and r["outcome"] == "fits"})
    if len(fa2_pts) >= 2:
        a, b = linear_fit(fa2_pts)
        meta["fa2_fit"] = {"intercept_gb": a, "gb_per_token": b, "points": fa2_pts,
                           "max_residual_gb": max(abs(y - (a + b * x)) for x, y in fa2_pts),
                           "extrapolated_peak_gb": {str(S): a + b * S for S in fitted
                                                    if S > max(x for x, _ in fa2_pts)},
                           "extrapolated_longest_tokens_in_cap": int((cap / 1e9 - a) / b) if b > 0 else None,
                           "note": "EXTRAPOLATED from the measured sizes by a least-squares line, not measured"}
    else:
        meta["fa2_fit"] = {"note": "fewer than two FA2 sizes fitted: no line"}
    write_results(path, meta, records, normalize=normalize_long_record)

    print()
    print(f"device: {name}; cap {cap / 1e9:.0f} GB; shape {SHAPE}")
    print(f"longest MoBA sequence (fwd+bwd): {fmt_tokens(result.longest)}; first failure "
          f"{fmt_tokens(result.first_failure)}: {result.stopped_by}"
          + ("" if result.complete else " (search incomplete)"))
    fit = meta["fa2_fit"]
    print(f"{'S':>18} {'MoBA peak GB':>13} {'MoBA step ms':>13} {'FA2 peak GB':>12}")
    for r in records:
        if r["outcome"] != "fits" or r["impl"] == "fa2":
            continue
        fa2 = next((x["peak_allocated_gb"] for x in records if x["impl"] == "fa2" and x["S"] == r["S"]
                    and x["outcome"] == "fits"), None)
        fa2_s = f"{fa2:.2f}" if fa2 is not None else (
            f"{fit['intercept_gb'] + fit['gb_per_token'] * r['S']:.2f} (extrap.)" if "gb_per_token" in fit else "-")
        step = f"{r['step_ms']:.0f}" if r.get("step_ms") is not None else "-"
        print(f"{fmt_tokens(r['S']):>18} {r['peak_allocated_gb']:>13.2f} {step:>13} {fa2_s:>12}")
    if "gb_per_token" in fit:
        print(f"FA2 line: {fit['intercept_gb']:.3f} GB + {fit['gb_per_token'] * 1e6:.3f} GB per 1M tokens "
              f"(fitted on {[format_size(int(x)) for x, _ in fa2_pts]}); extrapolated longest in the cap: "
              f"{fmt_tokens(fit['extrapolated_longest_tokens_in_cap'])}")
    print(f"\nresults: {path}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
