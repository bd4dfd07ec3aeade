"""Plot a results JSON: time and speedup vs sequence length per implementation.

    python -m benchmarks.plot benchmarks/results/flashmoba_<device>_<date>.json [...]

Writes the PNG next to the JSON (same name, .png). matplotlib is imported lazily; without it
the plot is skipped with a message (the JSON is the primary output).
"""

from __future__ import annotations

import os
import sys

from .results import load_results

__all__ = ["plot_file", "series"]

_STYLE = {"fa2": ("tab:gray", "s"), "fa4": ("black", "D"), "flex_moba": ("tab:orange", "^"),
          "reference": ("tab:green", "v"), "moba_cute.sm90": ("tab:blue", "o"), "moba_cute.sm80": ("tab:purple", "o")}


def series(records: list[dict]) -> dict:
    """Group records into plot lines: {label: [(S, record), ...]} sorted by S. One line per
    impl, and per (C, K) when a suite has several settings."""
    settings = {(r["C"], r["K"]) for r in records}
    out: dict = {}
    for r in records:
        label = r["impl"] if len(settings) == 1 else f"{r['impl']} C={r['C']} K={r['K']}"
        out.setdefault(label, []).append((r["S"], r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}


def plot_file(path: str, out_png: str | None = None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib; then "
              f"python -m benchmarks.plot {path})", file=sys.stderr)
        return None
    doc = load_results(path)
    recs = doc["records"]
    if not recs:
        return None
    from .configs import format_size

    lines = series(recs)
    fig, grid = plt.subplots(2, 2, figsize=(14, 10))
    axes = [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]
    panels = [("fwdbwd_ms", "forward+backward time (ms)"), ("fwd_ms", "forward time (ms, routing included)"),
              ("routing_ms", "routing time (ms)")]
    for ax, (key, title) in zip(axes[:3], panels):
        for label, pts in lines.items():
            xs = [s for s, r in pts if r.get(key) is not None]
            ys = [r[key] for s, r in pts if r.get(key) is not None]
            if not xs:
                continue
            color, marker = _STYLE.get(pts[0][1]["impl"], (None, "o"))
            ax.plot(xs, ys, marker=marker, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("sequence length S (tokens; varlen: total)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax = axes[3]
    any_sp = False
    for label, pts in lines.items():
        for fig_key, ls in (("fwdbwd", "-"), ("fwd", "--")):
            xs, ys = [], []
            for s, r in pts:
                v = ((r.get("speedup") or {}).get("fa2") or {}).get(fig_key)
                if v is not None:
                    xs.append(s)
                    ys.append(v)
            if xs:
                any_sp = True
                color, marker = _STYLE.get(pts[0][1]["impl"], (None, "o"))
                ax.plot(xs, ys, ls, marker=marker, color=color, label=f"{label} ({fig_key})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    if any_sp:
        ax.set_yscale("log")
    ax.set_title("speedup over dense FA2 (solid: fwd+bwd, dashed: fwd; >1 = faster)")
    ax.set_xlabel("sequence length S")
    ax.grid(True, which="both", alpha=0.3)
    if any_sp:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no speedup data", ha="center", va="center", transform=ax.transAxes)
    all_s = sorted({r["S"] for r in recs})
    for a in axes:
        a.set_xticks(all_s)
        a.set_xticklabels([format_size(s) for s in all_s], fontsize=8)
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    suite = recs[0]["suite"]
    fig.suptitle(f"moba_cute benchmark '{suite}' on {doc['device']} (commit {str(doc['commit'])[:10]})")
    fig.tight_layout()
    out_png = out_png or os.path.splitext(path)[0] + ".png"
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m benchmarks.plot RESULTS.json [...]", file=sys.stderr)
        return 2
    for p in paths:
        png = plot_file(p)
        if png:
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
