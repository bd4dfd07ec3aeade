"""Run a benchmark suite (SPEC section 4) and write the table, JSON and plot.

    python -m benchmarks.run --suite flashmoba|moba-large|varlen-mix|quick \
        [--sizes 8K,16K] [--impls moba_cute,fa2,fa4,flex_moba,reference] [--out benchmarks/results]
    python -m benchmarks.run --suite host [--sizes 8K] [--reps 20]   # host overhead (benchmarks/host.py)

Needs a CUDA GPU. ``--dry-run`` instead runs a tiny version of the suite on the CPU through the
PyTorch reference only (wall-clock timings, meaningless as performance: it checks the pipeline
and the output files). ``--list`` prints the suite's configs and exits.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import os
import platform
import sys
import time
import traceback
import warnings

from . import configs as _configs
from .configs import Config, format_size, parse_sizes, suite_configs
from .results import compute_speedups, format_table, git_commit, make_record, results_path, write_results

ALL_IMPLS = ("moba_cute", "fa2", "fa4", "flex_moba", "reference")
EXIT_NO_CUDA = 2


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, choices=sorted(_configs.SUITES))
    p.add_argument("--sizes", default=None,
                   help="comma-separated sequence lengths to run (e.g. 8K,16K,256K); default: the suite's "
                        "standard sizes (flashmoba: 8K..128K; 256K and 512K on request)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {','.join(ALL_IMPLS)} (moba_cute = every CuTe kernel path "
                        "available on the device); default: all (quick: all but flex_moba, whose compilation "
                        "alone takes longer than the quick suite should)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs per figure (median; default 10, host suite 20; >= 10 for reported runs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs per figure")
    p.add_argument("--ref-max-s", default="8K",
                   help="run the PyTorch reference only where the longest sequence is at most this (default 8K)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; once spent, the remaining (config, impl) pairs are recorded as skipped")
    p.add_argument("--route-backend", default="auto", choices=("auto", "cute", "reference"),
                   help="moba_cute.route backend used for flex_moba's mask and for counting attended pairs "
                        "(default auto: the CuTe routing kernel where there is one)")
    p.add_argument("--merge", action="store_true",
                   help="keep the records of an existing results file of the same suite/device/date, replacing "
                        "those measured again (same config and impl)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: a tiny version of the suite through the reference (checks the pipeline)")
    p.add_argument("--list", action="store_true", help="print the suite's configs and exit")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 20 if args.suite == "host" else 10
    if args.impls is None:
        args.impls = ",".join(i for i in ALL_IMPLS if not (args.suite == "quick" and i == "flex_moba"))
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in ALL_IMPLS]
    if bad:
        p.error(f"unknown impl(s) {bad}; choose from {ALL_IMPLS}")
    args.impls = impls
    try:
        args.sizes = parse_sizes(args.sizes)
        args.ref_max_s = _configs.parse_size(args.ref_max_s)
    except ValueError as e:
        p.error(str(e))
    if args.reps < 1 or args.warmup < 1:
        p.error("--reps and --warmup must be >= 1")
    return args


def dry_configs(suite: str) -> list[Config]:
    """Tiny CPU stand-ins for a suite's configs (same suite name; shapes shrunk)."""
    if suite == "varlen-mix":
        lens = (100, 257, 64, 600, 17)
        return [Config(suite, B=len(lens), H=2, Hk=2, D=32, C=64, K=3, S=sum(lens), seqlens=lens)]
    hk = 1 if suite == "moba-large" else 2
    return [Config(suite, B=2, H=2, Hk=hk, D=32, C=64, K=3, S=s) for s in (256, 512)]


def _versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    dsl = None
    for dist in ("nvidia-cutlass-dsl",):
        try:
            dsl = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if dsl is None:
        try:
            import cutlass

            dsl = getattr(cutlass, "__version__", None) or "unknown version"
        except Exception:
            dsl = "not installed"
    out["cutlass_dsl"] = dsl
    return out


def _short(exc: BaseException, n: int = 240) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:n]}"


