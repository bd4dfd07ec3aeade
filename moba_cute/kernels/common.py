"""Shared helpers of the CuTe DSL kernels.

* a compile cache keyed by one static compile key per kernel (the key holds everything that
  changes the generated code; all sizes are runtime arguments);
* torch -> CuTe conversion: kernels take raw global pointers plus 32/64-bit scalar sizes, so
  calling a compiled kernel costs no DLPack round trip and dynamic shapes never recompile;
* arch detection, and :func:`compile_for_arch` that compiles a kernel against fake
  arguments for a given target (no GPU needed) and returns the PTX and the ptxas report.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Tuple

_CACHE: Dict[Hashable, Any] = {}
_LOCK = threading.Lock()


def _cute():
    import cutlass  # noqa: F401
    import cutlass.cute as cute

    return cute


def cutlass_dtype(torch_dtype):
    """The cutlass numeric type of a torch dtype."""
    import cutlass
    import torch

    table = {
        torch.float16: cutlass.Float16,
        torch.bfloat16: cutlass.BFloat16,
        torch.float32: cutlass.Float32,
        torch.int32: cutlass.Int32,
        torch.int64: cutlass.Int64,
    }
    return table[torch_dtype]


def contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


def kernel_input(t):
    """``t`` contiguous and 16-byte aligned (the kernels' vector loads assume both); a copy only
    where it is not."""
    if not t.is_contiguous():
        return t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def fake_gptr(dtype, align: int = 16):
    """A placeholder global pointer for compilation without a GPU."""
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    return make_ptr(dtype, 16 * 1024, cute.AddressSpace.gmem, assumed_align=align)


_RAW_STREAM = None


def raw_stream(dev) -> int:
    """The caller's current CUDA stream handle on device ``dev`` (PyTorch's raw getter: ~0.1 us
    instead of ~3 us for a ``torch.cuda.Stream`` object, which matters before a call's first
    launch)."""
    global _RAW_STREAM
    import torch

    if _RAW_STREAM is None:
        _RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", False)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if _RAW_STREAM:
        return _RAW_STREAM(idx)
    return torch.cuda.current_stream(idx).cuda_stream


def device_arch(device=None) -> str:
    """``"sm_90a"`` / ``"sm_80"`` / ... for a CUDA device (``sm_XYa`` for 9.0)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    if (major, minor) == (9, 0):
        arch += "a"
    return arch


_ARCH: Dict[int, str] = {}


def arch_of(dev) -> str:
    """:func:`device_arch` of a torch device, cached per device index (a call's hot path)."""
    import torch

    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    a = _ARCH.get(idx)
    if a is None:
        a = _ARCH[idx] = device_arch(idx)
    return a


_SMS: dict = {}
#: what a plan built where no GPU is visible (the CPU tests) assumes: an H100's or H200's
SM_COUNT_WITHOUT_GPU = 132


def sm_count(index=None) -> int:
    """Multiprocessor count of CUDA device ``index`` (None: the current one), cached; where no
    GPU is visible, :data:`SM_COUNT_WITHOUT_GPU`."""
    import torch

    if not torch.cuda.is_available():
        return SM_COUNT_WITHOUT_GPU
    idx = index if index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = int(torch.cuda.get_device_properties(idx).multi_processor_count)
    return n


def arch_family(arch: str) -> str:
    """``"sm90"`` for Hopper targets, ``"sm80"`` for everything from Ampere up to Ada."""
    m = re.match(r"sm_?(\d+)", arch)
    n = int(m.group(1)) if m else 0
    return "sm90" if n >= 90 else "sm80"


def compile_options(arch: str, keep_ptx: bool = False, ptxas_report: bool = False) -> str:
    opts = [f"--gpu-arch={arch}"]
    if keep_ptx:
        opts.append("--keep-ptx")
    if ptxas_report:
        opts.append("remarks{ptx}")
    return " ".join(opts)


def cached_compile(key: Hashable, build: Callable[[], Any]) -> Any:
    """Return the compiled object for ``key``, building it once (thread safe)."""
    fn = _CACHE.get(key)
    if fn is None:
        with _LOCK:
            fn = _CACHE.get(key)
            if fn is None:
                fn = build()
                _CACHE[key] = fn
    return fn


