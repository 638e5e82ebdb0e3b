"""Merge methods against their formulas, worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import methods as M
from evomerge.merge import sparsify as S
from evomerge.merge.methods import METHODS, MethodSpec, merge_task_vectors, merge_tensor, validate_params
from evomerge.merge.settings import NON_LAYER_POSITION, layer_position, resolve_setting


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual} != {expected}"


# Three task vectors used by the TIES cases (base = 0, so tensors == deltas).
D1 = T(1.0, -2.0, 3.0, 0.5)
D2 = T(-1.5, 1.0, 2.0, -0.2)
D3 = T(0.6, -0.5, -4.0, 0.1)
ZERO = torch.zeros(4)


# --- task-vector family ----------------------------------------------------------------------


def test_ties_sign_consensus_without_sparsification():
    # Sums per entry: [0.1, -1.5, 1, 0.4] -> majority signs [+, -, +, +].
    # Agreeing values: [1, .6] [-2, -.5] [3, 2] [.5, .1]; each mean over the agreeing weights (2).
    out = merge_tensor("ties", ZERO, [D1, D2, D3], [{"weight": 1.0}] * 3, {})
    close(out, [0.8, -1.25, 2.5, 0.3])


def test_ties_with_density_weights_and_normalisation():
    # density 0.5 keeps the 2 largest |x|: s1 = [0,-2,3,0], s2 = [-1.5,0,2,0], s3 = [.6,0,-4,0]
    # weights 1, .5, 2 -> w*s: [0,-2,3,0], [-.75,0,1,0], [1.2,0,-8,0]; sums [.45,-2,-4,0]
    # entry 0: + agrees: 1.2 (weight 2) -> 0.6; entry 1: -2 (weight 1) -> -2;
    # entry 2: - agrees: -8 (weight 2) -> -4; entry 3: nobody (divisor 0 -> 1) -> 0.
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
    base = T(10.0, 20.0, 30.0, 40.0)
    out = merge_tensor("ties", base, [base + D1, base + D2, base + D3], params, {})
    close(out, base + T(0.6, -2.0, -4.0, 0.0), 1e-5)
    raw = merge_tensor("ties", ZERO, [D1, D2, D3], params, {"normalize": False})
    close(raw, [1.2, -2.0, -8.0, 0.0])
    scaled = merge_tensor("ties", ZERO, [D1, D2, D3], params, {"lambda": 0.5})
    close(scaled, [0.3, -1.0, -2.0, 0.0])


def test_task_arithmetic():
    base = T(1.0, 2.0, 3.0)
    a, c = T(2.0, 2.0, 2.0), T(0.0, 4.0, 3.0)  # deltas [1,0,-1], [-1,2,0]
    params = [{"weight": 0.5}, {"weight": 2.0}]
    # 0.5 * [1,0,-1] + 2 * [-1,2,0] = [-1.5, 4, -0.5]; no normalisation by default
    close(merge_tensor("task_arithmetic", base, [a, c], params, {}), [-0.5, 6.0, 2.5])
    close(merge_tensor("task_arithmetic", base, [a, c], params, {"lambda": 0.5}), [0.25, 4.0, 2.75])
    # normalize divides by the weight sum 2.5
    close(merge_tensor("task_arithmetic", base, [a, c], params, {"normalize": True}), [0.4, 3.6, 2.8])
    # weights summing to 0: no division (guard), plain weighted sum
    zero_sum = [{"weight": 1.0}, {"weight": -1.0}]
    close(merge_tensor("task_arithmetic", base, [a, c], zero_sum, {"normalize": True}), base + T(2.0, -2.0, -1.0))


def test_breadcrumbs_drops_outliers_and_small_values():
    delta = T(0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0)
    # n=10, density .5 -> keep 5; gamma .2 -> 2 outliers; 3 smallest dropped: ranks 3..7 stay.
    out = merge_tensor("breadcrumbs", torch.zeros(10), [delta], [{"weight": 1.0, "density": 0.5, "gamma": 0.2}], {})
    close(out, [0, 0, 0, -0.4, 0.5, -0.6, 0.7, -0.8, 0, 0])
    # density .9 + gamma .2 > 1: outliers shrink to 1 so that 9 entries stay.
    out = merge_tensor("breadcrumbs", torch.zeros(10), [delta], [{"weight": 1.0, "density": 0.9, "gamma": 0.2}], {})
    close(out, [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, 0])
    # density 1 (the default) keeps everything whatever gamma says
    out = merge_tensor("breadcrumbs", torch.zeros(10), [delta], [{"weight": 2.0, "gamma": 0.2}], {})
    close(out, 2 * delta)


def test_breadcrumbs_ties_uses_sign_consensus_without_normalising():
    # density 1: no sparsification; consensus as in the first TIES case but not divided.
    out = merge_tensor("breadcrumbs_ties", ZERO, [D1, D2, D3], [{"weight": 1.0}] * 3, {})
    close(out, [1.6, -2.5, 5.0, 0.6])


def test_count_consensus():
    # No mergekit method uses it, but the family supports it: a table row away.
    spec = MethodSpec(
        name="count_test",
        model_params={"weight": None, "density": 1.0},
        global_params={"normalize": False, "rescale": False, "lambda": 1.0},
        needs_base=True,
        uses_task_vectors=True,
        consensus="count",
    )
    METHODS["count_test"] = spec
    try:
        # signs: entry 0: +,-,- -> majority -; with weights 1,1,1 the values are 1, -1.5, -... etc.
        d1, d2, d3 = T(5.0, 1.0), T(-1.0, -1.0), T(-1.0, 1.0)
        out = merge_tensor("count_test", torch.zeros(2), [d1, d2, d3], [{"weight": 1.0}] * 3, {})
        # entry 0: two negatives outvote one large positive -> -2; entry 1: two + -> 2
        close(out, [-2.0, 2.0])
    finally:
        del METHODS["count_test"]


def test_dare_rescale_keeps_l1_norm_and_density():
    g = torch.Generator().manual_seed(0)
    delta = torch.ones(100_000)
    out = merge_tensor("dare_linear", torch.zeros_like(delta), [delta], [{"weight": 1.0, "density": 0.25}], {}, g)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    # l1-norm rescaling (mergekit's): kept values = n / n_kept, about 1 / density
    assert math.isclose(out.sum().item(), 100_000, rel_tol=1e-5)
    assert abs(out[kept].mean().item() - 4.0) < 0.2
    # without rescale the survivors keep their value
    out = merge_tensor("dare_linear", torch.zeros_like(delta), [delta], [{"weight": 1.0, "density": 0.25}], {"rescale": False}, g)
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_della_keeps_large_entries_more_often():
    g = torch.Generator().manual_seed(0)
    rows = torch.linspace(0.01, 1.0, 100).repeat(4000, 1)  # every row ranks columns the same way
    kept = S.rank_sampling(rows, density=0.5, epsilon=0.2, rescale=False, generator=g) != 0
    freq = kept.float().mean(dim=0)
    assert abs(freq[0].item() - 0.3) < 0.03  # smallest: density - epsilon
    assert abs(freq[-1].item() - 0.7) < 0.03  # largest: density + epsilon
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="epsilon"):
        S.rank_sampling(rows, density=0.9, epsilon=0.2)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_are_seeded(method):
    base = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    models = [base + 0.1 * torch.randn(50, 40, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    params = [{"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.6}]

    def run(seed):
        return merge_tensor(method, base, models, params, {}, torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert METHODS[method].random


# --- other methods -------------------------------------------------------------------------


def test_linear():
    a, b = T(1.0, 2.0), T(3.0, 6.0)
    close(merge_tensor("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], {}), [2.5, 5.0])
    close(merge_tensor("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], {"normalize": False}), [10.0, 20.0])


def test_slerp():
    v0, v1 = T(1.0, 0.0), T(0.0, 1.0)
    s = math.sqrt(0.5)
    close(merge_tensor("slerp", v0, [v1], [{}], {"t": 0.5}), [s, s])
    close(merge_tensor("slerp", v0, [v1], [{}], {"t": 0.0}), v0)  # t = 0 is the base
    close(merge_tensor("slerp", v0, [v1], [{}], {"t": 1.0}), v1)
    # angle 90 degrees, unequal norms: coefficients sin(45 deg) / sin(90 deg) on the raw vectors
    close(merge_tensor("slerp", T(2.0, 0.0), [v1], [{}], {"t": 0.5}), [2 * s, s])
    # nearly colinear: plain linear interpolation
    a, b = T(1.0, 2.0), T(2.0, 4.001)
    close(merge_tensor("slerp", a, [b], [{}], {"t": 0.25}), 0.75 * a + 0.25 * b)


def test_nuslerp_and_model_stock():
    v0, v1 = T(1.0, 0.0), T(0.0, 1.0)
    # t = w1 / (w0 + w1) = 0.75 on the quarter circle
    out = merge_tensor("nuslerp", None, [v0, v1], [{"weight": 1.0}, {"weight": 3.0}], {})
    close(out, [math.sin(0.25 * math.pi / 2), math.sin(0.75 * math.pi / 2)])
    # with a base it interpolates the task vectors
    base = T(5.0, 5.0)
    out = merge_tensor("nuslerp", base, [base + v0, base + v1], [{"weight": 1.0}, {"weight": 1.0}], {})
    s = math.sqrt(0.5)
    close(out, base + T(s, s), 1e-5)
    # model stock: cos([1,1],[1,0]) = 1/sqrt2; t = 2c / (1 + c); result t * mean of deltas
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = merge_tensor("model_stock", torch.zeros(2), [T(1.0, 1.0), T(1.0, 0.0)], [{}, {}], {})
    close(out, [t * 1.0, t * 0.5])
    # orthogonal deltas: t = 0, the base
    close(merge_tensor("model_stock", T(1.0, 1.0), [T(2.0, 1.0), T(1.0, 2.0)], [{}, {}], {}), [1.0, 1.0])


def test_passthrough_is_a_copy():
    x = T(1.0, -2.0)
    out = merge_tensor("passthrough", None, [x], [{}], {})
    close(out, x)
    out.add_(1)
    close(x, [1.0, -2.0])
    close(merge_tensor("passthrough", None, [x], [{"scale": 2.0}], {}), [2.0, -4.0])


# --- the hot path ----------------------------------------------------------------------------


def _params_for(name: str, n: int) -> tuple[list[dict], dict]:
    spec = METHODS[name]
    mp = [{k: v for k, v in {"weight": 0.4 + 0.3 * i, "density": 0.5 + 0.1 * i}.items() if k in spec.model_params} for i in range(n)]
    gp = {"t": 0.3} if name in ("slerp", "nearswap") else {}
    return mp, gp


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merge_task_vectors_equals_merge_tensor_minus_base(name):
    spec = METHODS[name]
    n = spec.max_models or 3
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(30, 20, generator=gen)
    models = [base + 0.1 * torch.randn(30, 20, generator=gen) for _ in range(n)]
    deltas = [m - base for m in models]
    snapshot = [d.clone() for d in deltas]
    mp, gp = _params_for(name, n)
    validate_params(name, mp, gp)
    full = merge_tensor(name, base, models, mp, gp, torch.Generator().manual_seed(5))
    delta = merge_task_vectors(name, deltas, mp, gp, torch.Generator().manual_seed(5), base=base)
    assert delta.dtype == torch.float32
    assert torch.allclose(full - base, delta, atol=1e-5)
    assert all(torch.equal(d, s) for d, s in zip(deltas, snapshot))  # inputs untouched


def test_merge_task_vectors_without_base():
    d = [T(1.0, 0.0), T(0.0, 1.0)]
    close(merge_task_vectors("ties", d, [{"weight": 1.0}, {"weight": 1.0}], {}), [1.0, 1.0])
    close(merge_task_vectors("linear", d, [{"weight": 1.0}, {"weight": 3.0}], {}), [0.25, 0.75])
    with pytest.raises(ValueError, match="base"):
        merge_task_vectors("slerp", d[:1], [{}], {"t": 0.5})


def test_bfloat16_inputs_compute_in_float32():
    base = torch.zeros(4, dtype=torch.bfloat16)
    out = merge_tensor("ties", base, [D1.bfloat16(), D2.bfloat16(), D3.bfloat16()], [{"weight": 1.0}] * 3, {})
    close(out, [0.8, -1.25, 2.5, 0.3], 1e-2)


# --- sparsifiers -----------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.01, 0.1, 0.33, 0.5, 0.9, 0.999])
def test_magnitude_keeps_exact_fraction(density):
    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(0))
    out = S.magnitude(x, density)
    k = max(1, int(density * x.numel()))
    assert int((out != 0).sum()) == k
    # the kept ones are the largest
    assert out.abs()[out != 0].min() >= x.abs()[out == 0].max()


def test_magnitude_exact_with_ties_and_large_tensors():
    # low-precision deltas tie a lot; and > 1M entries take the sampled selection path
    x = torch.randn(1200, 1000, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    for density in (0.2, 0.7):
        out = S.magnitude(x, density)
        assert int((out != 0).sum()) == int(density * x.numel())
    assert torch.equal(S.magnitude(x, 1.0), x)
    assert torch.equal(S.magnitude(x, 0.0), torch.zeros_like(x))


def test_magnitude_rescale_matches_l1():
    x = T(0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0)
    out = S.magnitude(x, 0.3, rescale=True)  # keeps -.8, .9, -1 (l1 2.7) scaled to 5.5
    close(out, T(0, 0, 0, 0, 0, 0, 0, -0.8, 0.9, -1.0) * (5.5 / 2.7))


def _mergekit_window(x: torch.Tensor, lo: int, hi: int, tie_order: str) -> torch.Tensor:
    """The entries mergekit keeps for ascending ranks [lo, hi), from the sort call it makes."""
    n = x.numel()
    idx = torch.argsort(x, descending=True)[n - hi : n - lo] if tie_order == "descending" else torch.sort(x).indices[lo:hi]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


@pytest.mark.parametrize("tie_order", ["ascending", "descending"])
def test_rank_window_mask_selects_like_mergekit(tie_order):
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        # odd trials: many equal values, so ties straddle the window's edges
        x = torch.randint(0, 4, (n,), generator=gen).float() if trial % 2 else torch.rand(n, generator=gen)
        lo, hi = sorted(int(v) for v in torch.randint(0, n + 1, (2,), generator=gen))
        mask = S.rank_window_mask(x, lo, hi, tie_order=tie_order)
        assert int(mask.sum()) == hi - lo
        assert torch.equal(mask, _mergekit_window(x, lo, hi, tie_order))


@pytest.mark.parametrize("n", [31, 5000, 600_000])
def test_rank_cache_gives_identical_masks(n):
    """With cached sorted magnitudes, every window equals the uncached one, ties straddling or not."""
    gen = torch.Generator().manual_seed(n)
    for delta in (torch.randn(n, generator=gen), torch.randint(-3, 4, (n,), generator=gen).float()):  # floats; heavy ties
        rank = S.RankCache(delta)
        for density in (0.05, 0.3, 0.5, 0.77, 0.99):
            assert torch.equal(S.magnitude(delta, density, rank=rank), S.magnitude(delta, density))
            assert torch.equal(S.magnitude_outliers(delta, density, gamma=0.02, rank=rank),
                               S.magnitude_outliers(delta, density, gamma=0.02))


def test_magnitude_ties_at_the_cut_on_a_large_tensor_follow_mergekit():
    """Large tensors take the sampled selection path; a tie straddling the cut must still match."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3_000_000, generator=gen)
    k = int(0.31 * x.numel())
    cut = torch.kthvalue(x.abs(), x.numel() - k + 1).values
    x[::1000] = cut  # 3000 equal magnitudes exactly at the cut
    assert int((x.abs() > cut).sum()) < k < int((x.abs() >= cut).sum())  # the tie straddles it
    kept = S.magnitude(x, 0.31) != 0
    assert int(kept.sum()) == k
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    expected[torch.argsort(x.abs(), descending=True)[:k]] = True
    assert torch.equal(kept, expected)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, model_params, global_params, message",
    [
        ("tie", [{"weight": 1.0}], {}, "Did you mean 'ties'"),
        ("ties", [{"weight": 1.0, "densty": 0.5}], {}, "densty.*Did you mean 'density'"),
        ("ties", [{"weight": 1.0, "density": 1.5}], {}, r"density \(model 0\): must be in \[0, 1\]"),
        ("ties", [{"density": 0.5}], {}, r"weight \(model 0\): required"),
        ("ties", [{"weight": 1.0}], {"lamda": 0.5}, "Did you mean 'lambda'"),
        ("ties", [{"weight": 1.0}], {"normalize": 0.5}, "normalize: must be true or false"),
        ("breadcrumbs", [{"weight": 1.0, "gamma": -0.1}], {}, r"gamma \(model 0\): must be in \[0, 1\]"),
        ("della", [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}], {}, "epsilon.*density"),
        ("della", [{"weight": 1.0, "epsilon": 1.0}], {}, r"epsilon \(model 0\): must be in \[0, 1\)"),
        ("slerp", [{}], {}, "t: required"),
        ("slerp", [{}], {"t": 2.0}, r"t: must be in \[0, 1\]"),
        ("linear", [{"weight": float("nan")}], {}, "weight"),
    ],
)
def test_validation_errors(method, model_params, global_params, message):
    with pytest.raises(ValueError, match=message):
        validate_params(method, model_params, global_params)


