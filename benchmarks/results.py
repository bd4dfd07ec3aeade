"""Result records, the JSON results file (SPEC section 4 schema), speedups and the table.

Record schema (SPEC section 4), in this order::

    suite impl B H Hk D C K S dtype causal routing_ms fwd_ms fwdbwd_ms peak_mem_gb
    eff_tflops_fwd eff_tflops_fwdbwd note

Additional record keys (documented in docs/benchmarks.md; all optional, null when unknown):
``sparsity``, ``attended_pairs``, ``reps``, ``speedup``, ``seqlens`` (varlen only),
``peak_fwd_gb`` (the inference forward's peak), ``mask_ms``, ``attn_fwd_ms``, ``attn_fwdbwd_ms``
(flex_moba only).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import subprocess

__all__ = [
    "RECORD_KEYS",
    "EXTRA_KEYS",
    "IMPLS",
    "BASELINES",
    "make_record",
    "record_key",
    "normalize_record",
    "compute_speedups",
    "write_results",
    "load_results",
    "results_path",
    "device_slug",
    "git_commit",
    "format_table",
]

RECORD_KEYS = (
    "suite", "impl", "B", "H", "Hk", "D", "C", "K", "S", "dtype", "causal",
    "routing_ms", "fwd_ms", "fwdbwd_ms", "peak_mem_gb", "eff_tflops_fwd", "eff_tflops_fwdbwd", "note",
)
EXTRA_KEYS = (
    "sparsity", "attended_pairs", "reps", "speedup", "seqlens", "peak_fwd_gb", "mask_ms", "attn_fwd_ms",
    "attn_fwdbwd_ms",
)
TOP_KEYS = ("device", "torch", "cutlass_dsl", "commit", "records")
IMPLS = ("moba_cute.sm90", "moba_cute.sm80", "reference", "fa2", "fa4", "flex_moba")
#: what a speedup is computed against (baseline_ms / impl_ms)
BASELINES = ("fa2", "fa4", "flex_moba", "reference")
_MOBA_IMPLS = ("moba_cute.sm90", "moba_cute.sm80", "reference", "flex_moba")


def make_record(cfg, impl: str, **figures) -> dict:
    """A record for ``cfg`` (a :class:`benchmarks.configs.Config`) and ``impl``; figures not
    given are null."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    rec = {
        "suite": cfg.suite, "impl": impl, "B": cfg.B, "H": cfg.H, "Hk": cfg.Hk, "D": cfg.D, "C": cfg.C,
        "K": cfg.K, "S": cfg.S, "dtype": cfg.dtype, "causal": cfg.causal,
    }
    for k in RECORD_KEYS[11:]:
        rec[k] = figures.pop(k, None)
    for k in list(figures):
        if k not in EXTRA_KEYS:
            raise ValueError(f"unknown record key {k!r}: add it to EXTRA_KEYS and document it")
    rec.update(figures)
    if cfg.varlen and "seqlens" not in rec:
        rec["seqlens"] = list(cfg.lengths())
    return normalize_record(rec)


def _clean(x):
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def normalize_keys(rec: dict, keys, extra=(), kind: str = "") -> dict:
    """``keys`` in order (missing ones null), then those of ``extra`` that ``rec`` has; NaN/inf
    become null; the note is a string ("" when there is nothing to say); a key in neither list
    is an error (``kind`` names the record type in it)."""
    unknown = set(rec) - set(keys) - set(extra)
    if unknown:
        raise ValueError(f"unknown {kind + ' ' if kind else ''}record keys {sorted(unknown)}")
    out = {k: _clean(rec.get(k)) for k in keys}
    if out.get("note", "") is None:
        out["note"] = ""
    for k in extra:
        if k in rec:
            out[k] = _clean(rec[k])
    return out


def normalize_record(rec: dict) -> dict:
    """A suite record: SPEC keys first, then the known extras (:func:`normalize_keys`)."""
    return normalize_keys(rec, RECORD_KEYS, EXTRA_KEYS)


def _config_key(rec: dict) -> tuple:
    return tuple(rec[k] for k in ("suite", "B", "H", "Hk", "D", "C", "K", "S", "dtype", "causal"))


def record_key(rec: dict) -> tuple:
    """What identifies a measurement: the config and the impl."""
    return _config_key(rec) + (rec["impl"],)


