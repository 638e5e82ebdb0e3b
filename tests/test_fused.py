"""The one-pass CPU merge kernel (evomerge/merge/fused.c) against the torch path, bit for bit.

Every case asserts that the kernel ran (merge returned True) before comparing, so a silent fall-back to the torch
path cannot pass for the kernel. Sizes are chosen to reach each way a threshold is found: heavy bf16 bins decided
in the pass by position (RUN), float32 bins resolved after it (the undecided list and its fix-up, over several
threads), densities 0 and 1, all nonzero entries kept, k = 1. Each bit-for-bit case runs twice: through the pass's
one-loop fast path (asserted to have merged blocks where the job is one it serves) and with it turned off (the
stage-by-stage loops, which still serve the block where a quota runs out, float16 and more than 4 sources).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.merge import fused
from evomerge.merge.materialise import Materialiser
from evomerge.merge.methods import METHODS, _merge_deltas, _with_defaults
from evomerge.merge.recipe import parse_recipe
from evomerge.zoo.shapes import llama_config, write_random_family

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C compiler: the kernel cannot be built here")


@pytest.fixture(params=[1, 0], ids=["fast", "staged"], autouse=True)
def fast_path(request):
    """The pass with its fast path on (1) and off (0); yields the fast path's block counter."""
    lib = fused.library()
    flag = ctypes.c_int.in_dll(lib, "fused_fast")
    blocks = ctypes.c_int64.in_dll(lib, "fused_fast_blocks")
    flag.value = request.param
    blocks.value = 0
    yield request.param, blocks
    flag.value = 1


# (sources' dtype, output dtype) the fast path has instances for (float32 task vectors: either output)
FAST_DTYPES = {(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)}


