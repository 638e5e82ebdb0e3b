"""Parameter-space merge methods: one table, one generalized task-vector merge, a few others.

The table holds all 20 methods of mergekit 0.1.5, with its parameter names, defaults and semantics (checked
against its tensors in tests/golden); where evomerge departs (a weight sum of ~0, mergekit's sampled quantiles)
the function's docstring says so.

Every task-vector method (task arithmetic, TIES, DARE, DELLA, Model Breadcrumbs) is the same
computation, configured by two choices, as in mergekit:

1. a sparsifier applied to each task vector (delta = model - base), see `sparsify.py`;
2. a consensus rule deciding, per entry, which models may contribute:
   - None: all of them;
   - "sum": only models whose weighted delta has the sign of the sum of weighted deltas (TIES);
   - "count": only models whose weighted delta has the sign most models have.

merged delta = lambda * sum_i(w_i * s_i * m_i) / divisor, where s_i is the sparsified delta, m_i
the consensus mask and, with `normalize`, divisor = sum_i(w_i * m_i) per entry (1 where that is
0), or sum_i(w_i) without consensus (1 where that is ~0). Adding such a method is one row in
`_TASK_VECTOR_ROWS`.

Everything is computed in float32 (inputs of other dtypes are upcast) and returned in float32, unless a
half-precision recipe asks for mergekit's numbers (`compute_dtype: recipe`: `merge_tensor(compute=...)`,
`_merge_deltas_rounded` and each row's `combine_rounded`, which follow mergekit's steps in its dtypes).
`merge_task_vectors` is the search's hot path: deltas are precomputed once per worker, and the
merge never stacks them (it accumulates model by model), so memory stays at a few tensors.

Why one module of about 1200 lines: the table, the maths each row names and the parameter checks each row's
values go through are read together (a method is a row); split apart, a reader would jump between three files to
follow one method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evomerge.config import suggest
from evomerge.merge.sparsify import RANKED, SPARSIFIERS, RankCache, check_epsilon

ModelParams = Mapping[str, float]
GlobalParams = Mapping[str, "float | bool"]
# (base or None, tensors, per-model params with defaults, global params with defaults) -> merged
Combine = Callable[[Tensor | None, Sequence[Tensor], list[dict], dict], Tensor]
# Same on task vectors; returns None when the result cannot be written without the base.
CombineDeltas = Callable[[Sequence[Tensor], list[dict], dict], "Tensor | None"]


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method needs and how it is computed.

    `model_params` / `global_params` map each accepted parameter to its default (None: required).
    Task-vector methods (`uses_task_vectors`) are fully described by `sparsifier` and
    `consensus`; the others carry their own `combine` (and `combine_deltas` where the result
    can be written from task vectors alone).
    """

    name: str
    model_params: Mapping[str, float | None]
    global_params: Mapping[str, float | bool | None]
    needs_base: bool
    random: bool = False
    # Takes a base when the recipe names one, even if it can do without (nuslerp then merges the
    # task vectors). Methods with needs_base always do. Linear does not: there a base is just
    # another weighted model.
    accepts_base: bool = False
    uses_task_vectors: bool = False
    sparsifier: str | None = None  # key of sparsify.SPARSIFIERS
    consensus: str | None = None  # None, "sum" or "count"
    combine: Combine | None = None
    combine_deltas: CombineDeltas | None = None
    # The same merge on half-precision inputs with mergekit 0.1.5's steps, each in the dtype mergekit takes it in
    # (`compute_dtype: recipe`, for its bits). None: `combine` computes in float32 from the rounded inputs.
    combine_rounded: Combine | None = None
    min_models: int = 1  # number of non-base models accepted
    max_models: int | None = None
    # The base, when the recipe names one, is one more input like the others (mergekit adds it to the sources
    # and a method that ignores bases averages it in: karcher).
    base_is_input: bool = False
    # Allowed values where this method's meaning of a parameter differs from `_RANGES` (nearswap's t is a
    # distance, not a fraction).
    ranges: Mapping[str, "_Range"] = field(default_factory=dict)
    # Said by `to_mergekit` whenever a recipe of this method is exported: where mergekit's tensors may differ.
    mergekit_note: str = ""
    reference: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The generalized task-vector merge


def _consensus_sign(contributions: Sequence[Tensor], rule: str) -> Tensor:
    """+1 / -1 per entry: the sign a model's weighted delta must have to take part."""
    vote = torch.zeros_like(contributions[0])
    for c in contributions:
        vote.add_(c if rule == "sum" else torch.sign(c))
    # Ties (vote == 0) go to +1, as in mergekit.
    return torch.where(vote >= 0, 1.0, -1.0)


def _merge_deltas(
    spec: MethodSpec,
    deltas: Sequence[Tensor],
    model_params: list[dict],
    global_params: dict,
    generator: torch.Generator | None,
    ranks: Sequence[RankCache | None] | None = None,
) -> Tensor:
    normalize = bool(global_params["normalize"])
    rescale = bool(global_params["rescale"])
    lam = float(global_params["lambda"])
    sparsify = SPARSIFIERS[spec.sparsifier] if spec.sparsifier else None

    weights = [float(p["weight"]) for p in model_params]
    contributions: list[Tensor] = []
    for i, (delta, params, weight) in enumerate(zip(deltas, model_params, weights)):
        delta = original = delta.float()
        if sparsify is not None:
            kwargs: dict = {"rescale": rescale}
            if spec.sparsifier == "magnitude_outliers":
                kwargs["gamma"] = float(params["gamma"])
            elif spec.sparsifier == "rank_sampling":
                kwargs["epsilon"] = float(params["epsilon"])
            if spec.random:
                kwargs["generator"] = generator
            if spec.sparsifier in RANKED:
                if ranks is not None:
                    kwargs["rank"] = ranks[i]
                kwargs["stable_ties"] = bool(global_params.get("stable_ties", False))
            delta = sparsify(delta, float(params["density"]), **kwargs)
        # Callers' deltas are never written: scale in place only a tensor the sparsifier made.
        contributions.append(delta * weight if delta is original else delta.mul_(weight))

    if spec.consensus is None:
        mixed = contributions[0]
        for c in contributions[1:]:
            mixed.add_(c)
        if normalize:
            total = sum(weights)
            if abs(total) >= 1e-8:
                mixed.div_(total)
    else:
        sign = _consensus_sign(contributions, spec.consensus)
        mixed = torch.zeros_like(contributions[0])
        divisor = torch.zeros_like(mixed) if normalize else None
        for c, weight in zip(contributions, weights):
            # sign(c) == majority sign; entries with c == 0 never agree.
            agree = (c * sign) > 0
            mixed.add_(c.mul_(agree))  # c is ours (made above): mask it in place
            if divisor is not None:
                divisor.add_(agree.float(), alpha=weight)
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1.0)
            mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed


def _model_sum(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Sum over the models as torch reduces a stack of half-precision tensors: in float32, rounded once."""
    acc = tensors[0].float()
    for t in tensors[1:]:
        acc = acc + t.float()
    return acc.to(dtype)


def _merge_deltas_rounded(
    spec: MethodSpec,
    deltas: Sequence[Tensor],
    model_params: list[dict],
    global_params: dict,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Tensor:
    """The task-vector merge computed in a half-precision `dtype`, rounded where mergekit 0.1.5 rounds.

    mergekit keeps a half-precision recipe's tensors in its dtype throughout: each elementwise step is rounded
    to it, the weights too (a tensor of that dtype), and each sum over the models is a reduction of the stacked
    tensors, which torch takes in float32 and rounds once. This follows the same steps, for mergekit's bits
    (`compute_dtype: recipe`); `_merge_deltas` is the float32 path everything else uses.
    """
    normalize = bool(global_params["normalize"])
    lam = float(global_params["lambda"])
    sparsify = SPARSIFIERS[spec.sparsifier] if spec.sparsifier else None
    device = deltas[0].device
    weights = torch.tensor([float(p["weight"]) for p in model_params], dtype=dtype, device=device)
    contributions: list[Tensor] = []
    for i, (delta, params) in enumerate(zip(deltas, model_params)):
        delta = delta.to(dtype)
        if sparsify is not None:
            kwargs: dict = {"rescale": bool(global_params["rescale"])}
            if spec.sparsifier == "magnitude_outliers":
                kwargs["gamma"] = float(params["gamma"])
            elif spec.sparsifier == "rank_sampling":
                kwargs["epsilon"] = float(params["epsilon"])
            if spec.random:
                kwargs["generator"] = generator
            if spec.sparsifier in RANKED:
                kwargs["stable_ties"] = bool(global_params.get("stable_ties", False))
            delta = sparsify(delta, float(params["density"]), **kwargs)
        contributions.append(delta * weights[i])
    if spec.consensus is None:
        mixed = _model_sum(contributions, dtype)
        divisor = _model_sum(list(weights), dtype)
        if abs(float(divisor)) < 1e-8:
            divisor = torch.ones((), dtype=dtype, device=device)
    else:
        if spec.consensus == "sum":
            sign = torch.where(_model_sum(contributions, dtype) >= 0, 1.0, -1.0)
        else:
            sign = torch.where(_model_sum([torch.sign(c) for c in contributions], dtype) >= 0, 1.0, -1.0)
        agree = [(c * sign) > 0 for c in contributions]
        mixed = _model_sum([c * a for c, a in zip(contributions, agree)], dtype)
        divisor = _model_sum([weights[i] * a for i, a in enumerate(agree)], dtype)
        divisor = divisor.masked_fill(divisor == 0, 1.0)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


# ---------------------------------------------------------------------------------------------
# Methods outside the task-vector family


def _linear(base, tensors, model_params, global_params) -> Tensor:
    """Weighted average of the inputs (the base takes part only if listed among `tensors`).

    In float32 with mergekit's steps (weights and their sum as float32 tensors, one multiply-add per model),
    so that a half-precision recipe rounds to mergekit's bits (`compute_dtype: recipe`).
    """
    weights = torch.tensor([float(p["weight"]) for p in model_params], dtype=torch.float32, device=tensors[0].device)
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        out.addcmul_(tensor.float(), weight)
    total = weights.sum()
    # mergekit divides even by 0 (inf/nan); a sum of ~0 is left unnormalised instead.
    if global_params["normalize"] and abs(float(total)) >= 1e-8:
        out.div_(total)
    return out


def _linear_deltas(deltas, model_params, global_params) -> Tensor | None:
    weights = [float(p["weight"]) for p in model_params]
    total = sum(weights)
    if not global_params["normalize"] or abs(total) < 1e-8:
        return None  # sum_i w_i * base does not cancel: the base is needed
    out = torch.zeros_like(deltas[0], dtype=torch.float32)
    for delta, weight in zip(deltas, weights):
        out.add_(delta.float(), alpha=weight / total)
    return out


SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this counts as colinear: interpolate linearly
SLERP_NORM_EPS = 1e-8


# mergekit takes norms over chunks of this many entries, then the norm of the chunks' norms: the same for the bits.
SLERP_CHUNK = 1 << 20


def _chunked_norm(flat: Tensor) -> Tensor:
    parts = [torch.linalg.vector_norm(flat[i:i + SLERP_CHUNK]) for i in range(0, flat.numel(), SLERP_CHUNK)]
    return torch.linalg.vector_norm(torch.stack(parts))


def slerp_coefficients(v0: Tensor, v1: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """(c0, c1), 0-d float32 tensors, with slerp(t, v0, v1) = c0 * v0 + c1 * v1 over the flattened tensors.

    The angle is that between v0 and v1 seen as single vectors, each normalised before the dot product, in
    float32 with mergekit's steps (so half-precision recipes round to its bits). Nearly colinear (or opposite)
    vectors fall back to linear interpolation, where the spherical formula divides by ~0.
    """
    a = v0.reshape(-1).float()
    b = v1.reshape(-1).float()
    # A (near-)zero vector is used unnormalised, as in mergekit.
    norm_a, norm_b = _chunked_norm(a), _chunked_norm(b)
    norm_a = torch.where(norm_a > SLERP_NORM_EPS, norm_a, 1.0)
    norm_b = torch.where(norm_b > SLERP_NORM_EPS, norm_b, 1.0)
    products = (a / norm_a) * (b / norm_b)
    dot = torch.stack([products[i:i + SLERP_CHUNK].sum() for i in range(0, products.numel(), SLERP_CHUNK)])
    dot = dot.sum().clamp(-1, 1)
    t_ = torch.tensor(t, dtype=torch.float32, device=a.device)
    if float(dot.abs()) > SLERP_DOT_THRESHOLD:
        return 1 - t_, t_
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t_) * theta) / sin_theta, torch.sin(t_ * theta) / sin_theta


def _slerp(base, tensors, model_params, global_params) -> Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1)."""
    v0 = base.float()
    v1 = tensors[0].float()
    c0, c1 = slerp_coefficients(v0, v1, float(global_params["t"]))
    return c0 * v0 + c1 * v1


def nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool = False, flatten: bool = True) -> Tensor:
    """Slerp between v0 (t = 0) and v1 (t = 1), per vector.

    With `flatten` the whole tensor is one vector; otherwise each row (the last dimension) is
    one, or each column (dimension 0) with `row_wise`, mergekit's naming. Colinear vectors fall
    back to linear interpolation.
    """
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    b_unit = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (a_unit * b_unit).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin_theta
    out = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _nuslerp_t(model_params) -> float:
    w0, w1 = (float(p["weight"]) for p in model_params)
    return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