def suite_meta(args, device: str) -> tuple[str, dict, dict]:
    """(device name, kernel paths, results-file metadata) of a run: the SPEC top-level keys plus the
    documented extras (the host suite replaces ``timing`` with its own method)."""
    import torch

    from .moba import kernel_paths

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        hw = {"sm": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
              "l2_bytes": getattr(props, "L2_cache_size", None), "mem_bytes": props.total_memory}
        paths = kernel_paths()
    else:
        name = f"cpu-dry-run ({platform.processor() or platform.machine()})"
        hw = {}
        paths = {"route": None, "attention": None, "attention_backward": None}
    meta = {"device": name, **_versions(), "commit": git_commit(),
            "suite": args.suite, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "kernel_paths": paths, "hardware": hw,
            "timing": {"reps": args.reps, "warmup": args.warmup, "statistic": "median",
                       "method": "CUDA events, L2 flushed before each run" if device == "cuda"
                       else "wall clock (CPU dry run: not a performance figure)"}}
    if device == "cuda":
        from .baselines import fa4_version

        meta["flash_attn_4"] = fa4_version()
    else:
        meta["dry_run"] = True
    return name, paths, meta


def output_path(args, device: str, device_name: str) -> str:
    """``<out>/<suite>_<device-slug>_<date>.json`` (dry runs: device ``cpu-dry-run``)."""
    return results_path(args.out, args.suite, "cpu-dry-run" if device == "cpu" else device_name)