@dataclass
class CompileReport:
    """What :func:`compile_for_arch` found out about one compiled kernel."""

    arch: str
    ptx: str
    ptxas: str  # ptxas -v output ("" if unavailable)
    registers: Dict[str, int]
    spill_stores: int
    spill_loads: int
    stack_frame: int


def _parse_ptxas(text: str) -> Tuple[Dict[str, int], int, int, int]:
    regs: Dict[str, int] = {}
    spill_st = spill_ld = stack = 0
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            stack = max(stack, int(m.group(1)))
            spill_st = max(spill_st, int(m.group(2)))
            spill_ld = max(spill_ld, int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            regs[cur] = int(m.group(1))
    return regs, spill_st, spill_ld, stack


def compile_for_arch(jit_fn, args, arch: str) -> CompileReport:
    """Compile ``jit_fn(*args)`` (fake pointers / scalars / fake stream) for ``arch``.

    Works without a GPU. Returns the PTX and the ptxas report (``remarks{ptx}``), parsed. The
    DSL prints that report on the process's stdout/stderr, which are captured here.
    """
    cute = _cute()
    import tempfile

    import contextlib
    import io
    import sys

    buf = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                compiled = cute.compile(
                    jit_fn, *args, options=compile_options(arch, keep_ptx=True, ptxas_report=True)
                )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        tmp.seek(0)
        report = tmp.read().decode(errors="replace") + buf.getvalue()
    ptx = compiled.artifacts.PTX or ""
    regs, sst, sld, stack = _parse_ptxas(report)
    return CompileReport(arch, ptx, report, regs, sst, sld, stack)


def fake_stream():
    from cutlass.cute.runtime import make_fake_stream

    return make_fake_stream()


# --- low-overhead launches ------------------------------------------------------------------

class FastLauncher:
    """Calls a compiled CuTe function with raw ints (device addresses, int32 scalars, the CUDA
    stream handle) through its packed-argument entry point, skipping the DSL's per-call
    argument conversion (``make_ptr`` objects, numeric casts, adapters).

    The argument kinds come from the fake arguments the function was compiled with. The first
    call goes through the DSL's own conversion and checks, value by value, that the packed
    arguments this class would pass are the same; if anything differs (or the DSL's internals
    change), every call keeps using the DSL's regular path.
    """

    def __init__(self, compiled, fake_args):
        import ctypes

        from cutlass.cute.runtime import _Pointer  # noqa: F401  (presence check)

        self.compiled = compiled
        self.kinds = []
        for a in fake_args:
            tn = type(a).__name__
            if hasattr(a, "_assumed_align") and hasattr(a, "_dtype"):
                self.kinds.append(("p", a._dtype, a._assumed_align, a._addr_space))
            elif tn == "Int32":
                self.kinds.append(("i",))
            elif tn == "Int64":
                self.kinds.append(("l",))
            elif tn == "Float32":
                self.kinds.append(("f",))
            else:
                self.kinds.append(("s",))
        ctype = {"i": ctypes.c_int32, "l": ctypes.c_int64, "f": ctypes.c_float}
        self.store = [ctype.get(kd[0], ctypes.c_void_p)(0) for kd in self.kinds]
        self.exe = [ctypes.addressof(c) for c in self.store]
        self.fast = None  # None: not verified yet; True / False after the first call
        self.direct = None  # see _direct
        self.lock = threading.Lock()

    def _slow_args(self, args):
        import cuda.bindings.driver as cuda
        from cutlass import Float32, Int32, Int64
        from cutlass.cute.runtime import make_ptr

        out = []
        for kd, v in zip(self.kinds, args):
            if kd[0] == "p":
                out.append(make_ptr(kd[1], int(v), kd[3], assumed_align=kd[2]))
            elif kd[0] == "i":
                out.append(Int32(int(v)))
            elif kd[0] == "l":
                out.append(Int64(int(v)))
            elif kd[0] == "f":
                out.append(Float32(float(v)))
            else:
                out.append(cuda.CUstream(int(v)))
        return out

    def _verify(self, slow):
        import ctypes

        try:
            ref, _ = self.compiled.generate_execution_args(*slow)
            if len(ref) != len(self.exe):
                return False
            for kd, r, mine in zip(self.kinds, ref, self.store):
                addr = r.value if isinstance(r, ctypes.c_void_p) else int(r)
                if kd[0] == "i":
                    got = ctypes.c_int32.from_address(addr).value
                elif kd[0] == "l":
                    got = ctypes.c_int64.from_address(addr).value
                elif kd[0] == "f":
                    got = ctypes.c_float.from_address(addr).value
                else:
                    got = ctypes.c_void_p.from_address(addr).value or 0
                if got != (mine.value or 0):
                    return False
            return hasattr(self.compiled, "run_compiled_program")
        except Exception:  # noqa: BLE001
            return False

    def _direct(self):
        """(host entry point, packed argument array, result slot) of the compiled function's
        default executor, or None. The packed array holds the addresses of ``self.store`` (which
        never move) plus the executor's own trailing entries, so it is built once; a call then
        costs the stores into ``self.store`` and one call of the host entry point (~4 us instead
        of ~11 us through ``run_compiled_program``, which re-packs every argument under a lock)."""
        import ctypes

        try:
            ex = getattr(self.compiled, "_default_executor", None)
            if ex is None or not hasattr(ex, "_get_invoke_packed_args") or not hasattr(ex, "capi_func"):
                return None
            buf = ex._get_invoke_packed_args(list(self.exe))
            n = len(self.exe) + ex._num_extra_args
            packed = (ctypes.c_void_p * n)(*buf[:n])
            for i, a in enumerate(self.exe):
                if packed[i] != a:
                    return None
            res = ex.cuda_result if ex._has_cuda_result else None
            return ex.capi_func, packed, res
        except Exception:  # noqa: BLE001
            return None

    def __call__(self, *args):
        with self.lock:
            if self.fast:
                for c, v in zip(self.store, args):
                    c.value = v
                d = self.direct
                if d is None:
                    self.compiled.run_compiled_program(self.exe)
                    return
                d[0](d[1])
                if d[2] is not None and d[2].value != 0:
                    raise RuntimeError(f"CUDA error {d[2].value} launching a CuTe kernel")
                return
            slow = self._slow_args(args)
            if self.fast is None:
                for kd, c, v in zip(self.kinds, self.store, args):
                    c.value = float(v) if kd[0] == "f" else int(v)
                self.fast = self._verify(slow)
            self.compiled(*slow)
            if self.fast:
                # (the first call above created the default executor)
                self.direct = self._direct()


class KernelSet(dict):
    """Role -> :class:`FastLauncher` of one kernel configuration, compiled on first use.

    ``specs`` are ``(compile key, factory, fake args)`` triples by role; the compiled kernels
    live in the process-wide cache under ``key + (arch,)``, so kernel sets that share a kernel
    share its compilation."""

    def __init__(self, specs: Dict[str, tuple], arch: str):
        super().__init__()
        self.specs = specs
        self.arch = arch

    def __missing__(self, role):
        key, factory, fake = self.specs[role]

        def build():
            cute = _cute()
            return FastLauncher(cute.compile(factory(), *fake, options=compile_options(self.arch)), fake)

        k = cached_compile(tuple(key) + (self.arch,), build)
        self[role] = k
        return k


class WorkspaceLayout:
    """Byte offsets of named pieces of one workspace allocation (each 256-byte aligned), so a
    call takes all its scratch memory in one ``torch.empty`` from the caching allocator."""

    ALIGN = 256

    def __init__(self):
        self.offsets: Dict[str, int] = {}
        self.nbytes = 0

    def add(self, name: str, nbytes: int) -> int:
        off = self.nbytes
        self.offsets[name] = off
        self.nbytes = off + (max(int(nbytes), 1) + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        return off


class PlanCache:
    """Launch plans by call-shape key (everything a plan depends on), bounded: a process that
    sees many shapes (e.g. varlen batches of changing totals) drops the oldest plans.
    ``hits`` / ``misses`` count lookups (tests read them)."""

    def __init__(self, build: Callable[..., Any], max_size: int = 256):
        self.build = build
        self.max_size = max_size
        self.plans: Dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, *args) -> Any:
        plan = self.plans.get(key)
        if plan is not None:
            self.hits += 1
            return plan
        self.misses += 1
        plan = self.build(*args)
        if len(self.plans) >= self.max_size:
            self.plans.pop(next(iter(self.plans)))
        self.plans[key] = plan
        return plan

    def clear(self) -> None:
        self.plans.clear()
