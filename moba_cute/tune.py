"""Per-GPU tile tuner: ``python -m moba_cute.tune``.

On the current CUDA GPU, for each shape (default: the benchmark suites' shapes and decode steps,
:data:`PRESETS`), times every shipped tile of the kernel family that serves the shape on this
device (:func:`moba_cute.configs.tuned.candidates`: the tiles the CPU compile tests prove; the
forward families ``sm90_fwd`` / ``sm80_fwd`` and the routing's top-k ``sm90_topk`` /
``sm80_topk`` for a forward shape, ``decode``, the decode-step kernels' key-split waves, for a
decode step), picks the fastest, and writes a table that dispatch reads before the built-in
tiles (format, lookup and precedence: :mod:`moba_cute.configs.tuned`)::

    python -m moba_cute.tune                                   # all presets -> ~/.cache/moba_cute/tuned.json
    python -m moba_cute.tune --shapes flashmoba-8K,flashmoba-64K --out tuned.json
    python -m moba_cute.tune --shape B=1,H=32,Hk=8,D=128,C=1024,K=8,S=64K
    python -m moba_cute.tune --shape B=8,H=32,Hk=8,D=128,C=4096,K=12,S=32K,new=1   # a decode step
    python -m moba_cute.tune --list                            # presets, shape classes, candidates (no GPU)

A forward candidate is timed through the public path (``moba_cute.attention_with_routing`` with
``backend="cute"`` on one routing, under ``torch.no_grad``), a top-k candidate as the routing
(``moba_cute.route``; its selection and index must equal the built-in tile's bit for bit), a
decode candidate as a decode step (``moba_cute.varlen_attention``: ``new`` queries per sequence
against ``S`` cached keys plus themselves, routing included), with the tile forced by
``attention_launch.tile_override`` / ``route_launch.tile_override`` /
``decode_launch.tile_override``, the hooks dispatch itself reads: CUDA events around each call,
the L2 flushed before each, warm-up (compilation included) excluded, rounds interleaving the
candidates so that clock drift hits them alike, the median of all runs. Each candidate's output
is compared with the built-in tile's; one that disagrees is reported and never chosen. The
backward kernels ship one configuration per head dim: nothing to time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from .configs import tuned

__all__ = ["Shape", "PRESETS", "Result", "parse_shape", "family_for", "families_for", "choose", "tune", "update_table",
           "write_table", "CudaMeasure", "main"]

Tile = Tuple[int, ...]
# a measurement: median ms, or why the candidate has none (an error, a wrong result)
Measurement = Union[float, str]
Measure = Callable[["Shape", str, List[Tile]], Dict[Tile, Measurement]]

KI = 1024


@dataclass(frozen=True)
class Shape:
    """One tuning shape: ``B`` sequences of ``S`` tokens (Sq = Sk), as the benchmark suites; with
    ``new`` > 0 a decode step: ``new`` queries per sequence against ``S`` cached keys and
    themselves (Sk = S + new, bottom-right aligned), as benchmarks/decode.py."""

    name: str
    B: int
    H: int
    Hk: int
    D: int
    C: int
    K: int
    S: int
    dtype: str = "bfloat16"
    causal: bool = True
    new: int = 0

    @property
    def decode(self) -> bool:
        return self.new > 0

    @property
    def Sq(self) -> int:
        return self.new if self.decode else self.S

    @property
    def Sk(self) -> int:
        return self.S + self.new

    @property
    def rows(self) -> int:
        """The shape class's rows: (query, head) pairs."""
        return self.B * self.Sq * self.H

    @property
    def shape_class(self) -> str:
        return tuned.shape_class(self.dtype, self.D, self.causal, self.C, self.K, self.rows)

    def label(self) -> str:
        mode = "" if self.causal else " non-causal"
        step = f" +{self.new} (decode)" if self.decode else ""
        return (f"B={self.B} H={self.H}/{self.Hk} D={self.D} C={self.C} K={self.K} S={_fmt_size(self.S)}{step} "
                f"{self.dtype}{mode}")


def _fmt_size(n: int) -> str:
    return f"{n // KI}K" if n % KI == 0 else str(n)


def _parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": KI, "M": KI * KI}.get(t[-1:], 1)
    val = int(t[:-1] if mult > 1 else t) * mult
    if val <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return val


