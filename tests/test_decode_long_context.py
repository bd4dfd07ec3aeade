"""CPU tests of benchmarks/decode.py (the decode calls' shapes and semantics, through the reference)
and benchmarks/long_context.py (the size search, the line fit, the 32-bit size limit). No GPU."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import decode, long_context as lc  # noqa: E402

K_ = 1024
M_ = K_ * K_
G = 128 * K_
GROWTH = [M_, 3 * M_ // 2, 2 * M_, 3 * M_, 4 * M_, 6 * M_, 8 * M_]


# ------------------------------------------------------------------------------------------
# decode


def test_cpu_check_passes():
    res = decode.cpu_check()
    assert len(res) == 8 * len(decode.CPU_SHAPES)
    bad = [(what, err) for what, err, ok in res if not ok]
    assert not bad, bad


def test_cpu_check_catches_top_left_alignment(monkeypatch):
    """SDPA's own causal flag is top-left aligned: a dense baseline built with it is caught (n > 1)."""
    import torch.nn.attention.bias as bias

    monkeypatch.setattr(bias, "causal_lower_right", bias.causal_upper_left)
    res = decode.cpu_check()
    failed = {what for what, _, ok in res if not ok}
    assert failed and all("sdpa" in w and "n=4" in w for w in failed)
    assert any("n=4: sdpa vs" in w for w in failed)


def test_sparse_decode_is_not_dense():
    """The decode-vs-full-forward checks compare sparse attention: it differs from dense."""
    import moba_cute as mc

    shape = decode.Shape(2, 61, 4, 4, 2, 16, "float32")
    inp = decode.make_decode_inputs(shape, "cpu", seed=3)
    sparse = decode.moba_call(mc, inp, 8, 2, "reference")()
    assert sparse.shape == (shape.B * shape.n, shape.H, shape.D)
    assert (sparse - decode.dense_math(inp)).abs().max().item() > 1e-2
    sel = decode.route_call(mc, inp, 8, 2, "reference")()
    assert sel.shape == (shape.B * shape.n, shape.H, 2)
    own = (torch.arange(shape.n) + shape.L) // 8  # bottom-right: query i sits at key L + i
    assert torch.equal(sel[:, :, 0], own.repeat(shape.B)[:, None].expand(-1, shape.H).to(sel.dtype))


def test_decode_inputs_layouts():
    shape = decode.Shape(3, 10, 2, 4, 2, 8, "float32")
    inp = decode.make_decode_inputs(shape, "cpu")
    assert inp.q.shape == (6, 4, 8) and inp.k.shape == (36, 2, 8)
    assert inp.cu_q.tolist() == [0, 2, 4, 6] and inp.cu_k.tolist() == [0, 12, 24, 36]
    assert inp.kc.shape == (3, 2, 12, 8) and inp.kc.is_contiguous()
    assert torch.equal(inp.kc[1, 0, 5], inp.k[12 + 5, 0])
    assert torch.equal(inp.q4()[2, 1, 1], inp.q[2 * 2 + 1, 1])
    assert torch.equal(decode.flat(inp.q4(), shape), inp.q)
    with pytest.raises(ValueError, match="do not fit"):
        decode.DecodeInputs.build(shape, inp.q[:-1], inp.k, inp.v)


def test_decode_records_and_table():
    shape = decode.Shape(1, 32 * K_, 1)
    recs = [decode._record(shape, "sdpa", eager_ms=0.5, graph_ms=0.4, vs_sdpa_eager=1.0),
            decode._record(shape, "moba_cute.sm90", 128, 8, routing_ms=0.1, eager_ms=0.25, graph_ms=float("nan"),
                           check_err=3e-3, check_bound=1e-3, note="x")]
    assert list(recs[0]) == list(decode.DECODE_KEYS)
    assert recs[0]["Sk"] == 32 * K_ + 1 and recs[1]["graph_ms"] is None and recs[0]["note"] == ""
    recs.append(decode._record(shape, "fa4", note="x"))
    table = decode.format_decode_table(recs, "dev")
    assert "FAIL" in table and "128:8" in table and "[1] x" in table and "[2]" not in table
    with pytest.raises(ValueError, match="unknown decode record keys"):
        decode.normalize_decode_record({"bogus": 1})


