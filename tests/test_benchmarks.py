"""CPU tests of the benchmark suite (benchmarks/): configs, pair/FLOP counting, the results
schema, the FlexAttention MoBA mask, and the CLI's behaviour without CUDA. No GPU needed."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import configs, flops, results  # noqa: E402
from benchmarks.configs import Config, parse_size, parse_sizes, suite_configs, varlen_mix_lengths  # noqa: E402

K_ = 1024


# ------------------------------------------------------------------------------------------
# brute force


def brute_pairs(selection, lens_q, lens_k, C, causal):
    """Count attended pairs by building each query's key mask explicitly."""
    total = 0
    row = 0
    for sq, sk in zip(lens_q, lens_k):
        keys = torch.arange(sk)
        for i in range(sq):
            p = i + sk - sq
            for h in range(selection.shape[1]):
                m = torch.zeros(sk, dtype=torch.bool)
                for j in selection[row + i, h].tolist():
                    if j >= 0:
                        m |= (keys // C) == j
                if causal:
                    m &= keys <= p
                total += int(m.sum())
        row += sq
    return total


def brute_dense(lens_q, lens_k, H, causal):
    total = 0
    for sq, sk in zip(lens_q, lens_k):
        for i in range(sq):
            p = i + sk - sq
            total += (min(max(p + 1, 0), sk) if causal else sk)
    return total * H


def random_selection(lens_q, lens_k, H, C, K, causal, seed=0):
    """A valid MoBA selection (SPEC 1.4/1.5) with random scores: own chunk first (causal),
    then distinct other chunks; -1 pads."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sq, sk in zip(lens_q, lens_k):
        n = -(-sk // C)
        for i in range(sq):
            p = i + sk - sq
            per_h = []
            for _ in range(H):
                if causal:
                    if p < 0:
                        picks = []
                    else:
                        own = p // C
                        past = torch.randperm(own, generator=g)[: K - 1].tolist() if own else []
                        picks = [own] + past
                else:
                    picks = torch.randperm(n, generator=g)[:K].tolist() if n else []
                per_h.append(picks + [-1] * (K - len(picks)))
            rows.append(per_h)
    return torch.tensor(rows, dtype=torch.int32).view(sum(lens_q), H, K)


def cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


CASES = [
    # lens_q, lens_k, C, K
    ([17], [17], 4, 2),
    ([113, 1, 40], [113, 1, 40], 16, 3),
    ([30, 7], [50, 7], 8, 4),  # Sq != Sk (bottom-right)
    ([9], [5], 4, 2),  # Sq > Sk: some rows empty
    ([64, 33], [64, 33], 16, 1),  # K = 1
    ([40], [40], 16, 10),  # K >= number of chunks
]


# ------------------------------------------------------------------------------------------
# pairs and FLOPs


@pytest.mark.parametrize("lens_q,lens_k,C,K", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_pairs_from_selection_matches_brute_force(lens_q, lens_k, C, K, causal):
    H = 2
    sel = random_selection(lens_q, lens_k, H, C, K, causal, seed=len(lens_q) + C)
    got = flops.moba_pairs_from_selection(sel, cu(lens_q), cu(lens_k), C, causal, rows_per_step=7)
    assert got == brute_pairs(sel, lens_q, lens_k, C, causal)


@pytest.mark.parametrize("lens_q,lens_k,C,K", CASES)
def test_causal_closed_form_matches_brute_force(lens_q, lens_k, C, K):
    H = 3
    sel = random_selection(lens_q, lens_k, H, C, K, True, seed=1)
    assert flops.moba_causal_pairs(lens_q, lens_k, H, C, K) == brute_pairs(sel, lens_q, lens_k, C, True)


@pytest.mark.parametrize("lens_q,lens_k", [([17], [17]), ([30, 7], [50, 7]), ([9], [5]), ([1, 4097], [1, 4097])])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_pairs(lens_q, lens_k, causal):
    assert flops.dense_pairs(lens_q, lens_k, 2, causal) == brute_dense(lens_q, lens_k, 2, causal)


def test_dense_causal_closed_form_and_flops():
    S, H, D = 8 * K_, 16, 128
    assert flops.dense_pairs([S], [S], H) == H * S * (S + 1) // 2
    pairs = flops.dense_pairs([S, S], [S, S], H)
    assert flops.fwd_flops(pairs, D) == 4 * D * pairs
    assert flops.fwdbwd_flops(pairs, D) == pytest.approx(3.5 * 4 * D * pairs)
    assert flops.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert flops.tflops(None, 1.0) is None and flops.tflops(1.0, None) is None


def test_flashmoba_sparsity_closed_form():
    # C=128, K=8: a query attends at most 8 chunks = 1024 keys; at 64K that is ~1/32 of dense.
    S = 64 * K_
    moba = flops.moba_causal_pairs([S], [S], 1, 128, 8)
    dense = flops.dense_pairs([S], [S], 1)
    assert moba <= S * 8 * 128
    assert 0.02 < moba / dense < 0.04


def test_pairs_from_reference_routing():
    moba_cute = pytest.importorskip("moba_cute")
    lens = [300, 129, 5]
    H, Hk, D, C, K = 4, 2, 16, 32, 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens), H, D, generator=g)
    k = torch.randn(sum(lens), Hk, D, generator=g)
    c = cu(lens)
    sel = moba_cute.route(q, k, c, c, max(lens), max(lens), C, K, True, backend="reference").selection
    got = flops.moba_pairs_from_selection(sel, c, c, C, True)
    assert got == brute_pairs(sel, lens, lens, C, True) == flops.moba_causal_pairs(lens, lens, H, C, K)


# ------------------------------------------------------------------------------------------
# configs


def test_parse_sizes():
    assert parse_size("8K") == 8192 and parse_size("1m") == 1 << 20 and parse_size("4097") == 4097
    assert parse_sizes("8K,16K 32k") == [8192, 16384, 32768]
    assert parse_sizes(None) is None and parse_sizes("") is None
    for bad in ("x", "0", "-4K", "8G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_flashmoba_table():
    cfgs = configs.SUITES["flashmoba"]
    assert [c.S for c in cfgs] == [s * K_ for s in (8, 16, 32, 64, 128, 256, 512)]
    for c in cfgs:
        assert (c.B, c.H, c.Hk, c.D, c.C, c.K, c.dtype, c.causal) == (2, 16, 16, 128, 128, 8, "bfloat16", True)
    # default run: 8K..128K; 256K/512K on request
    assert [c.S for c in suite_configs("flashmoba")] == [s * K_ for s in (8, 16, 32, 64, 128)]
    assert [c.S for c in suite_configs("flashmoba", [512 * K_])] == [512 * K_]
    with pytest.raises(ValueError, match="no size"):
        suite_configs("flashmoba", [1000])
    with pytest.raises(ValueError, match="unknown suite"):
        suite_configs("nope")


def test_moba_large_table():
    cfgs = suite_configs("moba-large")
    big = [c for c in cfgs if c.C == 4096]
    small = [c for c in cfgs if c.C == 512]
    assert [c.S for c in big] == [128 * K_, 256 * K_, 512 * K_] and all(c.K == 12 for c in big)
    assert [c.S for c in small] == [8 * K_, 16 * K_, 32 * K_, 64 * K_] and all(c.K == 3 for c in small)
    for c in cfgs:
        assert (c.B, c.H, c.Hk, c.D, c.dtype, c.causal) == (1, 32, 8, 128, "bfloat16", True)


def test_varlen_mix_table():
    (c,) = suite_configs("varlen-mix")
    lens = c.lengths()
    assert len(lens) == 64 == c.B
    assert sum(lens) == 256 * K_ == c.S == c.total_tokens
    assert min(lens) == 512 and max(lens) == 32 * K_ == c.max_seqlen
    assert (c.H, c.Hk, c.D, c.C, c.K) == (16, 16, 128, 128, 8) and c.varlen
    assert varlen_mix_lengths() == lens  # deterministic
    assert len(set(lens)) > 32  # really mixed


def test_quick_table():
    cfgs = suite_configs("quick")
    assert [c.S for c in cfgs] == [8 * K_, 16 * K_]
    for c in cfgs:
        assert (c.B, c.H, c.Hk, c.D, c.C, c.K) == (2, 16, 16, 128, 128, 8)


# ------------------------------------------------------------------------------------------
# results schema


SPEC_KEYS = ["suite", "impl", "B", "H", "Hk", "D", "C", "K", "S", "dtype", "causal", "routing_ms", "fwd_ms",
             "fwdbwd_ms", "peak_mem_gb", "eff_tflops_fwd", "eff_tflops_fwdbwd", "note"]


def test_record_schema_and_json(tmp_path):
    cfg = suite_configs("quick")[0]
    recs = [
        results.make_record(cfg, "fa2", fwd_ms=2.0, fwdbwd_ms=8.0, peak_mem_gb=1.5, peak_fwd_gb=0.9,
                            eff_tflops_fwd=float("nan")),
        results.make_record(cfg, "reference", routing_ms=0.5, fwd_ms=4.0, fwdbwd_ms=4.0, sparsity=0.1),
        results.make_record(cfg, "fa4", note="unsupported: flash_attn.cute not importable"),
        results.make_record(cfg, "moba_cute.sm90", routing_ms=0.3, note="no CuTe attention kernel yet"),
    ]
    results.compute_speedups(recs)
    assert list(recs[0])[: len(SPEC_KEYS)] == SPEC_KEYS
    assert recs[1]["speedup"]["fa2"] == {"fwd": 0.5, "fwdbwd": 2.0}
    assert recs[1]["speedup"]["fa4"] == {"fwd": None, "fwdbwd": None}
    assert recs[3]["speedup"]["reference"] == {"fwd": None, "fwdbwd": None}
    assert "speedup" not in recs[0]  # dense baselines get none
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "cutlass_dsl": "4.8.1", "commit": "unknown",
            "suite": "quick"}
    path = results.results_path(str(tmp_path), "quick", meta["device"])
    assert os.path.basename(path).startswith("quick_nvidia-h100-80gb-hbm3_") and path.endswith(".json")
    assert len(os.path.basename(path).split("_")[-1]) == len("20250101.json")
    results.write_results(path, meta, recs)
    text = open(path).read()
    assert "NaN" not in text
    doc = json.loads(text)
    assert list(doc)[:5] == ["device", "torch", "cutlass_dsl", "commit", "records"]
    assert doc["suite"] == "quick"
    for r in doc["records"]:
        assert list(r)[: len(SPEC_KEYS)] == SPEC_KEYS
        assert r["impl"] in results.IMPLS
        assert isinstance(r["note"], str)
        assert set(r) - set(SPEC_KEYS) <= set(results.EXTRA_KEYS)
    assert doc["records"][0]["eff_tflops_fwd"] is None  # NaN -> null
    assert doc["records"][2]["fwd_ms"] is None and "not importable" in doc["records"][2]["note"]
    assert results.load_results(path)["records"] == doc["records"]
    table = results.format_table(doc["records"], meta["device"])
    assert "NVIDIA H100" in table and "not importable" in table


def test_record_rejects_unknown():
    cfg = suite_configs("quick")[0]
    with pytest.raises(ValueError):
        results.make_record(cfg, "fa3")
    with pytest.raises(ValueError):
        results.make_record(cfg, "fa2", bogus=1)
    with pytest.raises(ValueError):
        results.write_results("/tmp/x.json", {"device": "d"}, [])


def test_varlen_record_has_seqlens():
    (cfg,) = suite_configs("varlen-mix")
    rec = results.make_record(cfg, "fa2")
    assert rec["seqlens"] == cfg.lengths() and rec["S"] == 256 * K_


def test_device_slug():
    assert results.device_slug("NVIDIA H200") == "nvidia-h200"
    assert results.device_slug("  ") == "unknown-device"


def test_plot_series_grouping():
    from benchmarks.plot import series

    recs = [results.make_record(c, "fa2") for c in suite_configs("moba-large")]
    lines = series(recs)
    assert set(lines) == {"fa2 C=512 K=3", "fa2 C=4096 K=12"}
    recs = [results.make_record(c, "fa2") for c in suite_configs("flashmoba")]
    assert list(series(recs)) == ["fa2"]


# ------------------------------------------------------------------------------------------
# FlexAttention MoBA mask (the table logic, checked against the reference on the CPU)


@pytest.mark.parametrize("fmt", ["bool", "bits"])
@pytest.mark.parametrize("varlen", [False, True])
def test_flex_mask_matches_reference(varlen, fmt):
    moba_cute = pytest.importorskip("moba_cute")
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    from benchmarks import flex_moba as fm

    lens = [70, 129, 33, 150] if varlen else [160, 160]
    B, L = (1, sum(lens)) if varlen else (2, 160)
    H, Hk, D = 2, 1, 16
    C, K = (32, 3) if fmt == "bool" else (4, 5)  # bits: > 64 chunks, so several words and bit 63 are used
    g = torch.Generator().manual_seed(3)
    tot = sum(lens)
    q, k, v = (torch.randn(tot, h, D, generator=g, dtype=torch.float64) for h in (H, Hk, Hk))
    c, m = cu(lens), max(lens)
    sel = moba_cute.route(q, k, c, c, m, m, C, K, True, backend="reference").selection
    ref = moba_cute.varlen_attention(q, k, v, c, c, m, m, C, K, backend="reference")
    if varlen:
        n_global = sum(-(-n // C) for n in lens)
        table = fm.token_table_packed(sel, c, C, n_global, fmt=fmt)
        mask_mod = fm.packed_mask_mod(table, fm.packed_chunk_of(c, C), fmt)
        cfg = Config("varlen-mix", B=len(lens), H=H, Hk=Hk, D=D, C=C, K=K, S=tot, seqlens=tuple(lens))
    else:
        table = fm.token_table_uniform(sel, B, L, -(-L // C), fmt=fmt)
        mask_mod = fm.uniform_mask_mod(table, C, fmt)
        cfg = Config("quick", B=B, H=H, Hk=Hk, D=D, C=C, K=K, S=L)
    assert fm.table_bytes(cfg, fmt) == table.numel() * table.element_size()
    assert fm.table_format(cfg) == "bool"
    # the mask's pair count equals the selection's
    qi = torch.arange(L).view(-1, 1)
    ki = torch.arange(L).view(1, -1)
    n_mask = sum(int(mask_mod(torch.tensor(b), torch.tensor(h), qi, ki).sum()) for b in range(B) for h in range(H))
    assert n_mask == flops.moba_pairs_from_selection(sel, c, c, C, True)
    bm = fa.create_block_mask(mask_mod, B, H, L, L, device="cpu", BLOCK_SIZE=128)

    def bhsd(t):
        return t.view(B, L, t.shape[1], D).transpose(1, 2)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fa.flex_attention(bhsd(q), bhsd(k), bhsd(v), block_mask=bm, enable_gqa=True)
    out = out.transpose(1, 2).reshape(tot, H, D)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------
# CLI


def _run_cli(*args, env_extra=None):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_cli_without_cuda_exits_clearly(tmp_path):
    res = _run_cli("--suite", "quick", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr and "--dry-run" in res.stderr
    assert not os.listdir(tmp_path)  # nothing written


def test_cli_list_and_bad_args():
    res = _run_cli("--suite", "moba-large", "--list")
    assert res.returncode == 0 and res.stdout.count("moba-large:") == 7
    res = _run_cli("--suite", "flashmoba", "--impls", "fa3")
    assert res.returncode == 2 and "unknown impl" in res.stderr
    res = _run_cli("--suite", "nope")
    assert res.returncode == 2


def test_cli_dry_run_writes_schema(tmp_path):
    pytest.importorskip("moba_cute")
    # an earlier file of the same suite/device/date: --merge keeps its other records
    path = results.results_path(str(tmp_path), "quick", "cpu-dry-run")
    old_cfgs = [Config("quick", B=2, H=2, Hk=2, D=32, C=64, K=3, S=s) for s in (256, 512)]
    old = [results.make_record(c, "reference", note="old") for c in old_cfgs]
    results.write_results(path, {"device": "x", "torch": "x", "cutlass_dsl": "x", "commit": "x"}, old)
    res = _run_cli("--suite", "quick", "--dry-run", "--sizes", "256", "--reps", "1", "--warmup", "1",
                   "--out", str(tmp_path), "--no-plot", "--merge")
    assert res.returncode == 0, res.stderr
    assert "dry run" in res.stdout
    (name,) = os.listdir(tmp_path)
    assert name == os.path.basename(path)
    assert name.startswith("quick_cpu-dry-run_") and name.endswith(".json")
    doc = json.load(open(tmp_path / name))
    assert doc["dry_run"] is True and doc["device"].startswith("cpu-dry-run")
    rec, kept = doc["records"]
    assert kept["S"] == 512 and kept["note"] == "old"  # kept by --merge
    assert list(rec)[: len(SPEC_KEYS)] == SPEC_KEYS
    assert rec["impl"] == "reference" and rec["S"] == 256
    for key in ("routing_ms", "fwd_ms", "fwdbwd_ms", "eff_tflops_fwd", "eff_tflops_fwdbwd"):
        assert rec[key] is not None and rec[key] > 0 and math.isfinite(rec[key])
    assert rec["peak_mem_gb"] is None and rec["peak_fwd_gb"] is None  # not measured on the CPU
    expected = flops.moba_causal_pairs([256, 256], [256, 256], 2, 64, 3)
    assert rec["attended_pairs"] == expected
    assert rec["sparsity"] == pytest.approx(expected / flops.dense_pairs([256, 256], [256, 256], 2), abs=1e-6)


def test_flex_table_format_choice():
    from benchmarks import flex_moba as fm

    by_s = {c.S: c for c in suite_configs("flashmoba", [64 * K_, 128 * K_, 512 * K_])}
    assert fm.table_format(by_s[64 * K_]) == "bool"
    assert fm.table_format(by_s[128 * K_]) == "bits"  # 2*16*128K*1025 >= 2^31
    assert fm.table_bytes(by_s[128 * K_]) == 2 * 16 * 128 * K_ * 17 * 8
    rows = 2 * 16 * 512 * K_ * (4096 // 64 + 1)
    assert rows < 2**31 and fm.table_bytes(by_s[512 * K_]) == rows * 8
    (vm,) = suite_configs("varlen-mix")
    assert fm.table_format(vm) == "bool" or fm.table_bytes(vm) < 2**31


def test_flex_bits_table_marks_exact_chunks():
    from benchmarks import flex_moba as fm

    n = 130  # three words; chunk 63 and 127 hit the sign bit
    sel = torch.tensor([[[0, 63, 64, 127, 129, -1]], [[-1, -1, -1, -1, -1, -1]]], dtype=torch.int32)  # (2, 1, 6)
    bits = fm.token_table_uniform(sel, 1, 2, n, fmt="bits")
    assert bits.shape == (1, 1, 2, 4) and bits.dtype == torch.int64
    got = [[c for c in range(n) if bool(fm._has(bits, "bits", 0, 0, q, torch.tensor(c)))] for q in range(2)]
    assert got == [[0, 63, 64, 127, 129], []]
    ref = fm.token_table_uniform(sel, 1, 2, n, fmt="bool")
    assert [[c for c in range(n) if bool(ref[0, 0, q, c])] for q in range(2)] == got


# ------------------------------------------------------------------------------------------
# host suite (benchmarks/host.py)

# Entry names as the CuTe DSL generates them (PTX of CPU compiles for sm_90a), abridged in the middle.
MOBA_ENTRIES = [
    "kernel_cutlass_kernel_moba_cutekernelsslot_indexSlotIndexKernel_object_at__ptri32gmem_ptri32gmem______0",
    "kernel_cutlass_kernel_moba_cutekernelsmoba_fwd_sm80MobaFwdSm80_object_at__ptrbf16gmemalign16_ptrf32gm_0",
    "kernel_cutlass_kernel_moba_cutekernelsmoba_bwd_sm80MobaBwdDkvSm80_object_at__ptrbf16gmemalign16_0",
    "kernel_cutlass_kernel_moba_cutekernelscentroidsChunkPrepKernel_object_at__ptri32gmem_ptri32gmem_0",
    "kernel_cutlass_kernel_moba_cutekernelskey_major_indexSegmentScanKernel_object_at__ptri32gmem_0",
]
FOREIGN = [
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, std::array<char*, 1ul> >"
    "(int, at::native::FillFunctor<int>, std::array<char*, 1ul>)",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>(float*, float const*, int)",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>(Params)",
    "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__0",
    "Memset (Device)",
    "Memcpy DtoD (Device -> Device)",
]


def test_is_moba_kernel_and_short_names():
    from benchmarks.host import is_moba_kernel, short_kernel_name

    assert all(is_moba_kernel(n) for n in MOBA_ENTRIES)
    assert not any(is_moba_kernel(n) for n in FOREIGN)
    assert [short_kernel_name(n) for n in MOBA_ENTRIES] == [
        "slot_index.SlotIndexKernel", "moba_fwd_sm80.MobaFwdSm80", "moba_bwd_sm80.MobaBwdDkvSm80",
        "centroids.ChunkPrepKernel", "key_major_index.SegmentScanKernel"]
    short = [short_kernel_name(n) for n in FOREIGN]
    assert short[0] == FOREIGN[0][5:FOREIGN[0].index(">(") + 1]  # no "void ", no parameter list
    assert short[1].startswith("at::native::{anon}::cunn_SoftMaxForward<")
    assert short[4:] == FOREIGN[4:]
    assert all(len(s) <= 120 for s in short)


def test_host_gpu_work_filter():
    from types import SimpleNamespace as NS

    from benchmarks.host import _is_gpu_work

    assert all(_is_gpu_work(NS(activity_type=k)) for k in ("kernel", "gpu_memcpy", "gpu_memset"))
    assert not _is_gpu_work(NS(activity_type="gpu_user_annotation"))
    assert not _is_gpu_work(NS(activity_type="", is_user_annotation=True))
    assert _is_gpu_work(NS())  # a kind this torch does not report: counted, never silently dropped


def test_host_bound_call_reports_missing_and_changed_functions():
    pytest.importorskip("moba_cute")
    from benchmarks.host import bound_call

    assert bound_call("interface._check_scalars", 64, 3, True, None, "auto")() is None
    with pytest.raises(LookupError, match="not found"):
        bound_call("interface._no_such_check", 1)
    with pytest.raises(LookupError, match="not found"):
        bound_call("no_such_module.fn")
    with pytest.raises(LookupError, match="signature differs"):
        bound_call("route", 1, 2)


def test_host_record_schema_and_targets():
    from benchmarks import host

    cfg = suite_configs("host")[0]
    assert [c.S for c in suite_configs("host")] == [8 * K_, 16 * K_, 64 * K_]
    assert (cfg.B, cfg.H, cfg.Hk, cfg.D, cfg.C, cfg.K, cfg.causal) == (2, 16, 16, 128, 128, 8, True)
    rec = host.normalize_host_record({"suite": "host", "S": cfg.S, "host_fwd_ms": 0.1, "host_fwdbwd_ms": 0.5,
                                      "fwd_kernel_count": 3, "fwd_foreign_kernels": [],
                                      "fwdbwd_kernel_count": 5, "fwdbwd_foreign_kernels": ["Memset (Device)"],
                                      "fwdbwd_vs_fa4": float("nan")})
    assert tuple(rec) == host.HOST_KEYS and rec["note"] == "" and rec["fwdbwd_vs_fa4"] is None
    assert [ok for _, ok in host.target_checks(rec)] == [True, False, True, False, None]
    with pytest.raises(ValueError):
        host.normalize_host_record({"bogus": 1})
    rec["fwd_kernels"] = ["slot_index.SlotIndexKernel"] + ["moba_fwd_sm80.MobaFwdSm80"] * 2
    table = host.format_host_table([rec], "NVIDIA H200")
    assert "NVIDIA H200" in table and "MISSED" in table
    assert "kernels (3): slot_index.SlotIndexKernel, moba_fwd_sm80.MobaFwdSm80 x2" in table


def test_host_dry_run_writes_schema(tmp_path):
    pytest.importorskip("moba_cute")
    from benchmarks import host

    res = _run_cli("--suite", "host", "--dry-run", "--reps", "2", "--warmup", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "dry run" in res.stdout and "host ms:" in res.stdout
    (name,) = os.listdir(tmp_path)
    assert name.startswith("host_cpu-dry-run_") and name.endswith(".json")
    doc = json.load(open(tmp_path / name))
    assert list(doc)[:5] == ["device", "torch", "cutlass_dsl", "commit", "records"]
    assert doc["dry_run"] is True and doc["suite"] == "host" and doc["timing"]["reps"] == 2
    recs = doc["records"]
    assert [r["S"] for r in recs] == [256, 512]
    for r in recs:
        assert tuple(r) == host.HOST_KEYS
        assert r["impl"] == "reference" and r["suite"] == "host" and (r["H"], r["D"], r["C"], r["K"]) == (2, 32, 64, 3)
        for key in ("eager_fwd_ms", "eager_fwdbwd_ms"):
            assert r[key] > 0 and math.isfinite(r[key])
        for key in ("graph_fwd_ms", "graph_fwdbwd_ms", "host_fwd_ms", "host_fwdbwd_ms", "fa4_fwd_ms",
                    "fa4_fwdbwd_ms", "fwd_vs_fa4", "fwdbwd_vs_fa4", "fwd_kernel_count", "fwdbwd_kernel_count"):
            assert r[key] is None, key
        for key in ("fwd_kernels", "fwdbwd_kernels", "fwd_foreign_kernels", "fwdbwd_foreign_kernels"):
            assert r[key] == [], key
        assert tuple(r["host_breakdown_fwd"]) == host.BREAKDOWN_FWD
        assert tuple(r["host_breakdown_fwdbwd"]) == host.BREAKDOWN_FWDBWD
        for piece in ("varlen_attention", "route", "attention_with_routing", "validation"):
            assert r["host_breakdown_fwd"][piece] > 0, piece
        for piece in ("varlen_attention", "attention_with_routing"):
            assert r["host_breakdown_fwdbwd"][piece] > 0, piece
        assert r["host_breakdown_fwd"]["route_cute"] is None and r["host_breakdown_fwd"]["attention_cute"] is None
        assert r["host_breakdown_fwdbwd"]["attention_backward_cute"] is None
        for text in ("CUDA graphs need a GPU", "kernels: need a GPU", "FlashMoBA: not available", "route_cute",
                     "fewer than 20"):
            assert text in r["note"], text
        assert r["reps"] == 2


def test_host_cli_list_and_no_cuda(tmp_path):
    res = _run_cli("--suite", "host", "--list")
    assert res.returncode == 0 and res.stdout.count("host:") == 3 and "S=64K" in res.stdout
    if not torch.cuda.is_available():
        res = _run_cli("--suite", "host", "--out", str(tmp_path))
        assert res.returncode == 2 and "no CUDA device" in res.stderr
        assert not os.listdir(tmp_path)


def test_routing_cli_lives_in_benchmarks(capsys):
    """Command-line tools live in benchmarks/ (issue 11, point 7): no kernel module has a
    ``__main__`` entry or parses arguments; the routing timings are ``python -m benchmarks.routing``."""
    import pathlib

    kernels = pathlib.Path(__file__).resolve().parents[1] / "moba_cute" / "kernels"
    for f in sorted(kernels.glob("*.py")):
        src = f.read_text()
        assert "__main__" not in src and "argparse" not in src, f.name
    from benchmarks import routing

    routing.main([])  # no mode: prints the usage (no GPU needed)
    out = capsys.readouterr().out
    for flag in ("--check", "--profile", "--bench", "--json"):
        assert flag in out


def test_memory_cli_checks_its_arguments():
    """benchmarks.memory refuses sizes the suite lacks and unknown implementations before it
    looks for a GPU, and says clearly when there is none."""
    from benchmarks import memory

    with pytest.raises(SystemExit) as e:
        memory.main(["--S", "3K"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        memory.main(["--impls", "moba_cute,fa9"])
    assert e.value.code == 2
    if not torch.cuda.is_available():
        assert memory.main(["--S", "8K"]) == 2


def test_ncu_tools_parse_their_inputs():
    from benchmarks.ncu_attention import top_stalls
    from benchmarks.ncu_decode import parse_cases

    assert parse_cases("8:32768:dense,1:131072:4096:12,2:64:sdpa") == [
        (8, 32768, "dense", None, None), (1, 131072, "moba", 4096, 12), (2, 64, "sdpa", None, None)]
    for bad in ("8:32768", "8:x:128:8", "0:64:dense", "1:64:128:0"):
        with pytest.raises(SystemExit):
            parse_cases(bad)
    csv_text = "\n".join([
        '"Kernel Name","x"',
        '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"',
        '"0x10","NANOSLEEP.SYNCS 0x989680","300","290"',
        '"0x20","HGMMA.64x128x16.F32.BF16 R24","100","10"',
        '"0x30","FADD R1, R2, R3","0","0"',
    ])
    lines = top_stalls(csv_text, top=2)
    assert lines[0] == "400 warp stall samples over 3 SASS lines"
    assert lines[1].startswith(" 75.0%  0x10  NANOSLEEP") and lines[2].startswith(" 25.0%  0x20  HGMMA")
    assert len(lines) == 3
    with pytest.raises(ValueError, match="SourceCounters"):
        top_stalls('"Address","Source","Instructions Executed"\n"0x10","FADD","5"')


def test_fwd_env_ab_variants_and_environment(monkeypatch):
    """benchmarks.fwd_env_ab: variants parse into MOBA_CUTE_* settings (tiles keep their commas),
    bad ones name the rule; each variant applies alone (benchmarks.common.environment) and the
    environment comes back; unknown
    shapes, counts and --backward with --training are refused before anything runs."""
    from benchmarks import fwd_env_ab as ab

    assert ab.parse_variant("") == {}
    assert ab.parse_variant("MOBA_CUTE_SM90_TILES=64,8,2; MOBA_CUTE_FWD_OVERLAP=1") == {
        "MOBA_CUTE_SM90_TILES": "64,8,2", "MOBA_CUTE_FWD_OVERLAP": "1"}
    for bad in ("OVERLAP=1", "MOBA_CUTE_FWD_OVERLAP", "MOBA_CUTE_X=1;MOBA_CUTE_X=0"):
        with pytest.raises(ValueError, match="MOBA_CUTE_NAME=VALUE"):
            ab.parse_variant(bad)
    from benchmarks.common import environment

    monkeypatch.setenv("MOBA_CUTE_FWD_MULTICAST", "0")
    monkeypatch.delenv("MOBA_CUTE_FWD_OVERLAP", raising=False)
    names = ["MOBA_CUTE_FWD_MULTICAST", "MOBA_CUTE_FWD_OVERLAP"]
    with environment({"MOBA_CUTE_FWD_OVERLAP": "1"}, names):
        assert os.environ["MOBA_CUTE_FWD_OVERLAP"] == "1" and "MOBA_CUTE_FWD_MULTICAST" not in os.environ
    assert os.environ["MOBA_CUTE_FWD_MULTICAST"] == "0" and "MOBA_CUTE_FWD_OVERLAP" not in os.environ
    with pytest.raises(SystemExit, match="unknown shape"):
        ab.main(["--shapes", "nope", ""])
    with pytest.raises(SystemExit, match="--rounds"):
        ab.main(["--rounds", "0", ""])
    with pytest.raises(SystemExit, match="pick one"):
        ab.main(["--backward", "--training", ""])
