"""Item response theory for cheaper fitness: fit item parameters on the candidates scored in full, then score a
new candidate on a few anchor items and estimate its full-split score.

The model (multidimensional two-parameter logistic): candidate j answers item i correctly with probability
`sigmoid(a_i . theta_j - b_i)`; `a_i` (discrimination, `dims` numbers) and `b_i` (difficulty) per item, `theta_j`
(ability) per candidate. Items that every fitted candidate gets right (or wrong) carry no information about
ability: they are kept out of the fit and predicted as that constant ("fixed" items).

Estimators of a candidate's mean score over the task from its anchor responses, each with an uncertainty (one
standard deviation):
- `anchor`: the anchors' weighted mean (each anchor stands for its cluster of items);
- `pirt`: its ability fitted on the anchors (MAP, Newton), observed anchors plus predicted probabilities elsewhere;
- `gpirt`: `lam * anchor + (1 - lam) * pirt`, `lam` chosen by cross-validation;
- `merge3`: the candidate's ability constrained to a combination of its parents' abilities (`theta = sum_k w_k
  theta_parent_k`, the weights fitted on the anchors), then as `pirt`. Fewer free numbers when dims > parents;
- `mix`: a convex combination of `anchor`, `pirt` and `merge3` (weights on a 0.1 grid, set by cross-validation;
  `gpirt` is the special case without merge3). Its sd is the weighted sum of theirs (they are highly correlated).

Beside the estimators, `neighbours`: the errors a calibration makes on candidates scored in full, applied to a new
candidate in proportion to how alike it answered the anchors (a search's near-copies share their parent's error).

`calibrate` does the whole per-task job: dimension chosen on held-out cells, a final fit on every candidate,
`DRAWS` seeded anchor sets chosen on it, and for each set k-fold cross-validation over the fitted candidates (never
the parents: merge3 needs them) to set `lam` and the mix's weights and pick the estimator; the anchor set with the
least cross-validated error is kept. Everything is seeded and deterministic on CPU (float64, one torch thread).

Why one module of about 500 lines: it is one numerical library (fit, anchors, estimators, calibration) whose parts
share the fitted parameters' layout; the search's policy around it lives in `evomerge/search/irt_policy.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError

ANCHOR_METHODS = ("irt", "correct", "random")
ESTIMATORS = ("anchor", "pirt", "gpirt", "merge3", "mix", "mean")
MIN_FIT = 8  # fewer fully scored candidates than this and there is nothing to fit a model on


class IRTUnavailable(EvomergeError, ValueError):
    """IRT cannot help for this task (too few candidates, too few informative items, ...): score it in full."""


@dataclass
class IRTModel:
    """Fitted item parameters of one task, and the abilities of the candidates they were fitted on."""

    a: np.ndarray  # (items, dims) discriminations; zero rows for fixed items
    b: np.ndarray  # (items,) difficulties
    fixed: np.ndarray  # (items,) NaN for informative items, else the constant 0/1 every fitted candidate scored
    theta: np.ndarray  # (candidates, dims) abilities of the fitted candidates
    prior_sd: float = 1.0

    @property
    def dims(self) -> int:
        return int(self.a.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.b.shape[0])

    @property
    def informative(self) -> np.ndarray:
        return np.flatnonzero(np.isnan(self.fixed))

    def prob(self, theta: np.ndarray) -> np.ndarray:
        """P(correct) per item for one ability vector; fixed items give their constant."""
        p = _sigmoid(self.a @ np.asarray(theta, dtype=float) - self.b)
        return np.where(np.isnan(self.fixed), p, self.fixed)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.tolist(), "b": self.b.tolist(), "fixed": [None if np.isnan(x) else float(x) for x in self.fixed],
                "theta": self.theta.tolist(), "prior_sd": self.prior_sd}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IRTModel":
        a = np.asarray(d["a"], dtype=float)
        return cls(a=a.reshape(len(d["b"]), -1), b=np.asarray(d["b"], dtype=float),
                   fixed=np.array([np.nan if x is None else x for x in d["fixed"]], dtype=float),
                   theta=np.asarray(d["theta"], dtype=float).reshape(-1, a.reshape(len(d["b"]), -1).shape[1]),
                   prior_sd=float(d.get("prior_sd", 1.0)))


@dataclass
class Anchors:
    """The items a candidate is scored on, and the share of the task's informative items each stands for."""

    items: np.ndarray  # indices into the task's items, sorted
    weights: np.ndarray  # same order; sums to 1
    method: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items.tolist(), "weights": self.weights.tolist(), "method": self.method, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Anchors":
        return cls(np.asarray(d["items"], dtype=int), np.asarray(d["weights"], dtype=float), d["method"], int(d["seed"]))


