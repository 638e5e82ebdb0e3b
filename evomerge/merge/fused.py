"""Task arithmetic and TIES on CPU in one pass over memory: the search's materialisation at real size.

Why: the torch path (`methods._merge_deltas`) is some 30 elementwise passes per task vector (TIES's masks, sign
election and agreement), each a trip through memory at 5-8 ns per element on one thread, and a magnitude
threshold costs a selection per tensor per candidate: 100-400x the memory-bandwidth bound of a candidate at
0.17-1B parameters. `fused.c` reads each source once per block of 256 entries, merges the block in registers (one
vectorised loop per source count, dtypes and consensus; stage by stage in L1 for what that loop does not serve) and
writes it once, straight into the engine's parameter in its dtype; a TIES threshold is found from a per-tensor histogram
of the task vector's magnitudes (a `Sketch`, built once per source tensor and kept: the sources do not change
between candidates, only weights and densities do). Where the sketch knows the threshold's bin exactly (its heavy
bins: bf16 sources), the pass decides every entry itself, ties by position; elsewhere it lists the few entries of
that bin and a fix-up finishes them once the exact threshold is known.

The results are the torch path's bits (same float32 operations, same order; `tests/test_fused.py` compares them
for every mode). What it covers: task-vector methods without a random sparsifier and without rescaling
(`task_arithmetic`, `ties`; any consensus), float32 computation, CPU tensors of float32/bfloat16/float16, up to 16
sources. Anything else, TIES with mergekit's tie order where equal magnitudes straddle a threshold (that order is
an unstable sort's: only the sort reproduces it), and a result holding a NaN go the torch way; `merge` says so by
returning False.

Built on first use with the C compiler (`$CC`, else `cc`) into `$XDG_CACHE_HOME/evomerge/kernels` (one file per
source, flags and CPU); with no compiler the torch path runs, with one warning. `EVOMERGE_FUSED=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from evomerge.merge.methods import MethodSpec
from evomerge.merge.sparsify import kept_count

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared")
MAX_SOURCES = 16
SHIFT = 14  # as in fused.c: magnitude bins are float32 bits >> SHIFT
_BINS = 1 << (31 - SHIFT)
_NONFINITE_BIN = 0x7F800000 >> SHIFT  # inf and NaN magnitudes fall in or above this bin
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MODES = {"keep_all": 0, "threshold": 1, "keep_none": 2, "run": 3}
_CONSENSUS = {None: 0, "sum": 1, "count": 2}
_CHUNK_MIN = 1 << 20  # entries per thread below which a tensor is merged by one thread


class _Job(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64), ("n_sources", ctypes.c_int32), ("base_dtype", ctypes.c_int32),
        ("base", ctypes.c_void_p), ("source", ctypes.c_void_p * MAX_SOURCES),
        ("source_dtype", ctypes.c_int32 * MAX_SOURCES), ("is_delta", ctypes.c_int32 * MAX_SOURCES),
        ("mode", ctypes.c_int32 * MAX_SOURCES), ("bin", ctypes.c_int32 * MAX_SOURCES),
        ("value", ctypes.c_uint32 * MAX_SOURCES), ("quota", ctypes.c_int64 * MAX_SOURCES),
        ("weight", ctypes.c_float * MAX_SOURCES), ("consensus", ctypes.c_int32), ("normalize", ctypes.c_int32),
        ("divide_total", ctypes.c_int32), ("total", ctypes.c_float), ("scale", ctypes.c_int32),
        ("lam", ctypes.c_float), ("out", ctypes.c_void_p), ("out_dtype", ctypes.c_int32),
    ]


class _Pending(ctypes.Structure):
    _fields_ = [
        ("cap", ctypes.c_int64), ("count", ctypes.c_int64), ("index", ctypes.c_void_p), ("base", ctypes.c_void_p),
        ("delta", ctypes.c_void_p * MAX_SOURCES), ("undecided", ctypes.c_void_p), ("kept", ctypes.c_void_p),
    ]


class _Undecided:
    """One thread's list of entries left undecided by the pass (numpy arrays fused.c writes through `struct`)."""

    def __init__(self, cap: int, n_sources: int):
        self.index = np.empty(cap, dtype=np.int64)
        self.base = np.empty(cap, dtype=np.float32)
        self.delta = [np.empty(cap, dtype=np.float32) for _ in range(n_sources)]
        self.undecided = np.empty(cap, dtype=np.uint32)
        self.kept = np.empty(cap, dtype=np.uint32)
        self.struct = _Pending(cap=cap, count=0, index=self.index.ctypes.data, base=self.base.ctypes.data,
                               undecided=self.undecided.ctypes.data, kept=self.kept.ctypes.data)
        for i, a in enumerate(self.delta):
            self.struct.delta[i] = a.ctypes.data

    def magnitudes(self, lib: ctypes.CDLL, i: int) -> torch.Tensor:
        """Source i's undecided magnitudes, in index order."""
        out = np.empty(self.struct.count, dtype=np.float32)
        m = lib.fused_undecided(ctypes.byref(self.struct), i, out.ctypes.data)
        return torch.from_numpy(out[:m])


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's flags (a cache shared by several machines keeps one build each)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS, _cpu_id())).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge" / "kernels"
    so = cache / f"fused-{digest}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:  # built beside its final name and renamed: workers building at once never load half a file
            subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
            os.replace(tmp, so)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    p = ctypes.c_void_p
    lib.fused_sketch.argtypes = [p, ctypes.c_int32, p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64,
                                 p, p]
    lib.fused_bin_values.argtypes = [p, ctypes.c_int32, p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int64, p, p,
                                     ctypes.c_int32, p]
    lib.fused_bin_values.restype = ctypes.c_int64
    lib.fused_sketch.restype = ctypes.c_int
    lib.fused_pass.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p]
    lib.fused_pass.restype = ctypes.c_int
    lib.fused_fixup.argtypes = [p, p, p, p]
    lib.fused_fixup.restype = ctypes.c_int
    lib.fused_undecided.argtypes = [p, ctypes.c_int32, p]
    lib.fused_undecided.restype = ctypes.c_int64
    return lib