def compute_speedups(records: list[dict]) -> list[dict]:
    """Set ``speedup`` on every MoBA record (moba_cute.*, reference, flex_moba):
    ``{baseline: {"fwd": x, "fwdbwd": x}}`` with x = baseline_ms / impl_ms over the baselines
    (fa2, fa4, flex_moba, reference) measured on the same config; null where either is missing."""
    by_cfg: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_cfg.setdefault(_config_key(r), {})[r["impl"]] = r
    for r in records:
        if r["impl"] not in _MOBA_IMPLS:
            continue
        sp = {}
        for base, b in by_cfg[_config_key(r)].items():
            if base == r["impl"] or base not in BASELINES:
                continue
            entry = {}
            for fig in ("fwd", "fwdbwd"):
                num, den = b.get(f"{fig}_ms"), r.get(f"{fig}_ms")
                entry[fig] = round(num / den, 4) if num and den else None
            sp[base] = entry
        r["speedup"] = sp
    return records


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-device"


def results_path(out_dir: str, suite: str, device_name: str, date: _dt.date | None = None) -> str:
    date = date or _dt.datetime.now(_dt.timezone.utc).date()
    return os.path.join(out_dir, f"{suite}_{device_slug(device_name)}_{date.strftime('%Y%m%d')}.json")


def git_commit(repo_dir: str | None = None) -> str:
    """``git rev-parse HEAD`` of the repository (``MOBA_COMMIT`` overrides), else "unknown"."""
    env = os.environ.get("MOBA_COMMIT")
    if env:
        return env
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"


def write_results(path: str, meta: dict, records: list[dict], normalize=normalize_record) -> str:
    """Write ``{"device", "torch", "cutlass_dsl", "commit", "records", ...extra meta}`` to
    ``path`` atomically (write then rename), so a run killed midway leaves a valid file.
    ``normalize`` orders and checks each record (the host suite passes its own schema's)."""
    for k in TOP_KEYS[:-1]:
        if k not in meta:
            raise ValueError(f"results metadata lacks {k!r}")
    doc = {k: meta[k] for k in TOP_KEYS[:-1]}
    doc["records"] = [normalize(r) for r in records]
    for k, v in meta.items():
        if k not in doc:
            doc[k] = _clean(v)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_results(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    for k in TOP_KEYS:
        if k not in doc:
            raise ValueError(f"{path}: not a results file (no {k!r})")
    return doc


def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        return f"{x:.{nd}f}"
    return str(x)


def _fmt_sp(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def align_columns(cols: list[str], rows: list[list[str]]) -> list[str]:
    """The header and the rows as lines of right-aligned columns, each as wide as its widest cell."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    return ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [cols, *rows]]


def format_table(records: list[dict], device: str = "") -> str:
    """A plain-text table of the records (one line each, notes below)."""
    from .configs import format_size

    cols = ["impl", "C", "K", "S", "route", "fwd", "f+b", "memGB", "TF fwd", "TF f+b", "spars",
            "xFA2 f/fb", "xFA4 f/fb", "n"]
    rows = []
    notes = []
    for r in records:
        sp = r.get("speedup") or {}

        def spd(base):
            e = sp.get(base) or {}
            if not e or (e.get("fwd") is None and e.get("fwdbwd") is None):
                return "-"
            return f"{_fmt_sp(e.get('fwd'))}/{_fmt_sp(e.get('fwdbwd'))}"

        n = ""
        if r.get("note"):
            notes.append(r["note"])
            n = f"[{len(notes)}]"
        rows.append([
            r["impl"], str(r["C"]), str(r["K"]), format_size(r["S"]) + ("*" if r.get("seqlens") else ""),
            _fmt(r["routing_ms"]), _fmt(r["fwd_ms"]), _fmt(r["fwdbwd_ms"]), _fmt(r["peak_mem_gb"]),
            _fmt(r["eff_tflops_fwd"], 1), _fmt(r["eff_tflops_fwdbwd"], 1),
            _fmt(r.get("sparsity"), 3), spd("fa2"), spd("fa4"), n,
        ])
    lines = []
    if device:
        lines.append(f"device: {device}   (times in ms, median; TF = effective TFLOP/s; "
                     "xFA2/xFA4 = speedup fwd/f+b)")
    lines += align_columns(cols, rows)
    if any(r.get("seqlens") for r in records):
        lines.append("* varlen batch: S is the total number of tokens")
    for i, note in enumerate(notes, 1):
        lines.append(f"[{i}] {note}")
    return "\n".join(lines)