# the shapes of benchmarks/configs.py (SPEC section 4): flashmoba at its smallest and at 64K,
# moba-large at both of its (C, K) settings; decode steps of benchmarks/decode.py (H=32/8, D=128,
# one new token, 64K cached: the middle of its 32K-128K) at 1 and 8 sequences, with the
# integration's default (C, K) = (4096, 12) (the group kernel) and with (128, 8) (the per-head one)
PRESETS: Dict[str, Shape] = {s.name: s for s in (
    Shape("flashmoba-8K", 2, 16, 16, 128, 128, 8, 8 * KI),
    Shape("flashmoba-64K", 2, 16, 16, 128, 128, 8, 64 * KI),
    Shape("moba-large-32K", 1, 32, 8, 128, 512, 3, 32 * KI),
    Shape("moba-large-128K", 1, 32, 8, 128, 4096, 12, 128 * KI),
) + tuple(Shape(f"decode-B{b}-C{c}", b, 32, 8, 128, c, k, 64 * KI, new=1)
          for c, k in ((4096, 12), (128, 8)) for b in (1, 8))}


def parse_shape(spec: str) -> Shape:
    """``"B=2,H=16,Hk=16,D=128,C=128,K=8,S=8K[,dtype=float16][,causal=0]"`` -> Shape (Hk
    defaults to H)."""
    fields: Dict[str, str] = {}
    for part in spec.split(","):
        if part.strip():
            key, sep, val = part.partition("=")
            if not sep:
                raise ValueError(f"shape {spec!r}: {part!r} is not key=value")
            fields[key.strip()] = val.strip()
    unknown = set(fields) - {"B", "H", "Hk", "D", "C", "K", "S", "dtype", "causal", "new"}
    missing = {"B", "H", "D", "C", "K", "S"} - set(fields)
    if unknown or missing:
        raise ValueError(f"shape {spec!r}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    try:
        ints = {k: _parse_size(fields[k]) for k in ("B", "H", "D", "C", "K", "S")}
        hk = _parse_size(fields.get("Hk", fields["H"]))
        new = int(fields.get("new", "0"))
        if new < 0:
            raise ValueError("new must be >= 0")
    except ValueError as e:
        raise ValueError(f"shape {spec!r}: {e}") from None
    dtype = fields.get("dtype", "bfloat16")
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"shape {spec!r}: dtype must be bfloat16 or float16")
    causal = fields.get("causal", "1") not in ("0", "false", "False")
    if ints["H"] % hk:
        raise ValueError(f"shape {spec!r}: H must be a multiple of Hk")
    name = f"custom-D{ints['D']}-{_fmt_size(ints['S'])}-C{ints['C']}-K{ints['K']}" + (f"-new{new}" if new else "")
    return Shape(name, ints["B"], ints["H"], hk, ints["D"], ints["C"], ints["K"], ints["S"], dtype, causal, new)


def family_for(shape: Shape, arch: str) -> Tuple[Optional[str], Optional[str]]:
    """(family, None) of the kernels that dispatch runs for ``shape`` on ``arch``, or (None,
    reason) when the CuTe kernels do not support it."""
    import torch

    if shape.decode:
        from .kernels import decode_launch as dl

        reason = dl.decode_unsupported_reason(getattr(torch, shape.dtype), shape.D, shape.H, shape.C, shape.K,
                                              shape.Sq, shape.Sk, shape.B)
        if reason is None and shape.H % shape.Hk:
            reason = "num_heads must be a multiple of num_kv_heads"
        return (None, reason) if reason is not None else ("decode", None)
    from .kernels import attention_launch as al

    reason = al.attention_unsupported_reason(getattr(torch, shape.dtype), shape.D, shape.C, shape.K, arch)
    if reason is not None:
        return None, reason
    return ("sm90_fwd" if al.uses_sm90(shape.dtype, shape.D, arch) else "sm80_fwd"), None


def families_for(shape: Shape, arch: str) -> Tuple[List[str], Optional[str]]:
    """The tile families the tuner times for ``shape`` on ``arch``: the attention kernels'
    (:func:`family_for`) and, for a forward, the routing's top-k (where it has candidates for
    the head dim); ``([], reason)`` when the CuTe kernels do not support the shape."""
    fam, reason = family_for(shape, arch)
    if fam is None:
        return [], reason
    fams = [fam]
    if not shape.decode:
        from .kernels import route_launch as rl

        topk = rl.topk_family(arch)
        if tuned.candidates(topk, shape.D):
            fams.append(topk)
    return fams, None