def _nuslerp_in(base: Tensor | None, a: Tensor, b: Tensor, model_params, global_params) -> Tensor:
    """Slerp between two models at t = w1 / (w0 + w1); with a base, between their task vectors. Every step is
    in the inputs' dtype (half precision: mergekit's roundings, its norms and dot products torch's reductions)."""
    t = _nuslerp_t(model_params)
    row_wise = bool(global_params["nuslerp_row_wise"])
    flatten = bool(global_params["nuslerp_flatten"])
    if base is None:
        return nuslerp(t, a, b, row_wise, flatten)
    return base + nuslerp(t, a - base, b - base, row_wise, flatten)


def _nuslerp(base, tensors, model_params, global_params) -> Tensor:
    return _nuslerp_in(base.float() if base is not None else None, tensors[0].float(), tensors[1].float(),
                       model_params, global_params)


def _nuslerp_rounded(base, tensors, model_params, global_params) -> Tensor:
    return _nuslerp_in(base, tensors[0], tensors[1], model_params, global_params)


def _nuslerp_deltas(deltas, model_params, global_params) -> Tensor:
    return nuslerp(
        _nuslerp_t(model_params),
        deltas[0].float(),
        deltas[1].float(),
        bool(global_params["nuslerp_row_wise"]),
        bool(global_params["nuslerp_flatten"]),
    )


