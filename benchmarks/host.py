"""The ``host`` suite (issue 16, "lean call path"): what one moba_cute call costs beyond its GPU work.

    python -m benchmarks.run --suite host [--sizes 8K,16K,64K] [--reps 20] [--out benchmarks/results]

Per size, at the flashmoba shape (B=2, H=Hk=16, D=128, C=128, K=8, bf16, causal, packed varlen), for
``moba_cute.varlen_attention(..., backend="auto")`` (routing included):

* ``eager_*_ms`` / ``graph_*_ms``: one call timed with CUDA events on an idle GPU, eagerly and as the replay
  of a CUDA graph captured from it; ``host_*_ms`` = eager - graph, the host's share of a call;
* dense FA4 on the same inputs in the same process, and ``*_vs_fa4`` = FA4 ms / eager moba_cute ms;
* the GPU work one warm call enqueues (torch.profiler): every kernel, and those not launched by moba_cute;
* ``host_breakdown_*``: host time (perf_counter) of the call and of its layers alone (routing, attention,
  the launch code without the custom-op dispatch, the input validation).

Everything is written so that a failing figure is recorded as null with the reason in ``note``, never
fatal. ``is_moba_kernel``, ``cuda_kernels`` and ``moba_calls`` are shared with tests/test_host_path_gpu.py.
See docs/benchmarks.md, "Host suite".
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import time
import warnings

import torch

from .common import Unsupported, grad_fn, make_inputs, no_grad_fn
from .configs import format_size
from .results import _fmt, align_columns, load_results, make_record, normalize_keys, write_results
from .run import _short, output_path, suite_meta
from .timing import free_memory, is_oom, time_idle

__all__ = ["HOST_KEYS", "BREAKDOWN_FWD", "BREAKDOWN_FWDBWD", "TARGETS", "is_moba_kernel", "short_kernel_name",
           "cuda_kernels", "moba_calls", "capture_graph", "bound_call", "normalize_host_record", "run_host"]

#: record keys of the host suite, in this order (the config part is results.make_record's)
HOST_KEYS = (
    "suite", "impl", "B", "H", "Hk", "D", "C", "K", "S", "dtype", "causal",
    "eager_fwd_ms", "graph_fwd_ms", "host_fwd_ms", "eager_fwdbwd_ms", "graph_fwdbwd_ms", "host_fwdbwd_ms",
    "fa4_fwd_ms", "fa4_fwdbwd_ms", "fwd_vs_fa4", "fwdbwd_vs_fa4",
    "fwd_kernel_count", "fwdbwd_kernel_count", "fwd_foreign_kernels", "fwdbwd_foreign_kernels",
    "fwd_kernels", "fwdbwd_kernels", "host_breakdown_fwd", "host_breakdown_fwdbwd", "reps", "note",
)
#: the pieces of the host-time breakdowns (stable names; a piece that cannot be called is null + noted)
BREAKDOWN_FWD = ("varlen_attention", "route", "attention_with_routing", "route_cute", "attention_cute",
                 "validation")
BREAKDOWN_FWDBWD = ("varlen_attention", "attention_with_routing", "attention_backward_cute")
#: issue 16's targets, checked at 8K: (label, record key, "<=" / ">=" / "==", bound); a list counts by length
TARGETS = (
    ("host share of a forward <= 0.15 ms", "host_fwd_ms", "<=", 0.15),
    ("host share of a forward+backward <= 0.3 ms", "host_fwdbwd_ms", "<=", 0.3),
    ("no foreign kernel in a forward", "fwd_foreign_kernels", "==", 0),
    ("no foreign kernel in a forward+backward", "fwdbwd_foreign_kernels", "==", 0),
    ("forward+backward >= 0.6x dense FA4", "fwdbwd_vs_fa4", ">=", 0.6),
)
TARGET_S = 8 * 1024
MIN_REPS = 20
FLASHMOBA_NOTE = "FlashMoBA: not available (not installed on this machine)"

# --------------------------------------------------------------------------------------------
# kernel names


# The CuTe DSL names a kernel's entry "kernel_cutlass_kernel_" + its module path with the dots dropped
# + its class + the argument signature, e.g. "kernel_cutlass_kernel_moba_cutekernelsslot_indexSlotIndexKernel
# _object_at__ptri32gmem_..._0" for moba_cute/kernels/slot_index.py's SlotIndexKernel (PTX of a CPU
# compile for sm_90a). PyTorch's kernels ("void at::native::..."), cuBLAS/CUTLASS ones, FA4's
# ("...flash_attncute...") and Memset/Memcpy activities never contain "moba_cutekernels". The separators
# are optional so that a DSL that kept dots or underscores still matches.
_MOBA = re.compile(r"moba_cute[._]?kernels[._]?(?P<mod>[a-z0-9_]+?)[._]?(?P<cls>[A-Z][A-Za-z0-9]*)")
# GPU-timeline activity kinds that are work (kineto's names); annotation/sync/overhead rows are not
_GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
_NOT_WORK = ("annotation", "sync", "overhead", "counter")


def is_moba_kernel(name: str) -> bool:
    """True for a kernel compiled by the CuTe DSL from moba_cute/kernels/*.py (see ``_MOBA``)."""
    return _MOBA.search(name) is not None


def short_kernel_name(name: str) -> str:
    """``moba_fwd_sm80.MobaFwdSm80`` (module.class) for ours; PyTorch's and others' demangled name without
    ``void`` and the parameter list, at most 120 characters; Memset/Memcpy activities unchanged."""
    m = _MOBA.search(name)
    if m:
        return f"{m['mod']}.{m['cls']}"
    if name.startswith(("Memset", "Memcpy")):
        return name
    s = name[5:] if name.startswith("void ") else name
    s = s.replace("(anonymous namespace)", "{anon}")
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i > 0:
            s = s[:i]
            break
    return s if len(s) <= 120 else s[:117] + "..."


def _is_gpu_work(ev) -> bool:
    kind = str(getattr(ev, "activity_type", "") or "").rsplit(".", 1)[-1].lower()
    if kind in _GPU_WORK:
        return True
    if getattr(ev, "is_user_annotation", False) or any(w in kind for w in _NOT_WORK):
        return False
    return True  # an unknown kind on the GPU timeline counts: better a false alarm than a missed kernel


def cuda_kernels(fn) -> list[str]:
    """Full names of the GPU work (kernels, memsets, memcopies) one call of ``fn`` enqueues, in launch order
    (one stream: GPU start order), recorded with torch.profiler (CPU and CUDA activities). Call ``fn`` once
    before: compilation and first-call setup are not what this counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    work = [e for e in prof.events() if e.device_type == DeviceType.CUDA and _is_gpu_work(e)]
    work.sort(key=lambda e: (e.time_range.start, e.id))
    return [e.name for e in work]


# --------------------------------------------------------------------------------------------
# the calls


def moba_calls(mc, inp, backend: str = "auto"):
    """(forward, forward+backward) callables of ``mc.varlen_attention`` on ``inp`` (benchmarks.common.Inputs):
    the forward under no_grad, the forward+backward through torch.autograd.grad to q, k, v (nothing
    accumulates) with the fixed upstream gradient ``inp.dout``."""
    cfg = inp.cfg
    q, k, v, cu, m = inp.q, inp.k, inp.v, inp.cu_seqlens, inp.max_seqlen

    def call():
        return mc.varlen_attention(q, k, v, cu, cu, m, m, chunk_size=cfg.C, topk=cfg.K, causal=cfg.causal,
                                   backend=backend)

    return no_grad_fn(call), grad_fn(call, (q, k, v), lambda out: inp.dout)


def capture_graph(fn, warmup: int = 3):
    """(graph, static output) of ``fn`` captured once in a CUDA graph after ``warmup`` calls on a side
    stream (as the PyTorch docs do, so that no lazy initialization happens during the capture). Raises the
    first error raised inside the capture, not the capture_end error that follows it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    first = None
    try:
        with torch.cuda.graph(g):
            try:
                static = fn()
            except Exception as e:
                first = e
                raise
    except Exception:
        if first is not None:
            raise first from None
        raise
    return g, static


def bound_call(dotted: str, *args, **kwargs):
    """``lambda: moba_cute.<dotted>(*args, **kwargs)``; raises LookupError, saying so, if the function is
    gone or its signature no longer takes these arguments (internals may be renamed)."""
    mod_name, _, attr = ("moba_cute." + dotted).rpartition(".")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise LookupError(f"moba_cute.{dotted} not found ({e})") from None
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise LookupError(f"moba_cute.{dotted}: signature differs ({e})") from None
    except ValueError:
        pass  # no introspectable signature: the call itself will tell
    return lambda: fn(*args, **kwargs)


def _free() -> None:
    """free_memory(), which synchronizes: after a failed capture that may raise again; not fatal either."""
    try:
        free_memory()
    except Exception:  # noqa: BLE001
        pass


def _try(what: str, fn, notes: list):
    """``fn()``, or None with "what: error" noted (out of memory freed); never raises."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure is recorded, never fatal
        notes.append(f"{what}: {'out of memory' if is_oom(e) else _short(e, 200)}")
        _free()
        return None


def _max_diff(a, b) -> float:
    ta, tb = (x if isinstance(x, (tuple, list)) else (x,) for x in (a, b))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(ta, tb))


def _breakdown(pieces: dict, device: str, reps: int, warmup: int, grad: bool, label: str, notes: list) -> dict:
    """Median host ms (perf_counter, idle GPU before each sample) of each piece: a function that returns
    the zero-argument call to time, or raises to say why it cannot be timed (then null + noted)."""
    out = {}
    with torch.set_grad_enabled(grad):
        for name, make in pieces.items():
            out[name] = _try(f"{label}.{name}", lambda: time_idle(make(), device, reps, warmup, "host").median_ms,
                             notes)
    return out


# --------------------------------------------------------------------------------------------
# one size


def measure(cfg, device: str, reps: int, warmup: int, impl: str, mc) -> dict:
    """The host-suite record of one config."""
    notes: list = []
    figs: dict = {}
    cuda = device == "cuda"
    inp = make_inputs(cfg, device)
    fwd, fwdbwd = moba_calls(mc, inp)
    # warm-up (compiles the kernels); a fallback of backend "auto" to the reference is worth a note
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = _try("warm-up", lambda: (fwd(), fwdbwd()), notes) is not None
    notes += [f"warning: {w.message}" for w in caught if str(w.message).startswith("moba_cute")]

    def idle_ms(fn):
        return time_idle(fn, device, reps, warmup).median_ms

    for kind, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        figs[f"eager_{kind}_ms"] = _try(f"eager {kind}", lambda: idle_ms(fn), notes) if ok else None
        if not cuda:
            continue

        def graph_ms():
            g, static = capture_graph(fn)
            g.replay()
            diff = _max_diff(fn(), static)  # the replay must compute what the eager call computes
            if diff != 0:
                notes.append(f"graph {kind}: replay differs from the eager call by up to {diff:.3g}")
            return idle_ms(g.replay)

        figs[f"graph_{kind}_ms"] = _try(f"graph {kind}", graph_ms, notes) if ok else None
        _free()  # the graph's private memory pool
        if figs[f"eager_{kind}_ms"] is not None and figs[f"graph_{kind}_ms"] is not None:
            figs[f"host_{kind}_ms"] = figs[f"eager_{kind}_ms"] - figs[f"graph_{kind}_ms"]
    if not cuda:
        notes.append("graph: CUDA graphs need a GPU")

    # dense FA4 (flash_attn_func on (B, S, H, D) views), same idle-GPU timing
    if cuda:
        from .baselines import fa4_runner

        try:
            fa4 = fa4_runner(inp)
            figs["fa4_fwd_ms"] = _try("fa4 fwd", lambda: idle_ms(no_grad_fn(fa4.fwd)), notes)
            figs["fa4_fwdbwd_ms"] = _try("fa4 fwdbwd", lambda: idle_ms(fa4.fwdbwd), notes)
        except Unsupported as e:
            notes.append(f"fa4: {e}")
        for kind in ("fwd", "fwdbwd"):
            base, ours = figs.get(f"fa4_{kind}_ms"), figs.get(f"eager_{kind}_ms")
            figs[f"{kind}_vs_fa4"] = base / ours if base and ours else None
    else:
        notes.append("fa4: needs a GPU")
    notes.append(FLASHMOBA_NOTE)

    # the GPU work of one warm call
    for kind, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        if not cuda:
            figs[f"{kind}_kernels"], figs[f"{kind}_foreign_kernels"] = [], []
            continue
        names = _try(f"{kind} kernels", lambda: cuda_kernels(fn), notes) if ok else None
        if names is not None:
            figs[f"{kind}_kernels"] = [short_kernel_name(n) for n in names]
            figs[f"{kind}_foreign_kernels"] = [short_kernel_name(n) for n in names if not is_moba_kernel(n)]
            figs[f"{kind}_kernel_count"] = len(names)
    if not cuda:
        notes.append("kernels: need a GPU (torch.profiler CUDA activities)")

    figs["host_breakdown_fwd"], figs["host_breakdown_fwdbwd"] = _breakdowns(inp, device, reps, warmup, notes)
    if reps < MIN_REPS:
        notes.append(f"{reps} samples per figure (fewer than {MIN_REPS})")
    return _record(cfg, impl, **figs, reps=reps, note="; ".join(notes))


def _record(cfg, impl: str, **figures) -> dict:
    """A host record: the config part as results.make_record writes it, then the figures."""
    base = {k: v for k, v in make_record(cfg, impl).items() if k in HOST_KEYS}
    return normalize_host_record({**base, **figures})


def _breakdowns(inp, device: str, reps: int, warmup: int, notes: list) -> tuple[dict, dict]:
    """``host_breakdown_fwd`` and ``host_breakdown_fwdbwd`` (BREAKDOWN_FWD / BREAKDOWN_FWDBWD pieces)."""
    cfg = inp.cfg
    q, k, v, cu, m, dout = inp.q, inp.k, inp.v, inp.cu_seqlens, inp.max_seqlen, inp.dout
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    C, K, causal = cfg.C, cfg.K, cfg.causal
    cache: dict = {}

    def routing():  # one routing for the pieces that take one (the public route, backend "auto")
        if "r" not in cache:
            cache["r"] = bound_call("route", qd, kd, cu, cu, m, m, C, K, causal)()
        return cache["r"]

    def cuda_only(make):
        def checked():
            if device != "cuda":
                raise Unsupported("the CuTe launch code needs a GPU")
            return make()

        return checked

    def validation():
        scalars = bound_call("interface._check_scalars", C, K, causal, None, "auto", return_lse=False,
                             deterministic=False)
        tensors = bound_call("interface._check_varlen", q, k, v, cu, cu, m, m)
        return lambda: (scalars(), tensors())

    def fwd_out():
        if "o" not in cache:
            with torch.no_grad():
                cache["o"] = bound_call("kernels.attention_launch.attention_cute", qd, kd, vd, routing(), None,
                                        False)()
        return cache["o"]

    def with_grad(call):
        return grad_fn(call, (q, k, v), lambda out: dout)

    fwd = {
        "varlen_attention": lambda: bound_call("varlen_attention", q, k, v, cu, cu, m, m, chunk_size=C, topk=K,
                                               causal=causal),
        "route": lambda: bound_call("route", qd, kd, cu, cu, m, m, C, K, causal),
        "attention_with_routing": lambda: bound_call("attention_with_routing", q, k, v, routing()),
        "route_cute": cuda_only(lambda: bound_call("kernels.route_launch.route_cute", qd, kd, cu, cu, m, m, C, K,
                                                   causal)),
        "attention_cute": cuda_only(lambda: bound_call("kernels.attention_launch.attention_cute", qd, kd, vd,
                                                       routing(), None, False)),
        "validation": validation,
    }
    fwdbwd = {
        "varlen_attention": lambda: with_grad(bound_call("varlen_attention", q, k, v, cu, cu, m, m, chunk_size=C,
                                                         topk=K, causal=causal)),
        "attention_with_routing": lambda: with_grad(bound_call("attention_with_routing", q, k, v, routing())),
        "attention_backward_cute": cuda_only(lambda: bound_call(
            "kernels.attention_launch.attention_backward_cute", qd, kd, vd, *fwd_out(), dout, None, routing(),
            None, False)),
    }
    assert tuple(fwd) == BREAKDOWN_FWD and tuple(fwdbwd) == BREAKDOWN_FWDBWD
    out_fwd = _breakdown(fwd, device, reps, warmup, False, "host_breakdown_fwd", notes)
    out_fwdbwd = _breakdown(fwdbwd, device, reps, warmup, True, "host_breakdown_fwdbwd", notes)
    cache.clear()
    return out_fwd, out_fwdbwd


# --------------------------------------------------------------------------------------------
# records, table, CLI


def normalize_host_record(rec: dict) -> dict:
    """HOST_KEYS in order (missing ones null), NaN/inf null, note a string; unknown keys are an error."""
    return normalize_keys(rec, HOST_KEYS, kind="host")


def target_checks(rec: dict) -> list[tuple[str, bool | None]]:
    """(label, met?) of each of TARGETS for a record (None: not measured)."""
    out = []
    for label, key, op, bound in TARGETS:
        x = rec.get(key)
        if isinstance(x, list):
            x = len(x) if rec.get(key.replace("foreign_kernels", "kernel_count")) is not None else None
        ok = None if x is None else (x <= bound if op == "<=" else x >= bound if op == ">=" else x == bound)
        out.append((label, ok))
    return out


def _runs(names) -> str:
    """'a, b x7, c': consecutive repeats folded."""
    if names is None:
        return "-"
    out = []
    for n in names:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return ", ".join(n if c == 1 else f"{n} x{c}" for n, c in out) or "(none)"


_TABLE_MS = ("eager_fwd_ms", "graph_fwd_ms", "host_fwd_ms", "eager_fwdbwd_ms", "graph_fwdbwd_ms", "host_fwdbwd_ms",
             "fa4_fwd_ms", "fa4_fwdbwd_ms")


def format_host_table(records: list[dict], device: str = "") -> str:
    """The printed table: one line per size, then the breakdowns, the kernel lists, the 8K targets, notes."""
    cols = ["S", "eager fwd", "graph fwd", "host fwd", "eager f+b", "graph f+b", "host f+b", "FA4 fwd", "FA4 f+b",
            "xFA4 f/fb", "kernels f/fb", "foreign f/fb", "n"]
    rows, notes, extra = [], [], []
    for r in records:
        n = ""
        if r.get("note"):
            notes.append(r["note"])
            n = f"[{len(notes)}]"

        def nf(key):
            x = r.get(key)
            return "-" if x is None else str(len(x) if isinstance(x, list) else x)

        rows.append([format_size(r["S"]), *(_fmt(r[k], 3) for k in _TABLE_MS),
                     f"{_fmt(r['fwd_vs_fa4'])}/{_fmt(r['fwdbwd_vs_fa4'])}",
                     f"{nf('fwd_kernel_count')}/{nf('fwdbwd_kernel_count')}",
                     f"{nf('fwd_foreign_kernels')}/{nf('fwdbwd_foreign_kernels')}"
                     if r.get("fwd_kernel_count") is not None else "-/-", n])
        s = format_size(r["S"])
        for kind in ("fwd", "fwdbwd"):
            parts = "  ".join(f"{name} {_fmt(ms, 3)}" for name, ms in (r[f"host_breakdown_{kind}"] or {}).items())
            extra.append(f"  {s} {kind:<6} host ms: {parts}")
        for kind in ("fwd", "fwdbwd"):
            if r.get(f"{kind}_kernel_count") is not None:
                extra.append(f"  {s} {kind:<6} kernels ({r[f'{kind}_kernel_count']}): {_runs(r[f'{kind}_kernels'])}")
        if r["S"] == TARGET_S and r.get("fwd_kernel_count") is not None:
            extra += [f"  target {'met' if ok else 'MISSED' if ok is False else 'not measured'}: {label}"
                      for label, ok in target_checks(r)]
    lines = []
    if device:
        how = "wall clock, not a performance figure" if device.startswith("cpu-dry-run") else "on an idle GPU"
        lines.append(f"device: {device}   (ms, median of single calls, {how}; host = eager - graph; "
                     "xFA4 = FA4 ms / moba_cute ms)")
    lines += align_columns(cols, rows)
    lines += extra
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def run_host(args, device: str, cfgs: list) -> int:
    """``python -m benchmarks.run --suite host`` (run.py has parsed the arguments and picked the configs):
    uses --sizes, --reps, --warmup, --out, --dry-run, --merge."""
    from .moba import import_moba

    t0 = time.monotonic()
    device_name, paths, meta = suite_meta(args, device)
    meta["timing"] = {
        "reps": args.reps, "warmup": args.warmup, "statistic": "median",
        "method": ("single calls, GPU synchronized before each; CUDA events (eager, graph replay, FA4), "
                   "time.perf_counter on the host (host_breakdown_*); no L2 flush" if device == "cuda"
                   else "wall clock (CPU dry run: not a performance figure)"),
    }
    meta["targets"] = {label: f"{key} {op} {bound} at S={format_size(TARGET_S)}" for label, key, op, bound in TARGETS}
    path = output_path(args, device, device_name)
    kept = []
    if args.merge and os.path.exists(path):  # keep the other sizes of today's file
        try:
            kept = [r for r in load_results(path)["records"] if r["S"] not in {c.S for c in cfgs}]
        except (OSError, ValueError, KeyError) as e:
            print(f"--merge: cannot read {path} ({e}); starting afresh")
    try:
        mc = import_moba()
    except Unsupported as e:
        print(f"error: {e}")
        return 1
    impl = "reference"
    if device == "cuda" and paths.get("attention"):
        impl = f"moba_cute.{paths['attention']}"
    print(f"suite host on {device_name}: {len(cfgs)} size(s), impl {impl}, {args.reps} samples per figure; "
          f"kernel_paths={paths}", flush=True)
    records: list[dict] = []
    try:
        for cfg in cfgs:
            print(f"\n[host] {cfg.label()}", flush=True)
            try:
                rec = measure(cfg, device, args.reps, args.warmup, impl, mc)
            except Exception as e:  # noqa: BLE001 - e.g. the inputs do not fit: recorded, the next size runs
                _free()
                rec = _record(cfg, impl, note=f"error: {'out of memory' if is_oom(e) else _short(e)}")
            _free()  # this size's inputs and outputs
            records.append(rec)
            write_results(path, meta, sorted(kept + records, key=lambda r: r["S"]), normalize=normalize_host_record)
            print(f"  eager fwd={_fmt(rec['eager_fwd_ms'], 3)} graph fwd={_fmt(rec['graph_fwd_ms'], 3)} "
                  f"eager f+b={_fmt(rec['eager_fwdbwd_ms'], 3)} graph f+b={_fmt(rec['graph_fwdbwd_ms'], 3)}",
                  flush=True)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
    all_recs = sorted(kept + records, key=lambda r: r["S"])
    write_results(path, meta, all_recs, normalize=normalize_host_record)
    print()
    print(format_host_table(all_recs, device_name))
    print(f"\nresults: {path}")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0