class Bench:
    def __init__(self, args, device: str):
        from .timing import Timer

        self.args = args
        self.device = device
        self.t0 = time.monotonic()
        self.timer = Timer(device, reps=args.reps, warmup=args.warmup)
        self.records: list[dict] = []
        self.kept: list[dict] = []  # records of an earlier file kept by --merge
        self.device_name, self.kernel_paths, self.meta = suite_meta(args, device)
        self.path = output_path(args, device, self.device_name)
        if args.merge and os.path.exists(self.path):
            from .results import load_results

            try:
                self.kept = load_results(self.path)["records"]
                print(f"--merge: keeping {len(self.kept)} record(s) of {self.path}", flush=True)
            except (OSError, ValueError) as e:
                print(f"--merge: cannot read {self.path} ({e}); starting afresh", file=sys.stderr)

    # ---------------------------------------------------------------------------------------
    def budget_left(self) -> bool:
        b = self.args.time_budget
        return b is None or (time.monotonic() - self.t0) < b

    def all_records(self) -> list[dict]:
        from .results import IMPLS, record_key

        new = {record_key(r) for r in self.records}
        recs = [r for r in self.kept if record_key(r) not in new] + self.records
        order = {name: i for i, name in enumerate(IMPLS)}
        return sorted(recs, key=lambda r: (r["C"], r["K"], r["S"], order.get(r["impl"], 99)))

    def save(self):
        recs = self.all_records()
        compute_speedups(recs)
        write_results(self.path, self.meta, recs)

    def add(self, rec):
        self.records.append(rec)
        self.save()
        r = rec
        print(f"  {r['impl']:<15} routing={_f(r['routing_ms'])} fwd={_f(r['fwd_ms'])} fwdbwd={_f(r['fwdbwd_ms'])} "
              f"mem={_f(r.get('peak_fwd_gb'))}/{_f(r['peak_mem_gb'])}GB "
              f"TF={_f(r['eff_tflops_fwd'])}/{_f(r['eff_tflops_fwdbwd'])}"
              + (f"  note: {r['note']}" if r["note"] else ""), flush=True)

    def measure(self, fn, what: str, notes: list):
        from .timing import free_memory, is_oom

        err = None
        try:
            t = self.timer.time(fn)
            if t.note:
                notes.append(f"{what}: {t.note}")
            return t.median_ms, t.reps
        except Exception as e:  # noqa: BLE001 - any failure is recorded, never fatal
            err = "out of memory" if is_oom(e) else _short(e)
            if not is_oom(e) and os.environ.get("MOBA_BENCH_DEBUG"):
                traceback.print_exc()
        free_memory()
        notes.append(f"{what}: {err}")
        return None, None

    # ---------------------------------------------------------------------------------------
    def pairs_for(self, cfg, inp, notes):
        """(moba_pairs, dense_pairs, selection-or-None) for cfg."""
        from .flops import dense_pairs, moba_causal_pairs, moba_pairs_from_selection
        from .moba import import_moba
        from .timing import free_memory

        lens = cfg.lengths()
        dense = dense_pairs(lens, lens, cfg.H, cfg.causal)
        analytic = moba_causal_pairs(lens, lens, cfg.H, cfg.C, cfg.K) if cfg.causal else None
        sel = None
        try:
            mc = import_moba()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sel = mc.route(inp.q.detach(), inp.k.detach(), inp.cu_seqlens, inp.cu_seqlens, inp.max_seqlen,
                               inp.max_seqlen, cfg.C, cfg.K, cfg.causal, backend=self.args.route_backend).selection
            moba = moba_pairs_from_selection(sel, inp.cu_seqlens, inp.cu_seqlens, cfg.C, cfg.causal)
            if analytic is not None and moba != analytic:
                notes.append(f"pairs from the selection ({moba}) differ from the closed form ({analytic})")
        except Exception as e:  # noqa: BLE001
            sel = None
            free_memory()
            moba = analytic
            notes.append(f"pairs: closed form (routing failed: {_short(e, 120)})")
        return moba, dense, sel

    def run_config(self, cfg: Config):
        import torch

        from .common import Unsupported, make_inputs, no_grad_fn
        from .flops import fwd_flops, fwdbwd_flops, tflops
        from .moba import cute_impl_name
        from .timing import free_memory, is_oom

        print(f"\n[{cfg.suite}] {cfg.label()}", flush=True)
        impls = list(self.args.impls)
        if self.device == "cpu":
            impls = [i for i in impls if i == "reference"]
        if "reference" in impls and cfg.max_seqlen > self.args.ref_max_s:
            impls.remove("reference")
        cute_name = cute_impl_name(self.kernel_paths)
        if "moba_cute" in impls and cute_name is None:
            print("  moba_cute: no CuTe kernel path on this device (kernel_paths() = "
                  f"{self.kernel_paths}): not recorded", flush=True)
            impls.remove("moba_cute")
        impl_name = {"moba_cute": cute_name}

        def null_records(note):
            for i in impls:
                self.add(make_record(cfg, impl_name.get(i, i), note=note))

        if not self.budget_left():
            null_records(f"skipped: time budget of {self.args.time_budget:.0f} s spent")
            return
        try:
            inp = make_inputs(cfg, self.device)
        except Exception as e:  # noqa: BLE001
            msg = "out of memory" if is_oom(e) else _short(e)
            free_memory()
            null_records(f"inputs: {msg}")
            return
        cfg_notes: list = []
        moba_pairs, dense, sel = self.pairs_for(cfg, inp, cfg_notes)
        sparsity = moba_pairs / dense if moba_pairs is not None and dense else None
        del sel
        for impl in impls:
            name = impl_name.get(impl, impl)
            if not self.budget_left():
                self.add(make_record(cfg, name, note=f"skipped: time budget of {self.args.time_budget:.0f} s spent"))
                continue
            notes = list(cfg_notes) if impl != "fa2" and impl != "fa4" else []
            is_moba = impl not in ("fa2", "fa4")
            pairs = moba_pairs if is_moba else dense
            figs: dict = {}
            runner = None
            reps = []
            try:
                runner = self.make_runner(impl, inp)
                notes.extend(runner.notes)
                if runner.route is not None:
                    figs["routing_ms"], n = self.measure(runner.route, "routing", notes)
                    reps.append(n)
                for key, fn in runner.parts.items():
                    figs[key], n = self.measure(fn, key[:-3], notes)
                    reps.append(n)
                oom_fwd = False
                if runner.fwd is not None:
                    figs["fwd_ms"], n = self.measure(runner.fwd, "fwd", notes)
                    reps.append(n)
                    oom_fwd = figs["fwd_ms"] is None and "fwd: out of memory" in notes
                if runner.fwdbwd is not None:
                    if oom_fwd:
                        notes.append("fwdbwd: not run (fwd out of memory)")
                    else:
                        figs["fwdbwd_ms"], n = self.measure(runner.fwdbwd, "fwdbwd", notes)
                        reps.append(n)
                if runner.combine is not None:
                    figs.update(runner.combine(figs))
                peak_fn = runner.peak or runner.fwdbwd or runner.fwd or runner.route
                if peak_fn is not None and self.device == "cuda" and any(v is not None for v in figs.values()):
                    try:
                        figs["peak_mem_gb"] = self.timer.peak_memory_gb(peak_fn)
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"peak memory: {'out of memory' if is_oom(e) else _short(e)}")
                        free_memory()
                # the inference forward's peak (no autograd state kept), what prefill needs
                if runner.fwd is not None and self.device == "cuda" and figs.get("fwd_ms") is not None:
                    try:
                        figs["peak_fwd_gb"] = self.timer.peak_memory_gb(no_grad_fn(runner.fwd))
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"forward peak memory: {'out of memory' if is_oom(e) else _short(e)}")
                        free_memory()
            except Unsupported as e:
                notes.append(f"unsupported: {e}")
            except Exception as e:  # noqa: BLE001
                notes.append("out of memory" if is_oom(e) else f"error: {_short(e)}")
                if os.environ.get("MOBA_BENCH_DEBUG"):
                    traceback.print_exc()
            finally:
                if runner is not None and runner.cleanup is not None:
                    runner.cleanup()
                runner = None
                free_memory()
            ff = fwd_flops(pairs, cfg.D) if pairs is not None else None
            fb = fwdbwd_flops(pairs, cfg.D) if pairs is not None else None
            r_reps = [x for x in reps if x]
            rec = make_record(
                cfg, name,
                routing_ms=figs.get("routing_ms"), fwd_ms=figs.get("fwd_ms"), fwdbwd_ms=figs.get("fwdbwd_ms"),
                peak_mem_gb=figs.get("peak_mem_gb"), peak_fwd_gb=figs.get("peak_fwd_gb"),
                eff_tflops_fwd=tflops(ff, figs.get("fwd_ms")), eff_tflops_fwdbwd=tflops(fb, figs.get("fwdbwd_ms")),
                note="; ".join(notes),
                sparsity=(sparsity if is_moba else 1.0), attended_pairs=pairs,
                reps=min(r_reps) if r_reps else None,
                **{k: figs.get(k) for k in ("mask_ms", "attn_fwd_ms", "attn_fwdbwd_ms") if impl == "flex_moba"},
            )
            self.add(rec)
        del inp
        free_memory()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def make_runner(self, impl: str, inp):
        from .common import Unsupported

        if impl == "fa2":
            from .baselines import fa2_runner

            return fa2_runner(inp)
        if impl == "fa4":
            from .baselines import fa4_runner

            return fa4_runner(inp)
        if impl == "reference":
            from .moba import moba_runner

            return moba_runner(inp, "reference")
        if impl == "moba_cute":
            from .moba import moba_runner

            return moba_runner(inp, "cute", self.kernel_paths)
        if impl == "flex_moba":
            from .flex_moba import flex_runner
            from .moba import import_moba

            mc = import_moba()
            cfg = inp.cfg
            backend = self.args.route_backend
            if backend == "auto":
                backend = "cute" if self.kernel_paths.get("route") else "reference"
            desc = f"CuTe {self.kernel_paths['route']} kernel" if backend == "cute" else "PyTorch reference"
            qd, kd, cu, m = inp.q.detach(), inp.k.detach(), inp.cu_seqlens, inp.max_seqlen

            def route_fn():
                return mc.route(qd, kd, cu, cu, m, m, cfg.C, cfg.K, cfg.causal, backend=backend).selection

            return flex_runner(inp, route_fn, desc)
        raise Unsupported(f"unknown impl {impl}")

    def finish(self):
        self.save()
        print()
        print(format_table(self.all_records(), self.device_name))
        print(f"\nresults: {self.path}")
        if not self.args.no_plot:
            from .plot import plot_file

            png = plot_file(self.path)
            if png:
                print(f"plot: {png}")