def _model_stock_deltas(deltas, model_params, global_params) -> Tensor:
    """Model Stock: move from the base towards the average by a ratio set by the deltas' angle.

    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the N task vectors (whole
    tensor, or per row with `filter_wise`); t = 0 (keep the base) where the denominator is ~0.
    """
    shape = deltas[0].shape
    if global_params["filter_wise"]:
        flat = [d.float().reshape(1, -1) if d.dim() < 2 else d.float() for d in deltas]
    else:
        flat = [d.float().reshape(-1) for d in deltas]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in flat]
    cosines = [
        ((flat[i] * flat[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(flat))
        for j in range(i + 1, len(flat))
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(flat)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    mean = sum(flat) / n
    return (t * mean).reshape(shape)


def _model_stock(base, tensors, model_params, global_params) -> Tensor:
    base = base.float()
    deltas = [x.float() - base for x in tensors]
    return base + _model_stock_deltas(deltas, model_params, global_params)


def _model_stock_rounded(base, tensors, model_params, global_params) -> Tensor:
    """Model Stock in the inputs' half dtype with mergekit's steps: every step rounded, each norm and dot product
    one torch reduction, and the result written as t * (mean of the models) + (1 - t) * base, mergekit's form
    (in float32 `_model_stock_deltas` moves the base by t * the mean task vector, the same number)."""
    shape = base.shape
    if global_params["filter_wise"]:
        anchor = base.unsqueeze(0) if base.dim() == 1 else base
        models = [x.unsqueeze(0) for x in tensors] if base.dim() == 1 else list(tensors)
    else:
        anchor, models = base.reshape(-1), [x.reshape(-1) for x in tensors]
    offsets = [x - anchor for x in models]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]
    cosines = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    total = models[0]
    for x in models[1:]:
        total = total + x
    return (t * (total / n) + (1 - t) * anchor).reshape(shape)


def _passthrough(base, tensors, model_params, global_params) -> Tensor:
    """The single input unchanged (optionally times `scale`); a copy, never an alias."""
    scale = model_params[0].get("scale")
    out = tensors[0].to(torch.float32, copy=True)
    return out.mul_(float(scale)) if scale is not None else out


def _passthrough_deltas(deltas, model_params, global_params) -> Tensor | None:
    if model_params[0].get("scale") is not None:
        return None
    return deltas[0].to(torch.float32, copy=True)


def _multislerp_vectors(vectors: Sequence[Tensor], model_params, global_params) -> Tensor:
    """Weighted mean of `vectors` on the sphere (mergekit's multislerp), each tensor one flattened vector.

    The unit vectors' weighted Euclidean mean, normalised, is the tangent point; the weighted mean of the unit
    vectors' tangent components is mapped back onto the sphere (exponential map) and scaled by the weighted mean
    of the norms. Where the weighted mean of the unit vectors is ~0 (antipodal inputs whose weights cancel),
    the weighted sum of the vectors is returned: mergekit does the same for two vectors and raises for more,
    which would stop a search on one candidate.
    """
    shape = vectors[0].shape
    if len(vectors) == 1:
        return vectors[0].to(torch.float32, copy=True)
    eps = float(global_params["eps"])
    weights = [float(p["weight"]) for p in model_params]
    total = sum(weights)
    # mergekit divides even by 0 (nan); a sum of ~0 is left unnormalised instead, as linear does.
    if global_params["normalize_weights"] and abs(total) >= 1e-8:
        weights = [w / total for w in weights]
    flat = [v.float().reshape(-1) for v in vectors]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    units = [f / (n + eps) for f, n in zip(flat, norms)]
    centre = torch.zeros_like(units[0])
    for u, w in zip(units, weights):
        centre.add_(u * w)
    centre_norm = torch.linalg.vector_norm(centre)
    if float(centre_norm) < eps:
        out = torch.zeros_like(flat[0])
        for f, w in zip(flat, weights):
            out.add_(f * w)
        return out.reshape(shape)
    centre = centre / centre_norm
    tangent = torch.zeros_like(centre)
    for u, w in zip(units, weights):
        tangent.add_((u - (u * centre).sum() * centre) * w)
    length = torch.linalg.vector_norm(tangent) + eps
    on_sphere = centre * torch.cos(length) + tangent * (torch.sin(length) / length)
    radius = sum(n * w for n, w in zip(norms, weights))
    return (on_sphere * radius).reshape(shape)


def _multislerp(base, tensors, model_params, global_params) -> Tensor:
    """Multislerp of the models, or with a base, of their task vectors (one model: that model unchanged)."""
    if base is None or len(tensors) == 1:
        return _multislerp_vectors(tensors, model_params, global_params)
    base = base.float()
    return base + _multislerp_vectors([x.float() - base for x in tensors], model_params, global_params)


def _multislerp_rounded(base, tensors, model_params, global_params) -> Tensor:
    """Multislerp in the inputs' half dtype with mergekit's steps: the weights a tensor of that dtype, every
    step rounded, each norm and each sum over the models (or over a vector) one torch reduction of the stacked
    vectors (accumulated in float32, rounded once). Same fallback as `_multislerp_vectors` where the weighted
    mean of the unit vectors is ~0."""
    if len(tensors) == 1:
        return tensors[0].clone()
    eps = float(global_params["eps"])
    stacked = torch.stack(tensors)
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(len(tensors), -1)
    weights = torch.tensor([float(p["weight"]) for p in model_params], dtype=flat.dtype, device=flat.device)
    total = weights.sum()
    if global_params["normalize_weights"] and abs(float(total)) >= 1e-8:
        weights = weights / total
    column = weights.reshape(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    centre = (units * column).sum(dim=0)
    centre_norm = torch.linalg.vector_norm(centre)
    if float(centre_norm) < eps:
        out = flat[0] * weights[0]
        for f, w in zip(flat[1:], weights[1:]):
            out = out + f * w
    else:
        centre = centre / centre_norm
        tangent = ((units - (units * centre).sum(dim=-1, keepdim=True) * centre) * column).sum(dim=0)
        length = torch.linalg.vector_norm(tangent) + eps
        on_sphere = centre * torch.cos(length) + tangent * (torch.sin(length) / length)
        out = on_sphere * (norms.reshape(-1) * weights).sum()
    out = out.reshape(tensors[0].shape)
    return out + base if base is not None else out


def _karcher(base, tensors, model_params, global_params) -> Tensor:
    """Karcher (Riemannian) mean of the inputs' directions on the unit sphere, times their mean norm.

    Every input counts equally (the base too: `base_is_input`, so the plan passes it among `tensors` and `base`
    is unused). The mean starts at the normalised Euclidean mean
    of the unit vectors and takes up to `max_iter` exponential-map steps along the mean log map, stopping once
    the step is below `tol`; inputs of norm <= tol have no direction and are left out of the mean, but not of
    the norm. Computed in float32 with mergekit's order of operations.
    """
    if len(tensors) == 1:
        return tensors[0].to(torch.float32, copy=True)
    return _karcher_in([x.float() for x in tensors], global_params)


def _karcher_rounded(base, tensors, model_params, global_params) -> Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    return _karcher_in(tensors, global_params)


def _karcher_in(tensors: Sequence[Tensor], global_params) -> Tensor:
    """`_karcher`'s steps in the inputs' dtype, norms in float32 (0-d tensors, which leave a product's or a
    quotient's dtype alone): in half precision, mergekit's roundings."""
    max_iter, tol = int(global_params["max_iter"]), float(global_params["tol"])
    shape = tensors[0].shape
    flat = [x.reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(f.float()) for f in flat]
    share = 1.0 / len(flat)
    live = [i for i, n in enumerate(norms) if float(n) > tol]
    if not live:
        return torch.zeros(shape, dtype=flat[0].dtype, device=flat[0].device)
    units = [flat[i] / norms[i] for i in live]
    live_total = sum(share for _ in live)
    alphas = [share / live_total for _ in live]
    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.float())
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            step += a * (angle / torch.sin(angle)) * (u - cos * mean)
        step_norm = torch.linalg.vector_norm(step.float())
        if float(step_norm) < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        length = torch.linalg.vector_norm(mean.float())
        if float(length) > tol:
            mean = mean / length
    radius = sum(share * n for n in norms)
    return (radius * mean).reshape(shape)


def _sce_deltas(deltas, model_params, global_params) -> Tensor:
    """SCE (select, calculate, erase) on task vectors.

    Select: with `select_topk` < 1, keep only the entries whose variance across the models' task vectors is
    among the top fraction (of the entries where it is non-zero), in every task vector. Calculate: each model's
    weight is the mean square of its (selected) task vector, normalised over the models (equal weights when
    they sum to < 1e-6). Erase: per entry, only task vectors with the sign of their plain sum take part
    (TIES' sign consensus); merged = sum(w_i * d_i over them) / sum(w_i over them), clamped at 1e-6.
    """
    stacked = _sce_select(torch.stack([d.float() for d in deltas]), float(global_params["select_topk"]))
    sign = _consensus_sign(list(stacked), "sum")
    energy = stacked.square().reshape(len(deltas), -1).mean(dim=1)
    total = float(energy.sum())
    energy = torch.full_like(energy, 1.0 / len(deltas)) if abs(total) < 1e-6 else energy / total
    weights = energy.reshape(-1, *([1] * (stacked.dim() - 1))) * ((stacked * sign) > 0)
    return (stacked * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _sce_select(stacked: Tensor, topk: float) -> Tensor:
    """The stacked task vectors with only the `topk` fraction of highest-variance entries kept (in their dtype)."""
    if topk >= 1:
        return stacked
    keep = torch.zeros_like(stacked[0])
    if topk > 0:
        spread = torch.var(stacked, dim=0, unbiased=False)
        k = int(torch.count_nonzero(spread) * topk)  # as mergekit rounds it (a float32 product)
        if k > 0:
            keep.view(-1)[torch.topk(spread.abs().view(-1), k=k, largest=True).indices] = 1.0
    return stacked * keep


def _sce(base, tensors, model_params, global_params) -> Tensor:
    base = base.float()
    return base + _sce_deltas([x.float() - base for x in tensors], model_params, global_params)


def _sce_rounded(base, tensors, model_params, global_params) -> Tensor:
    """SCE in the inputs' half dtype with mergekit's steps: the variance, mean squares and sums over the models
    are torch's reductions of the stacked task vectors (accumulated in float32, rounded once), the sign vote
    too; every other step is rounded."""
    stacked = _sce_select(torch.stack([x - base for x in tensors]), float(global_params["select_topk"]))
    agree = (stacked * torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)) > 0
    energy = stacked.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    energy = torch.ones_like(energy) / len(tensors) if abs(total) < 1e-6 else energy / total
    weights = energy.reshape(-1, *([1] * (stacked.dim() - 1))) * agree
    return base + (stacked * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _nearswap_share(distance: Tensor, t: float) -> Tensor:
    """How far each entry moves from the base to the model: all the way where they are within t, t / distance
    beyond (distances below 1e-6 count as 1e-6)."""
    return (t / distance.abs().clamp(min=1e-6)).clamp(0, 1)


def _nearswap_mix(a: Tensor, b: Tensor, t: float) -> Tensor:
    """share * b + (1 - share) * a, each step in the inputs' dtype (in half precision: mergekit's roundings)."""
    share = _nearswap_share(a - b, t)
    return share * b + (1 - share) * a


def _nearswap(base, tensors, model_params, global_params) -> Tensor:
    """NearSwap: take the model's value where it is close to the base's, interpolate towards it elsewhere."""
    return _nearswap_mix(base.float(), tensors[0].float(), float(global_params["t"]))


def _nearswap_rounded(base, tensors, model_params, global_params) -> Tensor:
    return _nearswap_mix(base, tensors[0], float(global_params["t"]))


def _nearswap_deltas(deltas, model_params, global_params) -> Tensor:
    delta = deltas[0].float()
    return _nearswap_share(delta, float(global_params["t"])) * delta


ARCEE_FUSION_EPS = 1e-8


def _arcee_fusion(base, tensors, model_params, global_params) -> Tensor:
    """Arcee Fusion: keep the model's value only where its change matters most, the base's elsewhere.

    Importance of an entry = |model - base| * KL(softmax(model row) || softmax(base row)), rows along the last
    dimension; the model's value is kept where importance >= median + 1.5 * (q3 - q1), the quantiles being the
    sorted importances at floor(q * (n - 1)). mergekit estimates those quantiles from a random sample of 10^6
    entries for larger tensors; evomerge takes them exactly (deterministic, equal below that size).
    """
    a, b = base.float(), tensors[0].float()
    return a + (b - a) * _arcee_fusion_keep(a, b)


def _arcee_fusion_rounded(base, tensors, model_params, global_params) -> Tensor:
    """Arcee Fusion in the inputs' half dtype with mergekit's steps; mergekit's mask is float32, which promotes
    the last two steps, and the result, to float32."""
    return base + (tensors[0] - base) * _arcee_fusion_keep(base, tensors[0]).float()


def _arcee_fusion_keep(a: Tensor, b: Tensor) -> Tensor:
    """Where the model's value is kept (bool), every step in the inputs' dtype."""
    p = torch.softmax(b, dim=-1) + ARCEE_FUSION_EPS
    q = torch.softmax(a, dim=-1) + ARCEE_FUSION_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (b - a).abs() * divergence
    flat = importance.reshape(-1)
    q1, median, q3 = (torch.kthvalue(flat, int(f * (flat.numel() - 1)) + 1).values for f in (0.25, 0.5, 0.75))
    return importance >= median + 1.5 * (q3 - q1)


def _ram_deltas(deltas, model_params, global_params, plus: bool = False) -> Tensor:
    """RAM (reinforced agent merging): an entry changed (|delta| > epsilon) by one model alone takes that
    model's change; one changed by several takes the mean of their changes; the rest stay at the base.

    `plus` (RAM+, tensor-local): a model's own (unique) changes are scaled by 1 + r * min(rho, alpha), rho =
    the model's shared changed entries over its unique ones (within this tensor): a model that shares much of
    what it changes has its unique changes reinforced.
    """
    epsilon = float(global_params["epsilon"])
    flat = [d.float().reshape(-1) for d in deltas]
    changed = [f.abs() > epsilon for f in flat]
    count = torch.zeros_like(flat[0], dtype=torch.int64)
    for c in changed:
        count += c
    alone, shared = count == 1, count > 1
    divisor = count.clamp(min=1)
    out = torch.zeros_like(flat[0])
    for f, c in zip(flat, changed):
        kept = f * c
        own = kept * alone
        if plus:
            rho = (c & shared).sum() / (c & alone).sum().clamp(min=epsilon)
            own = own * (1 + float(global_params["r"]) * rho.clamp(min=0, max=float(global_params["alpha"])))
        out += own + kept * shared / divisor
    return out.reshape(deltas[0].shape)


def _ramplus_deltas(deltas, model_params, global_params) -> Tensor:
    return _ram_deltas(deltas, model_params, global_params, plus=True)


def _ram(base, tensors, model_params, global_params) -> Tensor:
    base = base.float()
    return base + _ram_deltas([x.float() - base for x in tensors], model_params, global_params)


def _ramplus(base, tensors, model_params, global_params) -> Tensor:
    base = base.float()
    return base + _ramplus_deltas([x.float() - base for x in tensors], model_params, global_params)


def _ram_rounded(base, tensors, model_params, global_params, plus: bool = False) -> Tensor:
    """RAM (and with `plus` RAM+) in the inputs' half dtype with mergekit's steps: each model's term rounded
    per step, the terms summed as torch reduces a stack. RAM+'s factor is a float32 tensor in mergekit, which
    promotes a model's unique changes, and so the sum and the result, to float32."""
    epsilon = float(global_params["epsilon"])
    flat = [(x - base).reshape(-1) for x in tensors]
    changed = [f.abs() > epsilon for f in flat]
    count = torch.zeros_like(flat[0], dtype=torch.int64)
    for c in changed:
        count += c
    alone, shared = count == 1, count > 1
    divisor = count.clamp(min=1)
    terms = []
    for f, c in zip(flat, changed):
        kept = f * c
        own = kept * alone
        if plus:
            rho = (c & shared).sum() / (c & alone).sum().clamp(min=epsilon)
            factor = 1 + float(global_params["r"]) * rho.clamp(min=0, max=float(global_params["alpha"]))
            own = own.float() * factor
        terms.append(own + kept * shared / divisor)
    return base + torch.stack(terms).sum(dim=0).reshape(base.shape)


def _ramplus_rounded(base, tensors, model_params, global_params) -> Tensor:
    return _ram_rounded(base, tensors, model_params, global_params, plus=True)


# ---------------------------------------------------------------------------------------------
# The table

@dataclass(frozen=True)
class _Range:
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return math.isfinite(x) and above and below

    def __str__(self) -> str:
        if math.isinf(self.lo) and math.isinf(self.hi):
            return "any finite number"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


_ANY = _Range(-math.inf, math.inf)
_AT_LEAST_0 = _Range(0, math.inf)


# name, sparsifier, consensus, default normalize, default rescale, reference
_TASK_VECTOR_ROWS: list[tuple[str, str | None, str | None, bool, bool, str]] = [
    ("task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089"),
    ("ties", "magnitude", "sum", True, False, "https://arxiv.org/abs/2306.01708"),
    ("dare_ties", "random", "sum", False, True, "https://arxiv.org/abs/2311.03099"),
    ("dare_linear", "random", None, False, True, "https://arxiv.org/abs/2311.03099"),
    ("breadcrumbs", "magnitude_outliers", None, False, False, "https://arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", "magnitude_outliers", "sum", False, False, "https://arxiv.org/abs/2312.06795"),
    ("della", "rank_sampling", "sum", True, True, "https://arxiv.org/abs/2406.11617"),
    ("della_linear", "rank_sampling", None, False, True, "https://arxiv.org/abs/2406.11617"),
]

_RANDOM_SPARSIFIERS = {"random", "rank_sampling"}
# Per-model parameter a sparsifier adds, with mergekit's default.
_SPARSIFIER_PARAMS: dict[str, dict[str, float]] = {
    "magnitude_outliers": {"gamma": 0.01},
    "rank_sampling": {"epsilon": 0.15},
}


def _task_vector_method(name, sparsifier, consensus, normalize, rescale, reference) -> MethodSpec:
    model_params: dict[str, float | None] = {"weight": None, "density": 1.0}
    model_params.update(_SPARSIFIER_PARAMS.get(sparsifier or "", {}))
    # int8_mask is accepted for mergekit recipes; it only saves memory there. stable_ties (magnitude methods
    # only; evomerge's own): equal magnitudes at a threshold kept by position, without mergekit's full sort.
    global_params = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    if sparsifier in RANKED:
        global_params["stable_ties"] = False
    return MethodSpec(
        name=name,
        model_params=model_params,
        global_params=global_params,
        needs_base=True,
        accepts_base=True,
        random=sparsifier in _RANDOM_SPARSIFIERS,
        uses_task_vectors=True,
        sparsifier=sparsifier,
        consensus=consensus,
        reference=reference,
    )


METHODS: dict[str, MethodSpec] = {
    row[0]: _task_vector_method(*row) for row in _TASK_VECTOR_ROWS
}
METHODS.update(
    {
        "linear": MethodSpec(
            name="linear",
            model_params={"weight": None},
            global_params={"normalize": True},
            needs_base=False,
            combine=_linear,
            combine_deltas=_linear_deltas,
            reference="https://arxiv.org/abs/2203.05482",
        ),
        "slerp": MethodSpec(
            name="slerp",
            model_params={},
            global_params={"t": None},
            needs_base=True,
            accepts_base=True,
            combine=_slerp,
            min_models=1,
            max_models=1,
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
        "nuslerp": MethodSpec(
            name="nuslerp",
            model_params={"weight": None},
            global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
            needs_base=False,
            accepts_base=True,  # with a base it interpolates the task vectors
            combine=_nuslerp,
            combine_deltas=_nuslerp_deltas,
            combine_rounded=_nuslerp_rounded,
            min_models=2,
            max_models=2,
        ),
        "model_stock": MethodSpec(
            name="model_stock",
            model_params={},
            global_params={"filter_wise": False},
            needs_base=True,
            accepts_base=True,
            combine=_model_stock,
            combine_deltas=_model_stock_deltas,
            combine_rounded=_model_stock_rounded,
            min_models=2,
            reference="https://arxiv.org/abs/2403.19522",
        ),
        "passthrough": MethodSpec(
            name="passthrough",
            model_params={"scale": None},  # optional: None means "no scaling"
            global_params={},
            needs_base=False,
            combine=_passthrough,
            combine_deltas=_passthrough_deltas,
            min_models=1,
            max_models=1,
        ),
        "multislerp": MethodSpec(
            name="multislerp",
            model_params={"weight": None},
            global_params={"normalize_weights": True, "eps": 1e-8},
            needs_base=False,
            accepts_base=True,  # with a base it interpolates the task vectors
            combine=_multislerp,
            combine_deltas=_multislerp_vectors,
            combine_rounded=_multislerp_rounded,
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        ),
        "karcher": MethodSpec(
            name="karcher",
            model_params={},
            global_params={"max_iter": 10, "tol": 1e-5},
            needs_base=False,
            base_is_input=True,
            combine=_karcher,
            combine_rounded=_karcher_rounded,
            reference="https://arxiv.org/abs/2603.04972",
        ),
        "sce": MethodSpec(
            name="sce",
            model_params={},
            global_params={"select_topk": 1.0, "int8_mask": False},
            needs_base=True,
            accepts_base=True,
            combine=_sce,
            combine_deltas=_sce_deltas,
            combine_rounded=_sce_rounded,
            reference="https://arxiv.org/abs/2408.07990",
        ),
        "nearswap": MethodSpec(
            name="nearswap",
            model_params={},
            global_params={"t": None},
            needs_base=True,
            accepts_base=True,
            combine=_nearswap,
            combine_deltas=_nearswap_deltas,
            combine_rounded=_nearswap_rounded,
            min_models=1,
            max_models=1,
            ranges={"t": _AT_LEAST_0},  # a distance in weight units, not a fraction
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        ),
        "arcee_fusion": MethodSpec(
            name="arcee_fusion",
            model_params={},
            global_params={},
            needs_base=True,
            accepts_base=True,
            combine=_arcee_fusion,
            combine_rounded=_arcee_fusion_rounded,
            min_models=1,
            max_models=1,
            mergekit_note=(
                "arcee_fusion: for tensors of more than 10^6 entries mergekit estimates its quantile threshold from "
                "a random sample, evomerge takes it exactly, so such tensors may differ; --format model reproduces ours"
            ),
            reference="https://arcee.ai",
        ),
        "ram": MethodSpec(
            name="ram",
            model_params={},
            global_params={"epsilon": 1e-5},
            needs_base=True,
            accepts_base=True,
            combine=_ram,
            combine_deltas=_ram_deltas,
            combine_rounded=_ram_rounded,
            ranges={"epsilon": _AT_LEAST_0},
            reference="https://arxiv.org/abs/2601.13572",
        ),
        "ramplus_tl": MethodSpec(
            name="ramplus_tl",
            model_params={},
            global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
            needs_base=True,
            accepts_base=True,
            combine=_ramplus,
            combine_deltas=_ramplus_deltas,
            combine_rounded=_ramplus_rounded,
            ranges={"epsilon": _AT_LEAST_0, "r": _AT_LEAST_0, "alpha": _AT_LEAST_0},
            reference="https://arxiv.org/abs/2601.13572",
        ),
    }
)

# Parameters whose default None means "not set" rather than "required".
_OPTIONAL_NONE = {"scale"}


# ---------------------------------------------------------------------------------------------
# Entry points


def _spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"merge method: unknown method {method!r}{_suggest(method, METHODS)}") from None


def _with_defaults(
    spec: MethodSpec, model_params: Sequence[Mapping], global_params: Mapping
) -> tuple[list[dict], dict]:
    """Fill defaults. A model parameter given among the global ones applies to every model
    that does not set it (mergekit's top-level `parameters:` fall-through)."""
    shared = {k: v for k, v in global_params.items() if k in spec.model_params}
    models = [{**spec.model_params, **shared, **p} for p in model_params]
    globals_ = {**spec.global_params, **{k: v for k, v in global_params.items() if k in spec.global_params}}
    return models, globals_


def merge_tensor(
    method: str,
    base: Tensor | None,
    tensors: list[Tensor],
    model_params: list[dict[str, float]],
    global_params: dict[str, float | bool],
    generator: torch.Generator | None = None,
    *,
    compute: torch.dtype = torch.float32,
) -> Tensor:
    """Merge one tensor. `tensors` exclude the base; the result never aliases an input.

    `compute` other than float32 (`compute_dtype: recipe` with a half-precision recipe) reproduces mergekit
    0.1.5: the inputs are rounded to `compute` as mergekit reads them, task-vector methods compute in it with
    mergekit's roundings (`_merge_deltas_rounded`), methods with a `combine_rounded` follow their own mergekit
    steps, and the others compute in float32 from the rounded inputs, which is what mergekit does for linear
    and slerp. The result is in the dtype mergekit's steps end in (`compute`, or float32 where mergekit
    promotes: ramplus_tl).
    """
    spec = _spec(method)
    if tensors or not spec.uses_task_vectors:
        check_model_count(method, len(tensors))
    models, globals_ = _with_defaults(spec, model_params, global_params)
    if spec.needs_base and base is None:
        raise ValueError(f"{method}: needs a base model tensor")
    if compute != torch.float32:
        base = base.to(compute) if base is not None else None
        tensors = [x.to(compute) for x in tensors]
        if spec.uses_task_vectors:
            if not tensors:
                return base.clone()
            deltas = [x - base for x in tensors]
            return base + _merge_deltas_rounded(spec, deltas, models, globals_, generator, compute)
        return (spec.combine_rounded or spec.combine)(base, tensors, models, globals_)
    if spec.uses_task_vectors:
        base32 = base.float()
        if not tensors:
            return base32.clone() if base32 is base else base32
        deltas = [x.float() - base32 for x in tensors]
        return base32 + _merge_deltas(spec, deltas, models, globals_, generator)
    return spec.combine(base, tensors, models, globals_)


def merge_task_vectors(
    method: str,
    deltas: list[Tensor],
    model_params: list[dict[str, float]],
    global_params: dict,
    generator: torch.Generator | None = None,
    *,
    base: Tensor | None = None,
    ranks: Sequence[RankCache | None] | None = None,
) -> Tensor:
    """Merged task vector: base + result == merge_tensor(method, base, [base + d for d in deltas], ...).

    The hot path of the search. `base` is only needed by methods whose result is not a function
    of the deltas alone (slerp; linear without normalisation; passthrough with a scale). `ranks`
    (one RankCache or None per delta) makes magnitude selection a look-up; results are identical.
    """
    spec = _spec(method)
    if not deltas:
        raise ValueError(f"{method}: no task vectors to merge")
    models, globals_ = _with_defaults(spec, model_params, global_params)
    if spec.uses_task_vectors:
        return _merge_deltas(spec, deltas, models, globals_, generator, ranks)
    if spec.combine_deltas is not None:
        out = spec.combine_deltas(deltas, models, globals_)
        if out is not None:
            return out
    if base is None:
        raise ValueError(
            f"{method}: this merge of task vectors depends on the base tensor itself; pass base="
        )
    base32 = base.float()
    merged = spec.combine(base32, [base32 + d.float() for d in deltas], models, globals_)
    return merged - base32


# ---------------------------------------------------------------------------------------------
# Validation


_RANGES: dict[str, _Range] = {
    "weight": _ANY,
    "density": _Range(0, 1),
    "gamma": _Range(0, 1),
    "epsilon": _Range(0, 1, hi_open=True),
    "lambda": _ANY,
    "t": _Range(0, 1),
    "scale": _ANY,
    "select_topk": _Range(0, 1),
    "max_iter": _Range(0, 10_000),
    "tol": _AT_LEAST_0,
    "eps": _AT_LEAST_0,
}
_BOOLS = {
    "normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten", "filter_wise", "stable_ties",
    "normalize_weights",
}
_INTS = {"max_iter"}
EVOMERGE_ONLY_PARAMS = ("stable_ties",)  # not mergekit's: left out of mergekit YAML (to_mergekit says so)


def _suggest(name: str, known) -> str:
    """A parenthesised `config.suggest` (these messages go on with the allowed names)."""
    hint = suggest(name, known, list_known=False)
    return f" ({hint.strip()})" if hint else ""


def _allowed(spec: MethodSpec, name: str) -> _Range:
    return spec.ranges.get(name) or _RANGES.get(name, _ANY)


def _check_value(spec: MethodSpec, name: str, value: object, where: str) -> None:
    if name in _BOOLS:
        if not isinstance(value, bool) and value not in (0, 1):
            raise ValueError(f"{name}{where}: must be true or false, got {value!r}")
        return
    allowed = _allowed(spec, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        span = "" if str(allowed) == "any finite number" else f" in {allowed}"
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. {float(value):.1e})"
            except ValueError:
                pass
        raise ValueError(f"{name}{where}: must be a number{span}, got {value!r}{hint}")
    if not allowed.contains(float(value)):
        raise ValueError(f"{name}{where}: must be in {allowed}, got {value!r}")
    if name in _INTS and float(value) != int(value):
        raise ValueError(f"{name}{where}: must be a whole number, got {value!r}")


def check_model_count(method: str, n_models: int) -> None:
    """Raise ValueError unless `method` accepts `n_models` models besides the base."""
    spec = _spec(method)
    if n_models < spec.min_models or (spec.max_models is not None and n_models > spec.max_models):
        if spec.max_models == spec.min_models:
            want = f"exactly {spec.min_models}"
        else:
            want = f"at least {spec.min_models}"
            if spec.max_models is not None:
                want += f" and at most {spec.max_models}"
        raise ValueError(f"{method}: takes {want} model(s) besides the base, got {n_models}")


def validate_params(
    method: str, model_params: Sequence[Mapping[str, float]], global_params: Mapping[str, float | bool]
) -> None:
    """Check a method's parameters before any tensor work; raise ValueError naming the problem.

    `model_params` has one entry per non-base model (a subset is fine: the number of models is
    checked separately by `check_model_count`). A model parameter may also appear in
    `global_params`, as the default for every model (mergekit's top-level `parameters:`).
    """
    spec = _spec(method)
    known_global = set(spec.global_params) | set(spec.model_params)
    for name, value in global_params.items():
        if name not in known_global:
            raise ValueError(
                f"{name}: not a parameter of {method}{_suggest(name, known_global)}; "
                f"allowed: {', '.join(sorted(known_global)) or 'none'}"
            )
        _check_value(spec, name, value, "")
    for name, default in spec.global_params.items():
        if default is None and name not in global_params:
            raise ValueError(f"{name}: required by {method} (allowed range {_allowed(spec, name)})")

    for i, params in enumerate(model_params):
        where = f" (model {i})"
        for name, value in params.items():
            if name not in spec.model_params:
                allowed = ", ".join(sorted(spec.model_params)) or "none"
                raise ValueError(
                    f"{name}{where}: not a per-model parameter of {method}"
                    f"{_suggest(name, spec.model_params)}; allowed: {allowed}"
                )
            if value is None and name in _OPTIONAL_NONE:
                continue
            _check_value(spec, name, value, where)
        resolved = {**spec.model_params, **{k: v for k, v in global_params.items() if k in spec.model_params}, **params}
        for name, value in resolved.items():
            if value is None and name not in _OPTIONAL_NONE:
                raise ValueError(f"{name}{where}: required by {method} ({_allowed(spec, name)})")
        if spec.sparsifier == "rank_sampling":
            try:
                check_epsilon(float(resolved["density"]), float(resolved["epsilon"]))
            except ValueError as err:
                raise ValueError(f"{err}{where}") from None


def required_model_params(method: str) -> list[str]:
    """Per-model parameters a recipe must set for every non-base model of `method`."""
    return [k for k, d in _spec(method).model_params.items() if d is None and k not in _OPTIONAL_NONE]