def blocks_of(n: int) -> int:
    return -(-n // 256)  # fused.c's BLOCK


def family(n: int, dtype: torch.dtype, sources: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes as checkpoints hold them: small task vectors, some entries untouched (zero deltas)."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(n, generator=g) * 0.02
    base = base32.to(dtype)
    out = []
    for i in range(sources):
        tuned = base32 + torch.randn(n, generator=g) * 0.001 * (i + 1)
        untouched = torch.rand(n, generator=g) < 0.05
        tuned[untouched] = base32[untouched]  # some entries left as they were: zero task-vector entries
        out.append(tuned.to(dtype))
    return base, out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def run_both(method: str, base, sources, params, extra, out_dtype=torch.float32, *, as_deltas=False, threads=1,
             spec=None):
    """(fused result or None if it declined, the torch path's result) for base + merge."""
    spec = spec or METHODS[method]
    models, globals_ = _with_defaults(spec, params, extra)
    deltas = [s.float() - base.float() for s in sources]
    reference = torch.add(base.float(), _merge_deltas(spec, deltas, models, globals_, None)).to(out_dtype)
    kernel_base = base.float() if as_deltas else base
    inputs = [(d, True) for d in deltas] if as_deltas else [(s, False) for s in sources]
    cache: dict[int, fused.Sketch | None] = {}

    def sketch_of(i):
        if i not in cache:
            cache[i] = fused.sketch(kernel_base, *inputs[i])
        return cache[i]

    out = torch.full(base.shape, float("nan"), dtype=out_dtype)
    ok = fused.merge(out, kernel_base, inputs, spec, models, globals_, sketch_of, threads=threads)
    return (out if ok else None), reference


def ways(base, sources, params, as_deltas=False) -> list[str]:
    """How the kernel finds each source's threshold: "run" (an exact heavy bin, decided in the pass) or "after"
    (a bin of many values, resolved from the undecided list)."""
    out = []
    for s, p in zip(sources, params):
        sk = fused.sketch(base.float() if as_deltas else base, s.float() - base.float() if as_deltas else s, as_deltas)
        k = max(1, int(p["density"] * base.numel()))
        bin_, above, _ = sk.bracket(k)
        out.append("run" if sk.threshold(bin_, k - above) is not None else "after")
    return out


THREE = [{"weight": 0.5, "density": 0.3}, {"weight": 0.3, "density": 0.6}, {"weight": 0.4, "density": 0.9}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_stable_every_dtype(dtype, out_dtype, fast_path):
    base, sources = family(200_003, dtype, 3)
    if dtype == torch.bfloat16:
        assert ways(base, sources, THREE) == ["run", "run", "after"]  # both ways, in one merge
    got, want = run_both("ties", base, sources, THREE, {"stable_ties": True}, out_dtype)
    assert got is not None
    assert torch.equal(bits(got), bits(want))
    served = fast_path[0] and (dtype, out_dtype) in FAST_DTYPES
    # every block but the one where a RUN source's quota runs out (bf16: two of them; float32 has none)
    blocks, runs = blocks_of(200_003), 2 if dtype == torch.bfloat16 else 0
    assert (blocks - runs <= fast_path[1].value <= blocks) if served else fast_path[1].value == 0


@pytest.mark.parametrize("extra", [{}, {"normalize": True}, {"normalize": True, "lambda": 0.7}, {"lambda": -1.5}])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_task_arithmetic(extra, dtype, fast_path):
    base, sources = family(100_000, dtype, 3, seed=1)
    params = [{"weight": 0.5}, {"weight": -0.25}, {"weight": 1.1}]
    got, want = run_both("task_arithmetic", base, sources, params, extra, torch.bfloat16)
    assert got is not None
    assert torch.equal(bits(got), bits(want))
    # served where the sources and the output share a dtype (bf16 here): every block
    assert fast_path[1].value == (blocks_of(100_000) if fast_path[0] and dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("params", [
    [{"weight": -0.5, "density": 0.0}, {"weight": 0.3, "density": 1.0}, {"weight": 0.4, "density": 0.5}],
    [{"weight": 0.5, "density": 0.999}, {"weight": 0.3, "density": 1e-9}],  # every nonzero kept; k = 1
    [{"weight": 1.0, "density": 0.5}],
])
@pytest.mark.parametrize("extra", [{"stable_ties": True}, {"stable_ties": True, "normalize": False, "lambda": 0.5}])
def test_ties_edges(params, extra):
    base, sources = family(50_001, torch.bfloat16, len(params), seed=2)
    got, want = run_both("ties", base, sources, params, extra)
    assert got is not None
    assert torch.equal(bits(got), bits(want))


def test_float32_layout_task_vectors_over_threads(fast_path):
    """Task vectors given as float32 deltas (the float32 layout), a float32 family (bins of many values: resolved
    after the pass from the undecided list, which the fast path fills too) split over three threads."""
    base, sources = family(3 * (1 << 20) + 17, torch.float32, 3, seed=3)
    assert ways(base, sources, THREE, as_deltas=True) == ["after"] * 3
    got, want = run_both("ties", base, sources, THREE, {"stable_ties": True}, as_deltas=True, threads=3)
    assert got is not None
    assert torch.equal(bits(got), bits(want))
    n = base.numel()
    assert fast_path[1].value == (sum(blocks_of(n * (p + 1) // 3 - n * p // 3) for p in range(3)) if fast_path[0] else 0)


def test_consensus_by_count():
    spec = dataclasses.replace(METHODS["ties"], consensus="count")
    base, sources = family(100_000, torch.bfloat16, 3, seed=4)
    got, want = run_both("ties", base, sources, THREE, {"stable_ties": True}, spec=spec)
    assert got is not None
    assert torch.equal(bits(got), bits(want))


def test_mergekit_tie_order_declines_where_ties_straddle():
    """Without stable_ties, bf16 ties straddle the threshold (only mergekit's sort orders them): the kernel says
    no and the caller's torch path gives mergekit's tensors. Where no tie straddles (float32, distinct values
    around the threshold), it computes the very same result."""
    base, sources = family(100_000, torch.bfloat16, 3, seed=5)
    got, _ = run_both("ties", base, sources, THREE, {})
    assert got is None
    g = torch.Generator().manual_seed(6)
    base = torch.randn(10_000, generator=g, dtype=torch.float64).float()
    sources = [(base.double() + torch.randn(10_000, generator=g, dtype=torch.float64) * 0.01).float() for _ in range(2)]
    got, want = run_both("ties", base, sources, THREE[:2], {})
    assert got is not None and torch.equal(bits(got), bits(want))


def test_a_nan_in_the_merge_is_left_to_torch():
    """torch writes a NaN's bf16 bits its own way: a merge whose result holds one is declined after the pass, and a
    TIES source with a NaN has no sketch (declined before)."""
    base, sources = family(10_000, torch.bfloat16, 2, seed=8)
    sources[1][123] = float("nan")
    got, _ = run_both("task_arithmetic", base, sources, [{"weight": 0.5}, {"weight": 0.5}], {}, torch.bfloat16)
    assert got is None
    got, _ = run_both("ties", base, sources, THREE[:2], {"stable_ties": True}, torch.bfloat16)
    assert got is None
    assert fused.sketch(base, sources[1], False) is None


@pytest.mark.parametrize("ids", [1024, 1], ids=["compact", "direct"])
def test_sketch_brackets_every_rank(ids, monkeypatch):
    """The bin a rank falls in, and the exact value a heavy bin gives it, against a sort; the heavy bins' values
    counted in the compact table and (with room for one low-bit pattern only) in the direct one."""
    monkeypatch.setattr(fused, "_IDS", ids)
    base, sources = family(30_000, torch.bfloat16, 1, seed=7)
    mags = (sources[0].float() - base.float()).abs()
    sk = fused.sketch(base, sources[0], False)
    assert sk is not None and sk.nonzero == int(torch.count_nonzero(mags))
    ordered = mags.sort(descending=True).values
    keys = ordered.view(torch.int32) >> fused.SHIFT
    for k in [1, 2, 17, 1000, 9_999, sk.nonzero - 1, sk.nonzero]:
        bin_, above, inside = sk.bracket(k)
        assert int(keys[k - 1]) == bin_
        assert above == int((keys > bin_).sum()) and inside == int((keys == bin_).sum())
        exact = sk.threshold(bin_, k - above)
        if exact is not None:
            value, equal, keep = exact
            assert value == int(ordered[k - 1].view(torch.int32))
            assert equal == int((ordered == ordered[k - 1]).sum())
            assert keep == k - int((ordered > ordered[k - 1]).sum())
    assert sk.exact, "a bf16 family has heavy bins"
    assert max(len(v) for v, _ in sk.exact.values()) >= 2  # bins of several values: their order is checked
    bits_ = ordered.view(torch.int32).numpy()
    for b, (values, counts) in sk.exact.items():  # every heavy bin: its values, descending, and their counts
        want, many = np.unique(bits_[(bits_ >> fused.SHIFT) == b], return_counts=True)
        assert values.tolist() == want[::-1].tolist() and counts.tolist() == many[::-1].tolist(), b


def test_materialiser_uses_the_kernel_and_matches_the_torch_path(tmp_path, monkeypatch):
    cfg = llama_config(64, 2, intermediate=128, heads=2, kv_heads=1, vocab=512)
    paths = write_random_family(tmp_path, cfg, experts=3, seed=2)
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "bfloat16",
                           "parameters": {"stable_ties": True},
                           "models": [{"model": str(paths[k]), "parameters": {"weight": 0.4, "density": 0.5}}
                                      for k in paths if k != "base"]})
    mat = Materialiser(paths, "base")
    module = mat.build_module(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # several tensors at once, one thread each
        mat.apply(recipe, module)
        assert len(mat.sketches) == 3 * len(mat.checkpoints["base"].names())  # every tensor went through the kernel
        fast = {n: t.clone() for n, t in module.state_dict().items()}
        torch.set_num_threads(1)
        mat.apply(recipe, module)
        for name, t in module.state_dict().items():
            assert torch.equal(t, fast[name]), name
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    slow_mat = Materialiser(paths, "base")
    slow_mat.apply(recipe, module)
    assert not slow_mat.sketches
    for name, t in module.state_dict().items():
        assert torch.equal(t, fast[name]), name


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    code = ("import warnings, torch\n"
            "from evomerge.merge import fused\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert fused.library() is None and fused.library() is None\n"
            "print(len(w), str(w[0].message))\n")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    count, message = res.stdout.strip().split(" ", 1)
    assert count == "1" and "could not be built" in message and "torch way" in message