def _f(x):
    return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def main(argv=None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        cfgs = dry_configs(args.suite) if args.dry_run else suite_configs(args.suite, args.sizes)
        for c in cfgs:
            print(f"{c.suite}: {c.label()}")
        return 0
    try:
        import torch
    except ImportError:
        print("error: PyTorch is not installed", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.dry_run:
        device = "cpu"
        cfgs = dry_configs(args.suite)
        if args.sizes:
            cfgs = [c for c in cfgs if c.S in set(args.sizes)] or cfgs
        print("dry run on the CPU: tiny shapes through the PyTorch reference only; timings are wall clock and "
              "say nothing about GPU performance", flush=True)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device is available: the benchmarks need an NVIDIA GPU (see "
                  "docs/benchmarks.md). Use --dry-run to check the pipeline on the CPU.", file=sys.stderr)
            return EXIT_NO_CUDA
        device = "cuda"
        try:
            cfgs = suite_configs(args.suite, args.sizes)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.suite == "host":  # measures other figures than the timing suites: its own module
        from .host import run_host

        return run_host(args, device, cfgs)
    bench = Bench(args, device)
    print(f"suite {args.suite} on {bench.device_name}: {len(cfgs)} config(s), impls {','.join(args.impls)}; "
          f"kernel_paths={bench.kernel_paths}", flush=True)
    try:
        for cfg in cfgs:
            bench.run_config(cfg)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
    bench.finish()
    print(f"done in {time.monotonic() - bench.t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