def test_dry_run_writes_the_records(tmp_path, capsys):
    import json

    out = tmp_path / "decode.json"
    assert decode.main(["--dry-run", "--reps", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu-dry-run" and doc["dry_run"] is True
    recs = doc["records"]
    assert all(list(r) == list(decode.DECODE_KEYS) for r in recs)
    shapes = {(r["B"], r["L"], r["Sq"]) for r in recs}
    # sdpa, MoBA C=16 K=3, the same from transformers' cache layout, the dense layer
    assert len(shapes) == 4 and len(recs) == 4 * 4
    assert sum(r["impl"] == "reference" + decode.CACHE_SUFFIX for r in recs) == 4
    for r in recs:
        assert r["eager_ms"] is not None and r["Sk"] == r["L"] + r["Sq"], r
        assert "error" not in r["note"] and "FAILED" not in r["note"], r
        if r["impl"].startswith("reference"):
            assert r["check_err"] <= r["check_bound"]
            assert (r["routing_ms"] is None) == r["impl"].endswith(decode.CACHE_SUFFIX)
            assert r["C"] == 16 or (r["K"] == 1 and r["C"] == decode.dense_layer_chunk(r["Sk"]))
    assert all(v.startswith("max error") for v in doc["probes"].values())
    assert "results:" in capsys.readouterr().out


def test_parse_moba():
    assert decode.parse_moba("128:8, 4096:12,dense") == [(128, 8), (4096, 12), decode.DENSE]
    assert decode.dense_layer_chunk(131073) == 131088 and decode.dense_layer_chunk(1) == 16
    for bad in ("128", "a:b", "0:8", ""):
        with pytest.raises(ValueError):
            decode.parse_moba(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_clis_without_cuda_exit_clearly(capsys):
    assert decode.main([]) == decode.EXIT_NO_CUDA
    assert lc.main([]) == lc.EXIT_NO_CUDA
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--cpu-check" in err
    assert decode.main(["--cpu-check"]) == 0


# ------------------------------------------------------------------------------------------
# long_context: the search


def _threshold(T, fail="oom", detail=""):
    calls = []

    def fits(S):
        calls.append(S)
        return ("fits", "") if S <= T else (fail, detail)

    return fits, calls


@pytest.mark.parametrize("T", [
    int(1.7 * M_),  # between growth sizes: bisect 1.5M..2M
    3 * M_ // 2,  # exactly a growth size
    3 * M_ // 2 + G - 1,  # just below the next granule
    int(3.3 * M_),  # later bracket (3M..4M)
    700 * K_,  # below the first size: bisect 0..1M
    G,  # only the first granule fits
])
def test_search_bisects_to_the_granularity(T):
    fits, calls = _threshold(T)
    res = lc.search_longest(fits, GROWTH, G)
    expect = T // G * G
    assert res.complete and res.longest == expect and res.first_failure == expect + G
    assert res.stopped_by == "oom"
    assert len(calls) == len(set(calls)), "a size was tried twice"
    assert all(S % G == 0 for S in calls)
    # growth stops at the first failure; then one attempt per halving of the bracket
    n_growth = next(i for i, S in enumerate(GROWTH) if S > T) + 1
    assert calls[:n_growth] == GROWTH[:n_growth]
    lo = GROWTH[n_growth - 2] if n_growth > 1 else 0
    span = (GROWTH[n_growth - 1] - lo) // G
    assert len(calls) - n_growth <= max(0, (span - 1).bit_length())
    assert [a.phase for a in res.attempts] == ["growth"] * n_growth + ["bisect"] * (len(calls) - n_growth)


def test_search_nothing_fits_and_everything_fits():
    fits, calls = _threshold(G - 1)
    res = lc.search_longest(fits, GROWTH, G)
    assert res.longest is None and res.first_failure == G and res.complete
    fits, calls = _threshold(100 * M_)
    res = lc.search_longest(fits, GROWTH, G)
    assert res.longest == GROWTH[-1] and res.first_failure is None and res.complete
    assert calls == GROWTH and "every growth size fitted" in res.stopped_by


def test_search_reports_the_size_limit():
    fits, _ = _threshold(int(2.5 * M_), fail="limit", detail="total_q * num_heads * topk")
    res = lc.search_longest(fits, GROWTH, G)
    assert res.longest == int(2.5 * M_) // G * G
    assert res.stopped_by == "limit: total_q * num_heads * topk"


def test_search_stops_at_an_error():
    calls = []

    def fits(S):
        calls.append(S)
        return ("fits", "") if S < 2 * M_ else ("error", "RuntimeError: illegal memory access")

    res = lc.search_longest(fits, GROWTH, G)
    assert calls == GROWTH[:3] and not res.complete
    assert res.longest == 3 * M_ // 2 and res.stopped_by.startswith("error: RuntimeError")


def test_search_stops_when_the_budget_is_spent():
    fits, calls = _threshold(int(1.7 * M_))
    res = lc.search_longest(fits, GROWTH, G, budget_ok=lambda S: len(calls) < 4)
    assert calls == [M_, 3 * M_ // 2, 2 * M_, 7 * M_ // 4] and not res.complete
    assert res.longest == 3 * M_ // 2 and res.first_failure == 7 * M_ // 4  # the bracket reached so far
    assert "time budget" in res.stopped_by


def test_search_rejects_bad_growth():
    fits, _ = _threshold(M_)
    for growth in ([M_ + 1], [2 * M_, M_], []):
        with pytest.raises(ValueError):
            lc.search_longest(fits, growth, G)
    with pytest.raises(ValueError, match="outcome"):
        lc.search_longest(lambda S: ("maybe", ""), GROWTH, G)


def test_linear_fit_and_tokens():
    a, b = lc.linear_fit([(16, 1.5 + 16 * 0.25), (32, 1.5 + 32 * 0.25), (64, 1.5 + 64 * 0.25)])
    assert a == pytest.approx(1.5) and b == pytest.approx(0.25)
    with pytest.raises(ValueError):
        lc.linear_fit([(16, 1.0), (16, 2.0)])
    assert lc.parse_tokens("1.5M") == 3 * M_ // 2 and lc.parse_tokens("128k") == G and lc.parse_tokens("77") == 77
    for bad in ("0", "-1M", "1.0000001M", "x"):
        with pytest.raises(ValueError):
            lc.parse_tokens(bad)


@pytest.mark.parametrize("fam", ["sm80", "sm90"])
def test_size_limit_is_the_first_broken_rule(fam):
    from moba_cute.interface import kernel_size_limits

    s = lc.SHAPE
    longest, rule = lc.size_limit_tokens(fam, G)

    def broken(S):
        return [r for r, v in kernel_size_limits(S, s["H"], s["D"], S, s["Hk"], 1, s["C"], s["K"], True, fam=fam)
                if v > 2 ** 31 - 1]

    assert longest is not None and longest % G == 0
    assert not broken(longest) and rule in broken(longest + G)