@pytest.mark.parametrize("method, n, message", [("slerp", 2, "exactly 1"), ("nuslerp", 1, "exactly 2"), ("model_stock", 1, "at least 2"), ("passthrough", 0, "exactly 1")])
def test_model_count(method, n, message):
    with pytest.raises(ValueError, match=message):
        M.check_model_count(method, n)
    with pytest.raises(ValueError, match=message):
        merge_tensor(method, torch.zeros(2), [torch.ones(2)] * n, [{"weight": 1.0}] * n, {"t": 0.5})


def test_validation_accepts_defaults_and_top_level_model_params():
    validate_params("ties", [{"weight": 1.0}, {"weight": 0.5, "density": 0.3}], {"density": 0.5, "int8_mask": True})
    validate_params("della", [{"weight": 1.0, "density": 0.5}], {"epsilon": 0.1})
    validate_params("passthrough", [{}], {})
    # a top-level model parameter is every model's default
    out = merge_tensor("ties", ZERO, [D1], [{"weight": 1.0}], {"density": 0.25})
    close(out, [0.0, 0.0, 3.0, 0.0])


# --- settings --------------------------------------------------------------------------------


def test_resolve_scalars_and_gradients():
    assert resolve_setting(0.3, "x", 0.7) == 0.3
    assert resolve_setting(True, "x", 0.7) is True
    grad = [0.0, 1.0, 0.5]  # anchors at t = 0, 0.5, 1
    assert resolve_setting(grad, "x", 0.0) == 0.0
    assert resolve_setting(grad, "x", 0.25) == pytest.approx(0.5)
    assert resolve_setting(grad, "x", 0.5) == pytest.approx(1.0)
    assert resolve_setting(grad, "x", 0.75) == pytest.approx(0.75)
    assert resolve_setting(grad, "x", 1.0) == pytest.approx(0.5)
    assert resolve_setting([0.2], "x", 0.6) == pytest.approx(0.2)
    assert resolve_setting([False, True], "x", 0.9) is False  # bools pick an anchor
    assert resolve_setting("1e-3", "x", 0.0) == pytest.approx(0.001)  # YAML 1.1 string