@dataclass
class Estimate:
    value: float
    sd: float
    estimator: str


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact and overflow-free


# ---------------------------------------------------------------------------------------------------- fitting

def fit_mirt(responses: np.ndarray, dims: int = 1, *, item_sd: float = 3.0, prior_sd: float = 1.0, seed: int = 0,
             max_iter: int = 300) -> IRTModel:
    """Fit a `dims`-dimensional 2PL model by MAP (L-BFGS in torch, float64): abilities ~ N(0, prior_sd^2),
    item parameters with an L2 penalty (Gaussian prior of sd `item_sd`). `responses`: candidates x items of 0/1,
    NaN where an item was not scored."""
    import torch

    Y = np.asarray(responses, dtype=float)
    if Y.ndim != 2:
        raise IRTUnavailable(f"responses must be a candidates x items matrix, got shape {Y.shape}")
    m, n = Y.shape
    if m < 2:
        raise IRTUnavailable(f"{m} fully scored candidate(s): an IRT model needs at least {MIN_FIT}")
    seen = ~np.isnan(Y)
    hi = np.nanmax(np.where(seen, Y, -np.inf), axis=0)
    lo = np.nanmin(np.where(seen, Y, np.inf), axis=0)
    fixed = np.where(hi == lo, hi, np.nan)  # items with one answer across every fitted candidate (or none seen)
    fixed[~seen.any(axis=0)] = 0.0
    inf = np.flatnonzero(np.isnan(fixed))
    a = np.zeros((n, dims))
    b = np.zeros(n)
    if len(inf) == 0:
        return IRTModel(a, b, fixed, np.zeros((m, dims)), prior_sd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions whatever the caller's thread setting
    try:
        gen = torch.Generator().manual_seed(int(seed))
        y = torch.tensor(np.nan_to_num(Y[:, inf]), dtype=torch.float64)
        mask = torch.tensor(seen[:, inf], dtype=torch.float64)
        mean = (y * mask).sum(0) / mask.sum(0).clamp(min=1)
        th = (0.1 * torch.randn(m, dims, generator=gen, dtype=torch.float64)).requires_grad_()
        A = (0.5 + 0.1 * torch.randn(len(inf), dims, generator=gen, dtype=torch.float64)).requires_grad_()
        B = (-torch.logit(mean.clamp(0.02, 0.98))).clone().requires_grad_()
        opt = torch.optim.LBFGS([th, A, B], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = th @ A.T - B
            nll = (torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none") * mask).sum()
            loss = nll + 0.5 * (th ** 2).sum() / prior_sd ** 2 + 0.5 * ((A ** 2).sum() + (B ** 2).sum()) / item_sd ** 2
            loss.backward()
            return loss

        opt.step(closure)
        theta, A_, B_ = th.detach().numpy(), A.detach().numpy(), B.detach().numpy()
    finally:
        torch.set_num_threads(threads)
    if dims == 1 and A_.mean() < 0:  # one dimension: make higher ability mean more correct answers
        theta, A_ = -theta, -A_
    a[inf], b[inf] = A_, B_
    return IRTModel(a, b, fixed, theta.copy(), prior_sd)


def choose_dims(responses: np.ndarray, grid: Sequence[int] = (1, 2, 3, 5), holdout: float = 0.2, seed: int = 0,
                **fit_kw: Any) -> tuple[int, dict[int, float]]:
    """The dimension whose fit predicts held-out cells best (mean log-loss); ties go to the smaller."""
    Y = np.asarray(responses, dtype=float)
    rng = np.random.default_rng([int(seed), 7])
    hide = (rng.random(Y.shape) < holdout) & ~np.isnan(Y)
    train = np.where(hide, np.nan, Y)
    scores: dict[int, float] = {}
    for d in grid:
        model = fit_mirt(train, d, seed=seed, **fit_kw)
        P = np.clip(np.array([model.prob(t) for t in model.theta]), 1e-6, 1 - 1e-6)
        y = Y[hide]
        scores[int(d)] = float(-np.mean(y * np.log(P[hide]) + (1 - y) * np.log(1 - P[hide])))
    best = min(scores, key=lambda d: (round(scores[d], 4), d))
    return best, scores


# ---------------------------------------------------------------------------------------------------- anchors

def choose_anchors(model: IRTModel, n: int, method: str = "irt", seed: int = 0,
                   responses: np.ndarray | None = None) -> Anchors:
    """`n` anchor items among the informative ones. `irt`: k-means on item parameters (a, b), the item nearest
    each centre; `correct`: k-means on the items' correctness patterns over the fitted candidates (needs
    `responses`); `random`: one random item per stratum of difficulty. Weights: the share of items each stands for."""
    if method not in ANCHOR_METHODS:
        raise ValueError(f"anchor method '{method}' is not one of {', '.join(ANCHOR_METHODS)}")
    inf = model.informative
    if n < 1:
        raise IRTUnavailable(f"anchors must be at least 1, got {n}")
    if len(inf) <= n:
        raise IRTUnavailable(f"only {len(inf)} informative items (of {model.n_items}; the rest every fitted candidate "
                             f"gets right or wrong) for {n} anchors: scoring on anchors would save nothing")
    rng = np.random.default_rng([int(seed), 11])
    if method == "random":
        difficulty = model.b[inf] / np.maximum(np.linalg.norm(model.a[inf], axis=1), 1e-6)
        order = inf[np.argsort(difficulty, kind="stable")]
        strata = np.array_split(order, n)
        items = np.array([s[rng.integers(len(s))] for s in strata])
        weights = np.array([len(s) for s in strata], dtype=float)
    else:
        if method == "irt":
            X = np.hstack([model.a[inf], model.b[inf, None]])
        else:
            if responses is None:
                raise ValueError("anchor method 'correct' needs the fitted candidates' responses")
            R = np.asarray(responses, dtype=float)[:, inf]
            col = np.nanmean(np.where(np.isnan(R), np.nan, R), axis=0)
            X = np.where(np.isnan(R), col, R).T
        X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
        labels, centres = kmeans(X, n, rng)
        items, weights = [], []
        for k in range(n):
            members = np.flatnonzero(labels == k)
            if len(members) == 0:
                continue
            d = ((X[members] - centres[k]) ** 2).sum(1)
            items.append(inf[members[np.argmin(d)]])
            weights.append(len(members))
        items, weights = np.array(items), np.array(weights, dtype=float)
    order = np.argsort(items)
    return Anchors(items[order].astype(int), weights[order] / weights.sum(), method, int(seed))


def kmeans(X: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 4, iters: int = 100
           ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ starts; the best of `restarts` by inertia. Deterministic given `rng`."""
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        centres = [X[rng.integers(len(X))]]
        for _ in range(1, k):
            d = np.min(((X[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            p = d / d.sum() if d.sum() > 0 else np.full(len(X), 1 / len(X))
            centres.append(X[rng.choice(len(X), p=p)])
        C = np.array(centres)
        labels = np.zeros(len(X), dtype=int)
        for it in range(iters):
            dist = ((X[:, None, :] - C[None]) ** 2).sum(-1)
            new = dist.argmin(1)
            if it and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                if (labels == j).any():
                    C[j] = X[labels == j].mean(0)
        inertia = float(((X - C[labels]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels.copy(), C.copy())
    assert best is not None
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------------- estimators

def _map_logistic(X: np.ndarray, offset: np.ndarray, y: np.ndarray, mean: np.ndarray, prec: float,
                  iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """MAP of w in y ~ Bernoulli(sigmoid(X w - offset)), w ~ N(mean, 1/prec): Newton with step halving (saturated
    items make plain Newton overshoot); returns (w, covariance)."""

    def objective(w: np.ndarray) -> float:
        z = X @ w - offset
        return float(y @ z - np.logaddexp(0.0, z).sum() - 0.5 * prec * np.sum((w - mean) ** 2))

    w = mean.astype(float).copy()
    eye = np.eye(X.shape[1]) * prec
    f = objective(w)
    for _ in range(iters):
        p = _sigmoid(X @ w - offset)
        grad = X.T @ (y - p) - prec * (w - mean)
        H = (X * (p * (1 - p))[:, None]).T @ X + eye
        step = np.linalg.solve(H, grad)
        t = 1.0
        while t > 1e-8:
            f_new = objective(w + t * step)
            if f_new >= f - 1e-12:
                break
            t *= 0.5
        w, f = w + t * step, max(f_new, f)
        if np.max(np.abs(t * step)) < 1e-9:
            break
    p = _sigmoid(X @ w - offset)
    H = (X * (p * (1 - p))[:, None]).T @ X + eye
    return w, np.linalg.inv(H)


def ability(model: IRTModel, items: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MAP ability from responses `y` on `items` (fixed items are ignored: they say nothing), and its covariance."""
    items, y = np.asarray(items, dtype=int), np.asarray(y, dtype=float)
    keep = np.isnan(model.fixed[items])
    return _map_logistic(model.a[items[keep]], model.b[items[keep]], y[keep], np.zeros(model.dims),
                         1.0 / model.prior_sd ** 2)


def merged_ability(model: IRTModel, parents: np.ndarray, items: np.ndarray, y: np.ndarray, weight_sd: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """MERGE3-style ability: `sum_k w_k theta_parent_k`, weights fitted on the anchors (prior: the plain average);
    returns (theta, its covariance)."""
    P = np.asarray(parents, dtype=float)  # (parents, dims)
    items, y = np.asarray(items, dtype=int), np.asarray(y, dtype=float)
    keep = np.isnan(model.fixed[items])
    X = model.a[items[keep]] @ P.T  # (anchors, parents)
    w, cov = _map_logistic(X, model.b[items[keep]], y[keep], np.full(len(P), 1.0 / len(P)), 1.0 / weight_sd ** 2)
    return P.T @ w, P.T @ cov @ P


def _predicted(model: IRTModel, items: np.ndarray, y: np.ndarray, theta: np.ndarray, cov: np.ndarray, name: str) -> Estimate:
    """Observed anchors plus predicted probabilities on every other item; sd from unseen-item noise and the
    ability's uncertainty (delta method)."""
    p = model.prob(theta)
    rest = np.ones(model.n_items, dtype=bool)
    rest[items] = False
    total = float(np.sum(y) + p[rest].sum())
    inf_rest = rest & np.isnan(model.fixed)
    g = (model.a[inf_rest] * (p[inf_rest] * (1 - p[inf_rest]))[:, None]).sum(0)
    var = float((p[inf_rest] * (1 - p[inf_rest])).sum() + g @ cov @ g)
    return Estimate(total / model.n_items, float(np.sqrt(max(var, 0.0))) / model.n_items, name)


def estimate_anchor(model: IRTModel, anchors: Anchors, y: np.ndarray, theta: np.ndarray | None = None) -> Estimate:
    """The anchors' weighted mean over the informative items, plus the fixed items' constants; sd from the
    spread of predicted probabilities within each anchor's cluster (approximated by its weight)."""
    y = np.asarray(y, dtype=float)
    inf = model.informative
    fixed_sum = float(np.nansum(model.fixed))
    value = (fixed_sum + len(inf) * float(anchors.weights @ y)) / model.n_items
    if theta is None:
        theta, _ = ability(model, anchors.items, y)
    p = model.prob(theta)[anchors.items]
    var = float(np.sum((anchors.weights * len(inf)) ** 2 * p * (1 - p)))
    return Estimate(value, np.sqrt(var) / model.n_items, "anchor")


def estimate(model: IRTModel, anchors: Anchors, y: np.ndarray, estimator: str = "pirt", lam: float = 0.5,
             parents: np.ndarray | None = None, mix: dict[str, float] | None = None) -> Estimate:
    """A candidate's mean score over every item of the task, from its responses `y` on the anchors."""
    y = np.asarray(y, dtype=float)
    if y.shape != anchors.items.shape:
        raise ValueError(f"{len(y)} responses for {len(anchors.items)} anchors")
    if estimator == "mean":  # the anchors' plain mean: the baseline every model-based estimator must beat
        p = float(y.mean()) if len(y) else 0.0
        return Estimate(p, float(np.sqrt(max(p * (1 - p), 0.25 / len(y)) / len(y))), "mean")
    if estimator == "mix":
        if not mix:
            raise IRTUnavailable("the mix estimator needs its weights (set by calibrate)")
        parts = [(w, estimate(model, anchors, y, e, lam, parents)) for e, w in mix.items() if w > 0]
        return Estimate(float(sum(w * p.value for w, p in parts)), float(sum(w * p.sd for w, p in parts)), "mix")
    if estimator == "merge3":
        if parents is None or len(parents) == 0:
            raise IRTUnavailable("the merge3 estimator needs the parents' abilities (parents scored in full)")
        theta, cov = merged_ability(model, parents, anchors.items, y)
        return _predicted(model, anchors.items, y, theta, cov, "merge3")
    theta, cov = ability(model, anchors.items, y)
    if estimator == "anchor":
        return estimate_anchor(model, anchors, y, theta)
    p = _predicted(model, anchors.items, y, theta, cov, "pirt")
    if estimator == "pirt":
        return p
    if estimator == "gpirt":
        s = estimate_anchor(model, anchors, y, theta)
        return Estimate(lam * s.value + (1 - lam) * p.value, float(np.hypot(lam * s.sd, (1 - lam) * p.sd)), "gpirt")
    raise ValueError(f"unknown estimator '{estimator}' (known: {', '.join(ESTIMATORS)})")


# ---------------------------------------------------------------------------------------------------- one task

@dataclass
class Calibration:
    """Everything the search needs for one task: the model, the anchors, the chosen estimator and its
    cross-validated error (what we publish), plus how it was chosen."""

    model: IRTModel
    anchors: Anchors
    estimator: str
    lam: float
    cv_mae: dict[str, float]  # estimator -> mean absolute error on held-out fitted candidates
    dims_loss: dict[int, float]  # dims -> held-out log-loss
    parents: list[int] = field(default_factory=list)  # rows of model.theta that are the parents
    mix: dict[str, float] = field(default_factory=dict)  # the mix estimator's weights of anchor, pirt, merge3
    # The honest check (`_honest`): the chosen configuration re-run in every fold with anchors chosen from that
    # fold's own fit, so no choice saw the held-out candidate. Its MAE, the baselines' MAE on the same candidates
    # (the anchors' plain mean, a random item subset of the same size), and the factor that makes 2 sd cover 90% of
    # its errors (estimates' sds are multiplied by it).
    honest_mae: float | None = None
    honest_n: int = 0  # the candidates the honest check estimated
    model_mae: float | None = None  # the honest check's MAE of the model-based estimator chosen in the fit
    baselines: dict[str, float] = field(default_factory=dict)
    sd_scale: float = 1.0

    def printed_error(self) -> float:
        """The error a search shows for this calibration before any calibration candidate is measured: the honest
        check's (never the in-fit cross-validation's, which saw its held-out candidates through the anchors)."""
        return self.honest_mae if self.honest_mae is not None else self.cv_mae[self.estimator]

    @property
    def parent_theta(self) -> np.ndarray:
        return self.model.theta[self.parents] if self.parents else np.zeros((0, self.model.dims))

    def estimate(self, y: np.ndarray, estimator: str | None = None) -> Estimate:
        e = estimate(self.model, self.anchors, y, estimator or self.estimator, self.lam, self.parent_theta, self.mix)
        scale = self.sd_scale if e.estimator == self.estimator else 1.0  # the factor was measured on the chosen one
        return Estimate(e.value, e.sd * scale, e.estimator)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "anchors": self.anchors.to_dict(), "estimator": self.estimator,
                "lam": self.lam, "cv_mae": self.cv_mae, "dims_loss": {str(k): v for k, v in self.dims_loss.items()},
                "parents": self.parents, **({"mix": self.mix} if self.mix else {}),
                "honest_mae": self.honest_mae, "honest_n": self.honest_n, "model_mae": self.model_mae,
                "baselines": self.baselines,
                "sd_scale": self.sd_scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(IRTModel.from_dict(d["model"]), Anchors.from_dict(d["anchors"]), d["estimator"], float(d["lam"]),
                   {k: float(v) for k, v in d["cv_mae"].items()}, {int(k): float(v) for k, v in d["dims_loss"].items()},
                   [int(i) for i in d.get("parents", [])], {k: float(v) for k, v in d.get("mix", {}).items()},
                   honest_mae=d.get("honest_mae"), honest_n=int(d.get("honest_n", 0)), model_mae=d.get("model_mae"),
                   baselines={k: float(v) for k, v in d.get("baselines", {}).items()},
                   sd_scale=float(d.get("sd_scale", 1.0)))


LAM_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)
MIX_STEP = 0.1  # grid of the mix estimator's weights
MIX_OF = ("anchor", "pirt", "merge3")  # what the mix estimator mixes
AUTO = ("pirt", "gpirt", "merge3", "mix")  # the estimators `auto` chooses among
DRAWS = 8  # anchor sets drawn (seeded); calibrate keeps the one with the least cross-validated error
DRAW_PER = 4  # ... but at most one draw per this many cross-validated candidates


def _simplex(k: int, step: float = MIX_STEP) -> np.ndarray:
    """Every weight vector of length k on a grid of `step` that sums to 1."""
    m = int(round(1 / step))
    out = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            out.append(prefix + [left])
            return
        for v in range(left, -1, -1):
            rec(prefix + [v], left - v, slots - 1)

    rec([], m, k)
    return np.array(out, dtype=float) / m


def _cv_scores(P: dict[str, np.ndarray], t: np.ndarray, parents: bool) -> tuple[dict[str, float], float, dict[str, float]]:
    """Cross-validated MAE of every estimator from held-out predictions `P`; gpirt's lam and the mix's weights."""
    gp = {float(lam): float(np.mean(np.abs(lam * P["anchor"] + (1 - lam) * P["pirt"] - t))) for lam in LAM_GRID}
    lam = min(gp, key=lambda x: (round(gp[x], 6), -x))
    cv = {"anchor": float(np.mean(np.abs(P["anchor"] - t))), "pirt": float(np.mean(np.abs(P["pirt"] - t))),
          "gpirt": gp[lam]}
    names = [e for e in MIX_OF if parents or e != "merge3"]
    if parents:
        cv["merge3"] = float(np.mean(np.abs(P["merge3"] - t)))
    W = _simplex(len(names))
    M = np.stack([P[e] for e in names])  # (estimators, candidates)
    errs = np.abs(W @ M - t[None]).mean(1)
    best = min(range(len(W)), key=lambda i: (round(float(errs[i]), 6), i))
    cv["mix"] = float(errs[best])
    return cv, lam, {e: float(w) for e, w in zip(names, W[best])}


def calibrate(responses: np.ndarray, n_anchors: int, method: str = "irt", seed: int = 0, parents: Sequence[int] = (),
              estimators: Sequence[str] = AUTO, dims: int | Sequence[int] = (1, 2, 3, 5), folds: int = 5,
              cache: dict | None = None, item_sd: float = 3.0, draws: int = DRAWS,
              extra_residuals: Sequence[tuple[float, float]] = ()) -> Calibration:
    """Fit one task from fully scored candidates (rows of `responses`, every item scored; `parents` are rows too).

    1. dims: the grid's best on held-out cells (or the one given); the final model on every row;
    2. `draws` anchor sets chosen on the final model (`method`, seeds `seed`, then `seed * 1000 + r`; fewer with
       fewer than 4 * draws non-parent rows);
    3. for each set, k-fold over the non-parent rows: fit on the rest, estimate each held-out candidate from its
       responses on the set's anchors with every estimator; `lam` of gpirt and the mix's weights minimise that
       error; the estimator with the least cross-validated error among `estimators`;
    4. the anchor set (and its estimator) with the least cross-validated error; ties keep the earlier draw.
    Every choice uses the rows given only. The anchors saw every row (through the final model's item parameters)
    and the best of `draws` is kept, so `cv_mae` is somewhat optimistic: the error a search measures on its
    calibration candidates (scored in full after the fit) is the honest one.
    `cache` (a dict you keep): fitted models are reused across calls on the same `responses` with other anchor
    counts or methods (the fits do not depend on them); the bench uses it."""
    Y = np.asarray(responses, dtype=float)
    m, n = Y.shape
    if m < MIN_FIT:
        raise IRTUnavailable(f"{m} fully scored candidates: an IRT model needs at least {MIN_FIT} (raise seed_candidates)")
    if np.isnan(Y).any():
        raise IRTUnavailable("calibration needs candidates scored on every item")
    if n <= n_anchors:
        raise IRTUnavailable(f"the task has {n} items and anchors is {n_anchors}: scoring anchors saves nothing")
    parents = [int(p) for p in parents]
    cache = {} if cache is None else cache

    def fit(rows: np.ndarray, d: int) -> IRTModel:
        key = (tuple(int(i) for i in rows), d, int(seed), item_sd)
        if key not in cache:
            cache[key] = fit_mirt(Y[rows], d, seed=seed, item_sd=item_sd)
        return cache[key]

    if isinstance(dims, int):
        d, dims_loss = int(dims), {}
    else:
        key = ("dims", tuple(dims), int(seed), item_sd)
        if key not in cache:
            cache[key] = choose_dims(Y, tuple(dims), seed=seed, item_sd=item_sd)
        d, dims_loss = cache[key]
    full = fit(np.arange(m), d)
    if len(full.informative) <= n_anchors:
        raise IRTUnavailable(f"only {len(full.informative)} of the task's {n} items separate the fitted candidates "
                             f"(the rest every one gets right or wrong), not more than anchors = {n_anchors}")
    others = [i for i in range(m) if i not in set(parents)]
    rng = np.random.default_rng([int(seed), 13])
    order = np.array(others)[rng.permutation(len(others))]
    k = max(2, min(folds, len(order)))
    fold_models = []
    for fold in np.array_split(order, k):
        train = np.array([i for i in range(m) if i not in set(fold.tolist())])
        try:
            mod = fit(train, d)
        except IRTUnavailable:
            continue
        pth = mod.theta[[int(np.flatnonzero(train == p)[0]) for p in parents]] if parents else None
        fold_models.append((fold, train, mod, pth))
    best_run = None
    # keeping the best of many draws by the error on few held-out candidates would fit their noise: one draw per
    # DRAW_PER validation candidates, at most `draws`
    for draw in range(max(1, min(draws, len(others) // DRAW_PER))):
        final = choose_anchors(full, n_anchors, method, seed if draw == 0 else seed * 1000 + draw, responses=Y)
        truth, preds = [], {e: [] for e in MIX_OF}
        for fold, train, mod, pth in fold_models:
            for j in fold:
                y = Y[j, final.items]
                truth.append(Y[j].mean())
                preds["anchor"].append(estimate(mod, final, y, "anchor").value)
                preds["pirt"].append(estimate(mod, final, y, "pirt").value)
                preds["merge3"].append(estimate(mod, final, y, "merge3", parents=pth).value if parents else np.nan)
        t = np.array(truth)
        if len(t) == 0:
            raise IRTUnavailable("cross-validation found no fold it could fit; raise seed_candidates")
        cv, lam, mix = _cv_scores({e: np.array(v) for e, v in preds.items()}, t, bool(parents))
        allowed = [e for e in estimators if e in cv]
        if not allowed:
            raise IRTUnavailable(f"none of the estimators {list(estimators)} applies (merge3 needs the parents)")
        est = min(allowed, key=lambda e: (round(cv[e], 6), ESTIMATORS.index(e)))
        if best_run is None or round(cv[est], 6) < round(best_run[0][est], 6):
            best_run = (cv, lam, mix, est, final)
    cv, lam, mix, best, anchors = best_run
    cal = Calibration(full, anchors, best, lam, cv, dims_loss, parents, mix)
    return _honest(cal, Y, fold_models, n_anchors, method, seed, extra_residuals,
                   may_replace=tuple(estimators) == AUTO)


SD_COVER = 0.95  # the share of the check's errors 2 sd cover (the search's target is 90%: a margin for its noise)
SD_SCALE_BOUNDS = (0.2, 5.0)


def sd_scale_for(residuals: Sequence[float], sds: Sequence[float]) -> float:
    """The factor that makes 2 x (sd x factor) cover SD_COVER of these errors (within SD_SCALE_BOUNDS). Why a
    factor at all: the model's sd counts the unseen items' coin flips and the ability's uncertainty, not the
    model's own misfit, and is too wide where items are predictable (measured on the demo: 2 sd of 0.17 around
    errors of 0.02)."""
    r, sd = np.abs(np.asarray(residuals, dtype=float)), np.maximum(np.asarray(sds, dtype=float), 1e-9)
    if len(r) == 0:
        return 1.0
    return float(np.clip(np.quantile(r / sd, SD_COVER) / 2.0, *SD_SCALE_BOUNDS))


def _honest(cal: Calibration, Y: np.ndarray, fold_models: list, n_anchors: int, method: str, seed: int,
            extra_residuals: Sequence[tuple[float, float]], may_replace: bool = True) -> Calibration:
    """Re-run the chosen configuration in every fold with anchors chosen from that fold's own fit, so the held-out
    candidate had no say in the anchors (the estimator, gp-IRT's weight and the mix's were chosen on the same folds
    in the fit: a small optimism left). Its MAE is what the search prints before calibration candidates are
    measured. Beside it, on the same held-out candidates, the anchors' plain mean and a random item subset of the
    same size (seeded): with `may_replace` (the estimator left to `auto`), a model that does not beat both is
    replaced by the better of them: `mean` on the anchors, or a stratified random subset read by the `anchor`
    estimator, whose own honest check is then run the same way. The sd factor covers SD_COVER of the final
    estimator's errors and of `extra_residuals` (error, unscaled sd) measured on earlier calibration candidates."""
    rng = np.random.default_rng([int(seed), 29])

    def check(estimator: str, anchor_method: str) -> tuple[list[float], list[float], list[float], list[float]]:
        resid, sds, plain, rand = [], [], [], []
        for fold, train, mod, pth in fold_models:
            try:
                fa = choose_anchors(mod, n_anchors, anchor_method, seed, responses=Y[train])
            except IRTUnavailable:
                continue
            for j in fold:
                y, t = Y[j, fa.items], float(Y[j].mean())
                e = estimate(mod, fa, y, estimator, cal.lam, pth, cal.mix)
                resid.append(e.value - t)
                sds.append(e.sd)
                plain.append(float(y.mean()) - t)
                rand.append(float(Y[j, rng.choice(Y.shape[1], len(fa.items), replace=False)].mean()) - t)
        return resid, sds, plain, rand

    resid, sds, plain, rand = check(cal.estimator, method)
    if not resid:
        return cal
    mae = lambda r: float(np.mean(np.abs(r)))  # noqa: E731
    cal.honest_mae, cal.honest_n, cal.model_mae = mae(resid), len(resid), mae(resid)
    cal.baselines = {"anchor mean": mae(plain), "random subset": mae(rand)}
    if may_replace and cal.honest_mae >= min(cal.baselines.values()):  # the model loses to a plain mean
        if cal.baselines["anchor mean"] <= cal.baselines["random subset"]:
            cal.estimator = "mean"
            resid, sds, _, _ = check("mean", method)
        else:  # a random subset's mean, one item per stratum of difficulty, the constant items counted
            cal.estimator = "anchor"
            cal.anchors = choose_anchors(cal.model, len(cal.anchors.items), "random", seed)
            resid, sds, _, _ = check("anchor", "random")
        cal.honest_mae = mae(resid)
    extra = list(extra_residuals)
    cal.sd_scale = sd_scale_for(list(resid) + [r for r, _ in extra], list(sds) + [s for _, s in extra])
    if cal.estimator == "mean":  # a sample mean's binomial sd is exact up to the finite task: never narrowed
        cal.sd_scale = max(cal.sd_scale, 1.0)
    return cal


# ---------------------------------------------------------------------------------------------------- neighbours

NEIGHBOUR_SCALES = (0.5, 1.0, 2.0, 4.0)  # anchor answers apart at which a neighbour's weight falls to 1/e
NEIGHBOUR_PRIORS = (0.1, 0.3, 1.0, 3.0)  # the weight of "no correction", in neighbours with the same answers
NEIGHBOUR_GAIN = 0.9  # used only where it cuts the leave-one-out error to this share or less: one of 16 settings
# chosen on a few candidates is a little lucky, and a correction that barely helps there is noise


@dataclass(frozen=True)
class Neighbours:
    """What the candidates scored in full say about a new estimate's error: their answers on the anchors and the
    estimator's residual on each (measured value minus the estimate their anchors give). A new candidate's estimate
    moves by the residuals of those that answered its anchors alike, each weighted exp(-distance / scale)
    (distance: anchors answered differently), shrunk towards no correction by `prior`:
    `shift = sum_j w_j r_j / (prior + sum_j w_j)`.

    Why: a search breeds near-copies of what it keeps. A near-copy answers the anchors as its parent did, so the
    estimator gives it the parent's estimate, error and all, though the parent was scored in full (calibrated or
    confirmed) and its error is known: without this, every near-copy of an over-estimated candidate looks as good
    as the parent first did, and takes the confirmations (or the front) from genuinely new candidates.
    `scale` None: off, because leave-one-out over the measured candidates found no (scale, prior) that lowers
    their error by 10% (NEIGHBOUR_GAIN; the rule every estimator obeys: beat doing nothing on the data, or not
    be used)."""

    answers: np.ndarray  # (measured candidates, anchors), 0/1
    residuals: np.ndarray  # (measured candidates,)
    scale: float | None
    prior: float = 1.0
    loo_mae: float | None = None  # leave-one-out error of the corrected estimates over the measured candidates
    raw_mae: float | None = None  # ... and of the estimator's own

    def weights(self, y: np.ndarray) -> np.ndarray:
        d = np.sum(self.answers != np.asarray(y, dtype=float)[None, :], axis=1)
        return np.exp(-d / self.scale) if self.scale else np.zeros(len(self.residuals))

    def shift(self, y: np.ndarray) -> float:
        """How far to move the estimate of a candidate that answered the anchors `y` (0 when off)."""
        if self.scale is None or len(self.residuals) == 0:
            return 0.0
        w = self.weights(y)
        return float(w @ self.residuals / (self.prior + w.sum()))

    def correct(self, est: Estimate, y: np.ndarray) -> Estimate:
        """`est` (of a candidate that answered the anchors `y`) moved by `shift`, kept within [0, 1] and named
        `<estimator>+neighbours`; `est` itself when nothing moves it."""
        shift = self.shift(y)
        if not shift:
            return est
        return Estimate(float(np.clip(est.value + shift, 0.0, 1.0)), est.sd, est.estimator + "+neighbours")


def neighbours(answers: np.ndarray, residuals: np.ndarray, scales: Sequence[float] = NEIGHBOUR_SCALES,
               priors: Sequence[float] = NEIGHBOUR_PRIORS, min_count: int = MIN_FIT) -> Neighbours:
    """The correction (`Neighbours`) with the (scale, prior) whose leave-one-out error over these measured
    candidates is least, or off when none cuts the uncorrected estimates' error to NEIGHBOUR_GAIN of it (or fewer
    than `min_count` are measured). Deterministic: a grid, ties to the earlier pair."""
    A = np.asarray(answers, dtype=float).reshape(len(residuals), -1)
    r = np.asarray(residuals, dtype=float)
    raw = float(np.mean(np.abs(r))) if len(r) else None
    if len(r) < min_count:
        return Neighbours(A, r, None, raw_mae=raw, loo_mae=raw)
    D = A @ (1 - A).T + (1 - A) @ A.T  # anchors answered differently, pairwise
    best: tuple[float, float | None, float] = (float(raw), None, 1.0)
    for s in scales:
        W = np.exp(-D / s)
        np.fill_diagonal(W, 0.0)  # leave one out: a candidate never corrects itself
        for prior in priors:
            loo = float(np.mean(np.abs(r - W @ r / (prior + W.sum(axis=1)))))
            if loo < best[0] - 1e-12:
                best = (loo, float(s), float(prior))
    if best[1] is None or best[0] > NEIGHBOUR_GAIN * float(raw):
        return Neighbours(A, r, None, raw_mae=raw, loo_mae=raw)
    return Neighbours(A, r, best[1], best[2], loo_mae=best[0], raw_mae=raw)