def available() -> bool:
    """Whether the kernel is built or can be (not turned off, a compiler on PATH), without building it: what the
    memory plan asks."""
    if os.environ.get("EVOMERGE_FUSED", "1") == "0" or _failed is not None:
        return False
    return _lib is not None or shutil.which(os.environ.get("CC", "cc")) is not None


def library() -> ctypes.CDLL | None:
    """The built kernel, or None (turned off, or no compiler: said once) so that callers take the torch path."""
    global _lib, _failed
    if os.environ.get("EVOMERGE_FUSED", "1") == "0":
        return None
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _build()
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                _failed = detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__
                warnings.warn(f"evomerge: the one-pass CPU merge kernel ({SOURCE.name}) could not be built "
                              f"({_failed}); merging the torch way, several times slower. Install a C compiler "
                              "(gcc) or set CC", stacklevel=2)
        return _lib


def supports(spec: MethodSpec, global_params: dict, n_sources: int) -> bool:
    """Whether a merge of this method and these parameters (defaults filled) is one the kernel computes."""
    return (spec.uses_task_vectors and spec.sparsifier in (None, "magnitude") and spec.consensus in _CONSENSUS
            and not (spec.sparsifier and global_params["rescale"]) and 1 <= n_sources <= MAX_SOURCES)