def choose(times: Dict[Tile, Measurement], default: Tile, min_gain: float) -> Optional[Tile]:
    """The tile to write: the fastest measured one, but the default unless the fastest beats it
    by more than ``min_gain`` (a fraction of the default's time), so that timing noise does not
    move a table away from the built-in tile. None if nothing was measured."""
    ok = {t: ms for t, ms in times.items() if isinstance(ms, float)}
    if not ok:
        return None
    best = min(ok, key=lambda t: (ok[t], t != default))
    if default in ok and best != default and ok[best] > ok[default] * (1.0 - min_gain):
        return default
    return best


@dataclass
class Result:
    """The outcome for one shape: ``chosen`` is None when nothing was written (``note`` says why)."""

    shape: Shape
    family: Optional[str]
    default: Optional[Tile]
    times: Dict[Tile, Measurement] = field(default_factory=dict)
    chosen: Optional[Tile] = None
    note: str = ""

    def ms(self, tile) -> Optional[float]:
        v = self.times.get(tile)
        return v if isinstance(v, float) else None

    @property
    def speedup(self) -> Optional[float]:
        """Built-in tile's time over the chosen tile's (None when either is missing)."""
        d, c = self.ms(self.default), self.ms(self.chosen)
        return d / c if d and c else None


def _fmt_tile(t) -> str:
    return "(" + ", ".join(str(x) for x in t) + ")"


def tune(shapes: List[Shape], measure: Measure, arch: str, min_gain: float = 0.01,
         log: Callable[[str], None] = print) -> List[Result]:
    """Time the candidates of every shape with ``measure(shape, family, tiles) -> {tile: ms or
    error}`` and choose (:func:`choose`); progress goes to ``log``, one line per candidate."""
    results = []
    for i, shape in enumerate(shapes):
        head = f"[{i + 1}/{len(shapes)}] {shape.name}: {shape.label()}"
        fams, reason = families_for(shape, arch)
        if not fams:
            log(f"{head}: skipped ({reason})")
            results.append(Result(shape, None, None, note=reason))
            continue
        log(head)
        for fam in fams:
            results.append(_tune_family(shape, fam, measure, min_gain, log))
    return results


def _tune_family(shape: Shape, fam: str, measure: Measure, min_gain: float, log: Callable[[str], None]) -> Result:
    """Time and choose among the candidates of one family for one shape."""
    cands = list(tuned.candidates(fam, shape.D, shape.C))
    default = cands[0]
    log(f"    {fam}, class {shape.shape_class}, {len(cands)} candidates")
    if len(cands) < 2:
        log("    only the built-in tile ships for this head dim: nothing to choose")
        return Result(shape, fam, default, note="one candidate")
    times = measure(shape, fam, cands)
    d_ms = times.get(default) if isinstance(times.get(default), float) else None
    for t in cands:
        v = times.get(t, "not measured")
        tag = " [built-in]" if t == default else ""
        if isinstance(v, float):
            rel = f"  {d_ms / v:5.3f}x built-in" if d_ms and t != default else ""
            log(f"    {fam} {_fmt_tile(t):18s}{tag:11s} {v:10.4f} ms{rel}")
        else:
            log(f"    {fam} {_fmt_tile(t):18s}{tag:11s}   failed: {v}")
    res = Result(shape, fam, default, times, choose(times, default, min_gain))
    if res.chosen is None:
        res.note = "no candidate could be timed"
        log("    -> nothing written (no candidate could be timed)")
    else:
        sp = f", {res.speedup:.3f}x the built-in tile" if res.speedup else ""
        log(f"    -> {_fmt_tile(res.chosen)}{sp}")
    return res


def update_table(table: dict, device: str, meta: dict, results: List[Result], date: str) -> dict:
    """``table`` (decoded JSON, ``{}`` for none) with this run's choices for ``device``: entries
    of other devices and other shape classes are kept, tuned classes replaced."""
    out = json.loads(json.dumps(table)) if table else {}
    out["format"] = tuned.FORMAT
    dev = out.setdefault("devices", {}).setdefault(device, {})
    dev["meta"] = dict(meta)
    entries = dev.setdefault("entries", {})
    for r in results:
        if r.chosen is None:
            continue
        entries.setdefault(r.family, {})[r.shape.shape_class] = {
            "tile": list(r.chosen),
            "ms": r.ms(r.chosen),
            "default_ms": r.ms(r.default),
            "times_ms": {",".join(map(str, t)): (v if isinstance(v, float) else None) for t, v in r.times.items()},
            "shape": r.shape.label(),
            "date": date,
        }
    return out