def test_resolve_filters():
    setting = [
        {"filter": "self_attn", "value": 0.7},
        {"filter": "mlp", "value": [0.2, 0.8]},
        {"value": 0.5},
    ]
    assert resolve_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.7
    assert resolve_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_setting(setting, "model.layers.0.mlp.up_proj.weight", 1.0) == pytest.approx(0.8)
    assert resolve_setting(setting, "lm_head.weight", 1.0) == 0.5
    # first match wins; no match falls through (None); "*" matches everything
    assert resolve_setting([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None
    assert resolve_setting([{"filter": "*", "value": 1.0}], "lm_head.weight", 0.0) == 1.0
    assert resolve_setting({"filter": "lm_head", "value": 2.0}, "lm_head.weight", 0.0) == 2.0
    with pytest.raises(ValueError, match="allowed: filter, value"):
        resolve_setting([{"filtr": "mlp", "value": 1.0}], "x", 0.0)
    with pytest.raises(ValueError):
        resolve_setting("abc", "x", 0.0)


def test_layer_position():
    assert [layer_position(i, 4) for i in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert layer_position(0, 1) == 1.0  # a one-layer slice sits at the end, as in mergekit
    assert NON_LAYER_POSITION == 0.0
    with pytest.raises(ValueError):
        layer_position(4, 4)


def test_table_rows_match_mergekit_defaults():
    expected = {
        # name: (sparsifier, consensus, normalize, rescale)
        "task_arithmetic": (None, None, False, False),
        "ties": ("magnitude", "sum", True, False),
        "dare_ties": ("random", "sum", False, True),
        "dare_linear": ("random", None, False, True),
        "breadcrumbs": ("magnitude_outliers", None, False, False),
        "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
        "della": ("rank_sampling", "sum", True, True),
        "della_linear": ("rank_sampling", None, False, True),
    }
    for name, (sparsifier, consensus, normalize, rescale) in expected.items():
        spec = METHODS[name]
        assert (spec.sparsifier, spec.consensus) == (sparsifier, consensus)
        assert spec.global_params["normalize"] is normalize and spec.global_params["rescale"] is rescale
        assert spec.global_params["lambda"] == 1.0 and spec.model_params["density"] == 1.0
        assert spec.model_params["weight"] is None and spec.needs_base and spec.uses_task_vectors
    assert METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert METHODS["della"].model_params["epsilon"] == 0.15
    assert M.METHODS["linear"].global_params["normalize"] is True
    assert METHODS["nuslerp"].accepts_base and not METHODS["nuslerp"].needs_base
    assert not METHODS["linear"].accepts_base


# --- the methods mergekit 0.1.5 added (issue 15); their goldens are in tests/golden ------------------------

MERGEKIT_METHODS = {
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough", "sce", "nearswap",
    "arcee_fusion", "ram", "ramplus_tl",
}


def test_the_table_holds_every_mergekit_method_with_its_defaults():
    assert MERGEKIT_METHODS <= set(METHODS) and len(MERGEKIT_METHODS) == 20
    defaults = {
        "multislerp": ({"weight": None}, {"normalize_weights": True, "eps": 1e-8}),
        "karcher": ({}, {"max_iter": 10, "tol": 1e-5}),
        "sce": ({}, {"select_topk": 1.0, "int8_mask": False}),
        "nearswap": ({}, {"t": None}),
        "arcee_fusion": ({}, {}),
        "ram": ({}, {"epsilon": 1e-5}),
        "ramplus_tl": ({}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    }
    for name, (model_params, global_params) in defaults.items():
        assert dict(METHODS[name].model_params) == model_params, name
        assert dict(METHODS[name].global_params) == global_params, name
        assert not METHODS[name].random, name
    assert [m for m in defaults if METHODS[m].needs_base] == ["sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]
    assert METHODS["karcher"].base_is_input and not METHODS["karcher"].accepts_base
    assert METHODS["multislerp"].accepts_base and not METHODS["multislerp"].needs_base


def test_multislerp_is_the_normalised_mean_direction_times_the_mean_norm():
    # Units [1,0], [0,1], weights 1:3 -> direction [1,3]/sqrt(10); norms 3 and 1 -> radius .25*3 + .75*1 = 1.5.
    v0, v1 = T(3.0, 0.0), T(0.0, 1.0)
    want = torch.tensor([1.0, 3.0]) / math.sqrt(10) * 1.5
    close(merge_tensor("multislerp", None, [v0, v1], [{"weight": 1.0}, {"weight": 3.0}], {}), want, 1e-6)
    # with a base it works on the task vectors
    base = T(1.0, -1.0)
    close(merge_tensor("multislerp", base, [base + v0, base + v1], [{"weight": 1.0}, {"weight": 3.0}], {}),
          base + want, 1e-6)
    # unnormalised weights scale the radius (and not the direction): .5*3 + 1.5*1 = 3
    out = merge_tensor("multislerp", None, [v0, v1], [{"weight": 0.5}, {"weight": 1.5}], {"normalize_weights": False})
    close(out, torch.tensor([1.0, 3.0]) / math.sqrt(10) * 3.0, 1e-6)
    # antipodal inputs whose weights cancel: the weighted sum (mergekit raises for more than two)
    three = [T(1.0, 0.0), T(-1.0, 0.0), T(0.0, 2.0)]
    close(merge_tensor("multislerp", None, three, [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}], {}), [0.0, 0.0])
    # one model: that model
    close(merge_tensor("multislerp", base, [v0], [{"weight": 0.2}], {}), v0)


def test_karcher_is_the_mean_angle_on_the_circle_times_the_mean_norm():
    # Directions 0, 90 and 0 degrees: the Karcher mean is their mean angle, 30 degrees (the Euclidean mean of the
    # unit vectors points at atan(1/2) = 26.57 degrees, where max_iter 0 stops); norms 2, 1, 3 -> radius 2.
    inputs = [T(2.0, 0.0), T(0.0, 1.0), T(3.0, 0.0)]
    close(merge_tensor("karcher", None, inputs, [{}] * 3, {}), [2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)])
    euclid = math.atan2(1, 2)
    close(merge_tensor("karcher", None, inputs, [{}] * 3, {"max_iter": 0}), [2 * math.cos(euclid), 2 * math.sin(euclid)])
    # an input of norm <= tol has no direction: out of the mean, but its norm (0) still counts in the radius
    out = merge_tensor("karcher", None, [T(2.0, 0.0), T(0.0, 2.0), T(0.0, 0.0)], [{}] * 3, {})
    close(out, [4 / 3 * math.cos(math.pi / 4), 4 / 3 * math.sin(math.pi / 4)])


def test_sce_selects_by_variance_weighs_by_energy_and_erases_by_sign():
    # select_topk 1: majority signs by sum [+, -, +, +]; weights are the mean squares 3.5625, 1.8225, 4.155.
    w = [3.5625, 1.8225, 4.155]
    want = [
        (w[0] * 1.0 + w[2] * 0.6) / (w[0] + w[2]),
        (w[0] * -2.0 + w[2] * -0.5) / (w[0] + w[2]),
        (w[0] * 3.0 + w[1] * 2.0) / (w[0] + w[1]),
        (w[0] * 0.5 + w[2] * 0.1) / (w[0] + w[2]),
    ]
    close(merge_tensor("sce", ZERO, [D1, D2, D3], [{}] * 3, {}), want, 1e-6)
    # select_topk .5: only entries 1 and 2 (the largest variances across the models, 1.5 and 9.56) stay; the
    # weights become the masked mean squares 3.25, 1.25, 4.0625; entries 0 and 3 keep the base.
    base = T(1.0, 2.0, 3.0, 4.0)
    out = merge_tensor("sce", base, [base + D1, base + D2, base + D3], [{}] * 3, {"select_topk": 0.5})
    close(out, base + T(0.0, (3.25 * -2 + 4.0625 * -0.5) / 7.3125, (3.25 * 3 + 1.25 * 2) / 4.5, 0.0), 1e-5)
    close(merge_tensor("sce", base, [base + D1], [{}], {"select_topk": 0.0}), base)


def test_nearswap_moves_to_the_model_by_t_over_the_distance():
    base = T(1.0, 1.0, 1.0, 1.0)
    model = base + T(0.05, 0.2, -1.0, 0.0)  # shares of the way: min(1, .1 / |d|) = 1, .5, .1, 1
    close(merge_tensor("nearswap", base, [model], [{}], {"t": 0.1}), base + T(0.05, 0.1, -0.1, 0.0), 1e-6)
    close(merge_task_vectors("nearswap", [model - base], [{}], {"t": 0.1}), [0.05, 0.1, -0.1, 0.0], 1e-6)
    close(merge_tensor("nearswap", base, [model], [{}], {"t": 0.0}), base)


def test_arcee_fusion_keeps_only_the_outlying_changes():
    # One row: its KL term is one positive number, so importance ranks as |change|. Sorted |change| at
    # floor(q * 7) = 1, 3, 5 gives q1 .2, median .4, q3 .6 (times the KL): the threshold .4 + 1.5 * .4 = 1 keeps 3.0.
    base = torch.zeros(1, 8)
    change = T(0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, 3.0).reshape(1, 8)
    out = merge_tensor("arcee_fusion", base, [base + change], [{}], {})
    close(out, torch.zeros(1, 8).index_fill_(1, torch.tensor([7]), 3.0))
    # the model's row that is identical to the base's has KL 0: none of its entries is kept
    two = torch.cat([change, change])
    assert merge_tensor("arcee_fusion", two, [torch.cat([two[:1] * 2, two[1:]])], [{}], {})[1].equal(two[1])


def test_ram_takes_a_lone_change_and_the_mean_of_shared_ones():
    # |delta| > .15 marks a change: model 1 changes entries 0 and 2, model 2 entries 0 and 1 (its .1 is no change)
    d1, d2 = T(0.5, 0.0, 0.3, 0.01), T(0.4, 0.2, 0.1, 0.0)
    close(merge_task_vectors("ram", [d1, d2], [{}, {}], {"epsilon": 0.15}), [0.45, 0.2, 0.3, 0.0], 1e-6)
    base = T(1.0, 2.0, 3.0, 4.0)
    close(merge_tensor("ram", base, [base + d1, base + d2], [{}, {}], {"epsilon": 0.15}), base + T(0.45, 0.2, 0.3, 0.0), 1e-6)
    # RAM+: each model shares one change and has one of its own, rho = 1: own changes times 1 + r * min(rho, alpha)
    plus = merge_task_vectors("ramplus_tl", [d1, d2], [{}, {}], {"epsilon": 0.15, "r": 0.5, "alpha": 0.2})
    close(plus, [0.45, 0.2 * 1.1, 0.3 * 1.1, 0.0], 1e-6)
    plus = merge_task_vectors("ramplus_tl", [d1, d2], [{}, {}], {"epsilon": 0.15, "r": 0.5, "alpha": 2.0})
    close(plus, [0.45, 0.2 * 1.5, 0.3 * 1.5, 0.0], 1e-6)


@pytest.mark.parametrize(
    "method, model_params, global_params, message",
    [
        ("nearswap", [{}], {"t": -0.1}, r"t: must be in \[0, inf\]"),
        ("nearswap", [{}], {}, "t: required"),
        ("karcher", [{}], {"max_iter": 2.5}, "max_iter: must be a whole number"),
        ("sce", [{}], {"select_topk": 1.5}, r"select_topk: must be in \[0, 1\]"),
        ("sce", [{"weight": 1.0}], {}, "weight \\(model 0\\): not a per-model parameter of sce"),
        ("ramplus_tl", [{}], {"alpha": -1.0}, "alpha: must be in"),
        ("multislerp", [{}], {}, r"weight \(model 0\): required"),
    ],
)
def test_validation_errors_of_the_new_methods(method, model_params, global_params, message):
    with pytest.raises(ValueError, match=message):
        validate_params(method, model_params, global_params)
    validate_params("nearswap", [{}], {"t": 5.0})  # t is a distance: above 1 is fine


@pytest.mark.parametrize("method, n", [("nearswap", 2), ("arcee_fusion", 2), ("arcee_fusion", 0)])
def test_one_model_methods_refuse_more_or_none(method, n):
    with pytest.raises(ValueError, match="exactly 1"):
        M.check_model_count(method, n)