# ---------------------------------------------------------------------------------------------------- sketches
@dataclass(frozen=True)
class Sketch:
    """The magnitudes of one task vector binned by their top float32 bits: where any rank's value lies, to one
    bin (1/512 of an octave). `tail[r]`: how many nonzero magnitudes are in bin `top - r` or above. `exact`: for
    the heavy bins, their values (float32 bits, descending) and how many entries hold each. bf16 sources pile up
    there: the difference of two close bf16 numbers has at most 9 significant bits, so a bin's entries are a few
    values with many ties each, and which ties a threshold keeps is a matter of position, decided in the pass."""

    nonzero: int
    top: int
    tail: np.ndarray  # uint32, non-decreasing
    exact: dict[int, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return self.tail.nbytes + sum(v.nbytes + c.nbytes for v, c in self.exact.values())

    def bracket(self, k: int) -> tuple[int, int, int]:
        """(bin, above, inside) for the k-th largest magnitude (1 <= k <= nonzero): it lies in `bin`, `above`
        magnitudes are in higher bins, `inside` in that one."""
        r = int(np.searchsorted(self.tail, k, side="left"))
        above = int(self.tail[r - 1]) if r > 0 else 0
        return self.top - r, above, int(self.tail[r]) - above

    def threshold(self, bin: int, need: int) -> tuple[int, int, int] | None:
        """For an exact bin: (value bits, how many of its entries equal it, how many of those a threshold keeping
        the `need` largest of the bin keeps); None for a bin of many values."""
        if bin not in self.exact:
            return None
        values, counts = self.exact[bin]
        cum = np.cumsum(counts)
        at = int(np.searchsorted(cum, need, side="left"))
        return int(values[at]), int(counts[at]), need - (int(cum[at - 1]) if at > 0 else 0)


_HEAVY = 2048  # a bin with more than n / _HEAVY entries is made exact ...
_HEAVY_MIN = 1024  # ... and more than this many
_MAX_VALUES = 256  # ... unless it holds more distinct values (float32 sources: their bins stay few-entry ones)
_SLOTS = 512  # heavy bins counted per pass (a 32 MiB table)
_IDS = 1024  # distinct low-bit patterns the compact count takes (bf16 families: a few hundred) before the direct one


def sketch(base: torch.Tensor, source: torch.Tensor, is_delta: bool) -> Sketch | None:
    """The sketch of `source - base` (of `source` if it is a task vector already); None if it holds inf or NaN
    (those merges go the torch way). One pass over the tensor, two where it has heavy bins."""
    lib = library()
    assert lib is not None
    n = base.numel()
    if n >= 2**32:
        return None  # fused.c counts in uint32
    args = (base.data_ptr(), _DTYPES[base.dtype], source.data_ptr(), _DTYPES[source.dtype], int(is_delta))
    counts = np.zeros(_BINS, dtype=np.uint32)
    zeros = ctypes.c_int64(0)
    lib.fused_sketch(*args, 0, n, counts.ctypes.data, ctypes.addressof(zeros))
    if counts[_NONFINITE_BIN:].any():
        return None
    used = np.flatnonzero(counts)
    if used.size == 0:
        return Sketch(0, 0, np.zeros(1, dtype=np.uint32), {})
    lo, hi = int(used[0]), int(used[-1])
    tail = np.cumsum(counts[lo : hi + 1][::-1], dtype=np.int64).astype(np.uint32)
    exact: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    heavy = np.flatnonzero(counts > max(_HEAVY_MIN, n // _HEAVY))
    for group in range(0, heavy.size, _SLOTS):
        bins = heavy[group : group + _SLOTS]
        slot = np.full(_BINS, -1, dtype=np.int32)
        slot[bins] = np.arange(bins.size, dtype=np.int32)
        for at, (low, count) in enumerate(_bin_values(lib, args, n, slot, bins.size)):
            if low.size <= _MAX_VALUES:
                exact[int(bins[at])] = ((int(bins[at]) << SHIFT) + low.astype(np.uint32), count)
    return Sketch(n - zeros.value, hi, tail, exact)


def _bin_values(lib: ctypes.CDLL, args: tuple, n: int, slot: np.ndarray, slots: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per heavy bin (slot order): the low SHIFT bits of its distinct magnitudes, descending, and how many entries
    hold each. Counted in a compact table (a dense id per low-bit pattern) where the tensor's heavy bins share at
    most _IDS patterns (one pass in L2), else with the patterns themselves as ids (64 KiB per bin)."""
    lut = np.full(1 << SHIFT, 0xFFFF, dtype=np.uint16)
    table = np.zeros((slots, _IDS), dtype=np.uint32)
    if lib.fused_bin_values(*args, n, slot.ctypes.data, lut.ctypes.data, _IDS, table.ctypes.data) < 0:
        lut = np.arange(1 << SHIFT, dtype=np.uint16)  # the identity: no id is ever given
        table = np.zeros((slots, 1 << SHIFT), dtype=np.uint32)
        lib.fused_bin_values(*args, n, slot.ctypes.data, lut.ctypes.data, 1 << SHIFT, table.ctypes.data)
    pattern = np.zeros(table.shape[1], dtype=np.int64)  # id -> low bits
    given = np.flatnonzero(lut != 0xFFFF)
    pattern[lut[given].astype(np.int64)] = given
    out = []
    for at in range(slots):
        seen = np.flatnonzero(table[at])
        order = np.argsort(pattern[seen])[::-1]
        out.append((pattern[seen][order], table[at, seen][order].copy()))
    return out


# ---------------------------------------------------------------------------------------------------- merging
def _usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _DTYPES and t.is_contiguous()


def merge(
    out: torch.Tensor,
    base: torch.Tensor,
    sources: Sequence[tuple[torch.Tensor, bool]],
    spec: MethodSpec,
    model_params: Sequence[dict],
    global_params: dict,
    sketch_of: Callable[[int], Sketch | None],
    threads: int | None = None,
) -> bool:
    """Write base + the merged task vectors into `out`, as `base + merge_task_vectors(...)` rounded to `out`'s
    dtype. `sources`: (tensor, is_delta) per model (is_delta: the tensor is already source - base); parameters with
    defaults filled; `sketch_of(i)`: source i's sketch (built on first use by the caller's cache). False when the
    kernel does not compute this merge, or declines it after the pass (a NaN in the result: torch's bits for a NaN
    are its own business); `out` may then hold part of one and the caller merges the torch way into it, so `out`
    must not share memory with the base or a source."""
    lib = library()
    n = base.numel()
    if (lib is None or not supports(spec, global_params, len(sources)) or n == 0
            or not all(_usable(t) and t.numel() == n for t in (out, base, *(s for s, _ in sources)))):
        return False
    job = _Job(n=n, n_sources=len(sources), base_dtype=_DTYPES[base.dtype], base=base.data_ptr(),
               out=out.data_ptr(), out_dtype=_DTYPES[out.dtype])
    stable = bool(global_params.get("stable_ties", False))
    need: dict[int, int] = {}  # source -> how many magnitudes of its threshold bin it keeps
    inside: dict[int, int] = {}
    for i, ((tensor, is_delta), params) in enumerate(zip(sources, model_params)):
        job.source[i], job.source_dtype[i], job.is_delta[i] = tensor.data_ptr(), _DTYPES[tensor.dtype], int(is_delta)
        job.weight[i] = float(params["weight"])
        mode = "keep_all"
        if spec.sparsifier == "magnitude":
            density = float(params["density"])
            if density <= 0:
                mode = "keep_none"
            elif density < 1:
                k = kept_count(density, n)
                sk = sketch_of(i)
                if sk is None:
                    return False
                if k < sk.nonzero:  # else every nonzero entry is kept (whether a zero is kept changes nothing)
                    job.bin[i], above, count = sk.bracket(k)
                    exact = sk.threshold(job.bin[i], k - above)
                    if exact is not None:  # decided in the pass: above the value kept, ties by position
                        value, equal, keep = exact
                        if not stable and keep != equal:
                            return False  # ties straddle the threshold: mergekit's order comes from its sort only
                        mode, job.value[i], job.quota[i] = "run", value, keep
                    else:
                        mode, inside[i], need[i] = "threshold", count, k - above
        job.mode[i] = _MODES[mode]
    job.consensus = _CONSENSUS[spec.consensus]
    normalize = bool(global_params["normalize"])
    job.normalize = int(normalize)
    if spec.consensus is None and normalize:
        total = sum(float(p["weight"]) for p in model_params)
        job.divide_total, job.total = int(abs(total) >= 1e-8), total
    lam = float(global_params["lambda"])
    job.scale, job.lam = int(lam != 1), lam

    threads = threads or torch.get_num_threads()
    # A RUN source counts its ties from the start of the tensor: one thread then (the caller may merge several
    # tensors at once instead).
    parts = 1 if any(m == _MODES["run"] for m in job.mode[: len(sources)]) else max(1, min(threads, n // _CHUNK_MIN))
    bounds = [n * p // parts for p in range(parts + 1)]
    s = len(sources)
    lists = [_Undecided(min(sum(inside.values()), bounds[p + 1] - bounds[p]), s) for p in range(parts)]

    def run(fn: Callable[[int], object]) -> list:
        if parts == 1:
            return [fn(0)]
        with ThreadPoolExecutor(parts) as pool:  # ctypes lets go of the GIL while C runs
            return list(pool.map(fn, range(parts)))

    jp = ctypes.byref(job)
    if any(run(lambda p: lib.fused_pass(jp, bounds[p], bounds[p + 1], ctypes.byref(lists[p].struct)))):
        return False  # an undecided list overflowed, or the merge holds a NaN (torch writes NaN bits its own way)
    if not need:
        return True
    thresholds = np.zeros(s, dtype=np.float32)
    quotas = np.zeros((parts, s), dtype=np.int64)
    for i, keep in need.items():
        vals = [u.magnitudes(lib, i) for u in lists]
        found = torch.cat(vals)
        if found.numel() != inside[i]:
            return False  # the sketch does not describe this tensor (it changed under us): merge the torch way
        v = torch.kthvalue(found, found.numel() - keep + 1).values
        ties = keep - int(torch.count_nonzero(found > v))
        if not stable and int(torch.count_nonzero(found == v)) != ties:
            return False  # equal magnitudes straddle the threshold: mergekit's order comes from its sort only
        thresholds[i] = float(v)
        for p in range(parts):
            quotas[p, i] = min(ties, int(torch.count_nonzero(vals[p] == v)))
            ties -= int(quotas[p, i])
    if any(run(lambda p: lib.fused_fixup(jp, ctypes.byref(lists[p].struct), thresholds.ctypes.data,
                                         quotas[p].ctypes.data))):
        return False
    return True