def write_table(path: str, table: dict) -> None:
    """Write atomically (a reader never sees half a file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --- GPU timing -------------------------------------------------------------------------------

SLOW_RUN_MS = 2000.0
# a candidate must match the built-in tile's output to this tolerance (both in the input dtype:
# a few ulps of bf16 around |out| ~ 1; a broken tile is off by far more)
OUT_TOL = 2.0 ** -6
LSE_TOL = 1e-2


def _error(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


class CudaMeasure:
    """Times the candidates of one shape on the current CUDA device (see the module docstring):
    ``warmup`` untimed calls per candidate (the first compiles), then ``rounds`` rounds of
    ``reps`` timed calls per candidate (3 when a call takes over 2 s)."""

    def __init__(self, reps: int = 10, rounds: int = 2, warmup: int = 2, check: bool = True,
                 log: Callable[[str], None] = print):
        import torch

        if reps < 1 or rounds < 1 or warmup < 1:
            raise ValueError("reps, rounds and warmup must be >= 1")
        self.reps, self.rounds, self.warmup, self.check, self.log = reps, rounds, warmup, check, log
        self.dev = torch.device("cuda", torch.cuda.current_device())
        l2 = getattr(torch.cuda.get_device_properties(self.dev), "L2_cache_size", 0) or (50 << 20)
        self._flush = torch.empty(max(4 * l2, 256 << 20) // 4, dtype=torch.int32, device=self.dev)

    def _call(self, shape: Shape, family: str = ""):
        """The timed call of ``shape`` on fresh random inputs: a forward on one routing, or a decode
        step (routing included), returning (out, lse); for a top-k family the routing, returning
        its (selection, offsets, query_rows)."""
        import torch

        import moba_cute

        dt = getattr(torch, shape.dtype)
        g = torch.Generator(device=self.dev)
        g.manual_seed(0)
        nq, nk = shape.B * shape.Sq, shape.B * shape.Sk
        q = torch.randn(nq, shape.H, shape.D, generator=g, device=self.dev, dtype=dt)
        k = torch.randn(nk, shape.Hk, shape.D, generator=g, device=self.dev, dtype=dt)
        v = torch.randn(nk, shape.Hk, shape.D, generator=g, device=self.dev, dtype=dt)
        cu_q = torch.arange(shape.B + 1, device=self.dev, dtype=torch.int32) * shape.Sq
        cu_k = torch.arange(shape.B + 1, device=self.dev, dtype=torch.int32) * shape.Sk
        if shape.decode:
            def call():
                with torch.no_grad():
                    return moba_cute.varlen_attention(q, k, v, cu_q, cu_k, shape.Sq, shape.Sk, shape.C, shape.K,
                                                      shape.causal, return_lse=True, backend="cute")
            return call
        if family.endswith("_topk"):
            def call():
                r = moba_cute.route(q, k, cu_q, cu_k, shape.S, shape.S, shape.C, shape.K, shape.causal,
                                    backend="cute")
                return r.selection, r.offsets, r.query_rows
            return call
        r = moba_cute.route(q, k, cu_q, cu_k, shape.S, shape.S, shape.C, shape.K, shape.causal, backend="cute")

        def call():
            with torch.no_grad():
                return moba_cute.attention_with_routing(q, k, v, r, return_lse=True, backend="cute")
        return call

    @staticmethod
    def _override(family: str, tile: Tile):
        if family == "decode":
            from .kernels import decode_launch

            return decode_launch.tile_override(tile)
        if family.endswith("_topk"):
            from .kernels import route_launch

            return route_launch.tile_override(family, tile)
        from .kernels import attention_launch

        return attention_launch.tile_override(family, tile)

    def __call__(self, shape: Shape, family: str, tiles: List[Tile]) -> Dict[Tile, Measurement]:
        import torch

        try:
            call = self._call(shape, family)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {t: "out of memory" for t in tiles}

        out: Dict[Tile, Measurement] = {}
        reps = self.reps
        ref = None  # the result of the first candidate that ran: the built-in tile unless it failed
        compare = self._compare_routing if family.endswith("_topk") else self._compare
        ref_tile = None
        live = []
        for t in tiles:  # warm-up: compile, check, and learn how long one call takes
            try:
                with self._override(family, t):
                    t0 = time.perf_counter()
                    res = call()
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    for _ in range(self.warmup - 1):
                        call()
                    w = self._time_one(call)
            except Exception as e:  # noqa: BLE001  (a candidate failing must not stop the others)
                out[t] = _error(e)
                torch.cuda.empty_cache()
                continue
            bad = compare(res, ref) if self.check else None
            if bad:
                out[t] = f"wrong result{f' against {_fmt_tile(ref_tile)}' if ref is not None else ''}: {bad}"
                continue
            if ref is None:
                ref, ref_tile = res, t
            del res
            self.log(f"    warmed {_fmt_tile(t)} (first call {first_s:.1f} s, then {w:.3f} ms)")
            if w > SLOW_RUN_MS:
                reps = min(reps, 3)
            live.append(t)
        del ref
        samples: Dict[Tile, List[float]] = {t: [] for t in live}
        for _ in range(self.rounds):
            for t in [t for t in live if t not in out]:
                try:
                    with self._override(family, t):
                        call()  # re-plans under the tile (host work outside the timed runs)
                        samples[t] += self._time_runs(call, reps)
                except Exception as e:  # noqa: BLE001
                    out[t] = _error(e)
        for t in live:
            if t not in out:
                out[t] = float(statistics.median(samples[t]))
        del call
        torch.cuda.empty_cache()
        return out

    @staticmethod
    def _compare_routing(res, ref) -> Optional[str]:
        """Why a routing's (selection, offsets, query_rows) differs from ``ref``'s, or None: the
        top-k is exact, so every tile must give the same result bit for bit."""
        import torch

        if ref is None:
            return None
        for name, a, b in zip(("selection", "offsets", "query_rows"), res, ref):
            if not torch.equal(a, b):
                return f"{name} differs from the reference tile's"
        return None

    @staticmethod
    def _compare(res, ref) -> Optional[str]:
        """Why ``res`` = (o, lse) is not a valid forward result agreeing with ``ref``, or None."""
        import torch

        o, lse = res

        if not torch.isfinite(o).all():
            return "non-finite output"
        if ref is None:
            return None
        ro, rl = ref
        d_out = (o.float() - ro.float()).abs().max().item()
        if not torch.allclose(o.float(), ro.float(), rtol=OUT_TOL, atol=OUT_TOL):
            return f"max |out - out_ref| = {d_out:.3g}"
        if not torch.allclose(lse, rl, rtol=LSE_TOL, atol=LSE_TOL):
            return f"max |lse - lse_ref| = {(lse - rl).abs().nan_to_num(posinf=1e9).max().item():.3g}"
        return None

    def _time_one(self, fn) -> float:
        return self._time_runs(fn, 1)[0]

    def _time_runs(self, fn, n: int) -> List[float]:
        """``n`` calls of ``fn`` queued back to back, each after an L2 flush, between CUDA events."""
        import torch

        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda.synchronize()
        for s, e in ev:
            self._flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]


# --- command line -----------------------------------------------------------------------------

def _versions() -> dict:
    from importlib import metadata

    import torch

    from . import __version__

    meta = {"moba_cute": __version__, "torch": torch.__version__}
    try:
        meta["cutlass_dsl"] = metadata.version("nvidia-cutlass-dsl")
    except metadata.PackageNotFoundError:
        meta["cutlass_dsl"] = None
    return meta


def _list(shapes: List[Shape]) -> None:
    for s in shapes:
        print(f"{s.name}: {s.label()}\n    class {s.shape_class}")
        for fam in (("decode",) if s.decode else [f for f in tuned.FAMILIES if f != "decode"]):
            c = tuned.candidates(fam, s.D, s.C)
            if c:
                print(f"    {fam}: " + " ".join(_fmt_tile(t) for t in c) + "  (built-in first)")


def _summary(results: List[Result], device: str, path: Optional[str]) -> None:
    print(f"\nchosen tiles on {device}" + (f" (written to {path}):" if path else " (not written):"))
    print(f"{'shape':18s} {'family':9s} {'shape class':40s} {'built-in ms':>11s}  {'chosen tile':18s} "
          f"{'ms':>9s}  speedup")
    for r in results:
        if r.chosen is None:
            print(f"{r.shape.name:18s} {r.family or '-':9s} {r.shape.shape_class:40s} {'-':>11s}  "
                  f"{'-':18s} {'-':>9s}  ({r.note})")
            continue
        d, c, sp = r.ms(r.default), r.ms(r.chosen), r.speedup
        print(f"{r.shape.name:18s} {r.family:9s} {r.shape.shape_class:40s} "
              f"{(f'{d:.4f}' if d else 'failed'):>11s}  {_fmt_tile(r.chosen):18s} {c:9.4f}  "
              f"{(f'{sp:.3f}x' if sp else '-')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moba_cute.tune",
                                 description="Time the shipped tiles of the moba_cute forward, routing top-k and "
                                             "decode kernels "
                                             "on this GPU and write the fastest per shape class to the table "
                                             "dispatch reads.")
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated presets (default: all unless --shape is given): {', '.join(PRESETS)}")
    ap.add_argument("--shape", action="append", default=[], metavar="SPEC",
                    help="a custom shape, e.g. B=2,H=16,Hk=16,D=128,C=128,K=8,S=8K[,dtype=float16][,causal=0] "
                         "(repeatable); with new=N a decode step: N queries per sequence, S cached keys")
    ap.add_argument("--out", default=None,
                    help=f"table to update (default: $MOBA_CUTE_TUNE_FILE or {tuned.user_table_path()})")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per candidate per round (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the candidates (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate (default 2)")
    ap.add_argument("--min-gain", type=float, default=0.01,
                    help="a tile replaces the built-in one only if faster by more than this fraction (default 0.01)")
    ap.add_argument("--no-check", action="store_true", help="skip comparing each candidate's output")
    ap.add_argument("--list", action="store_true", help="print the shapes, their classes and candidates; no GPU")
    args = ap.parse_args(argv)

    try:
        names = [n for n in (args.shapes or "").split(",") if n.strip()]
        unknown = [n for n in names if n.strip() not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset(s) {unknown}; presets: {', '.join(PRESETS)}")
        shapes = [PRESETS[n.strip()] for n in names] + [parse_shape(s) for s in args.shape]
        if not names and not args.shape:
            shapes = list(PRESETS.values())
        if args.reps < 1 or args.rounds < 1 or args.warmup < 1 or not 0 <= args.min_gain < 1:
            raise ValueError("--reps, --rounds, --warmup must be >= 1 and 0 <= --min-gain < 1")
    except ValueError as e:
        ap.error(str(e))
    if args.list:
        _list(shapes)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("moba_cute.tune: needs a CUDA GPU (the table is per device)", file=sys.stderr)
        return 2
    from .kernels import attention_launch as al
    from .kernels import common, decode_launch, route_launch

    path = os.path.expanduser(args.out) if args.out else tuned.user_table_path()
    try:  # refuse to overwrite a file that is not a table before spending minutes timing
        existing = tuned.read_table(path)
        if existing:
            tuned.validate_table(existing)
    except (OSError, ValueError) as e:
        print(f"moba_cute.tune: {path} is not a readable tile table ({e}); move it away or pass --out",
              file=sys.stderr)
        return 2
    for var in ("MOBA_CUTE_SM90_TILES", "MOBA_CUTE_FWD_STAGES", "MOBA_CUTE_TUNED", "MOBA_TOPK_TILE"):
        if os.environ.get(var):
            print(f"note: {var}={os.environ[var]} is set: the tuner times the candidates regardless, but at "
                  f"dispatch it still overrides (or disables) the table")
    device = torch.cuda.get_device_name()
    arch = common.arch_of(torch.device("cuda", torch.cuda.current_device()))
    print(f"moba_cute.tune on {device} ({arch}): {len(shapes)} shape(s), {args.rounds} x {args.reps} timed "
          f"calls per candidate, output -> {path}")
    measure = CudaMeasure(args.reps, args.rounds, args.warmup, check=not args.no_check)
    try:
        results = tune(shapes, measure, arch, args.min_gain)
    finally:
        al.FWD_PLANS.clear()
        decode_launch.DECODE_PLANS.clear()
        route_launch.PLANS.clear()
    written = [r for r in results if r.chosen is not None]
    if written:
        # re-read: another tuner may have written the file meanwhile (keep its devices/classes)
        table = update_table(tuned.read_table(path), device, _versions(), results,
                             datetime.date.today().isoformat())
        write_table(path, table)
    _summary(results, device, path if written else None)
    # this process's next plans read the tables again
    tuned.reset()
    al.FWD_PLANS.clear()
    decode_launch.DECODE_PLANS.clear()
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
