"""Drivers: optimisers behind one ask/tell shape, so the caller owns the evaluation loop (and its workers).

Every driver works in the unit cube [0, 1]^n (the loop maps it onto the space's bounds) and minimises losses
(the loop turns "maximise accuracy" into "minimise -accuracy"). A generation is `X = ask()`, evaluate every row,
`tell(X, F)`. A driver is deterministic given its seed and the losses it is told: a resume rebuilds it by
replaying the archive's asks and tells into a fresh one (`resume.py`), which continues the very same trajectory
and is what makes an interrupted-then-resumed search equal an uninterrupted one. Nothing of a driver is stored.

- `random`: uniform samples, the baseline.
- `cmaes`: pycma's CMA-ES (one objective), bounded to the cube, seeded; `start: best_seed` starts its
  distribution at the best point of a first population of seeds and uniform points (a warm start).
- `nsga2`, `nsga3`, `smsemoa`: pymoo's multi-objective algorithms (also fine for one objective). (AGE-MOEA
  needs numba, which evomerge does not install.)

Seeds (parents, plain averages) go into the first population; the rest of it is random.

Duplicates (`driver.duplicates`, the pymoo drivers): pymoo eliminates offspring equal to a point it holds, by
their coordinates. Many points of a space mean the same merge (a gene that only matters past the path's end, a
weight the recipe rounds), and such a repeat is answered from the archive at no cost but fills a slot of the
generation and a unit of the budget: on the demo's hybrid space a third of the asks. With `same` (a point's
recipe, `Problem.recipe_key`), a point whose recipe any earlier ask of this driver held, or another point of the
same ask, is bred again instead (pymoo's mating retries up to 100 times, then asks fewer; an ask with nothing
new is empty and the search ends).

Asking ahead (the steady loop, `driver.mode: steady`): `can_ask_ahead()` says whether `ask()` may be called again
before the last ask is told; tells then come in ask order. `random` always can (its asks never read a tell);
the pymoo drivers can once their first population is told (each ask breeds offspring from the population as
last told; a tell merges them in, whichever population they were bred from); `cmaes` never can (pycma's update
assumes the points were sampled from the distribution it is updating).

Revising (`revise`): a point told on an estimate and measured since (IRT rechecks, `search/irt_policy.py`) gets
its measured losses where the driver still holds it (the pymoo drivers' surviving population); the replay
revises at the same place, between the asks and the tell of the generation that measured it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import numpy as np

from evomerge.errors import UserError

DRIVERS = ("random", "cmaes", "nsga2", "nsga3", "smsemoa")
SINGLE_OBJECTIVE = ("cmaes",)


class DriverError(UserError, ValueError):
    """A driver cannot be built as configured (unknown name, wrong number of objectives, bad option)."""


@contextlib.contextmanager
def _numpy_global_state(holder: Any) -> Iterator[None]:
    """pycma draws from numpy's global RNG: give the driver its own, swapped in only during its calls, so
    nothing else in the process (or its order) can change the trajectory."""
    outer = np.random.get_state()
    np.random.set_state(holder._np_state)
    try:
        yield
    finally:
        holder._np_state = np.random.get_state()
        np.random.set_state(outer)


def _first_population(n: int, n_var: int, seeds: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    seeds = np.zeros((0, n_var)) if seeds is None else np.clip(np.asarray(seeds, dtype=float).reshape(-1, n_var), 0, 1)
    fill = rng.random((max(n - len(seeds), 0), n_var))
    return np.concatenate([seeds[:n], fill])


@dataclass(frozen=True)
class Lineage:
    """What the next ask is bred from, for the store's parent lineage: `points` (unit cube) of the archive, the
    whole previous generation, or nothing (neither set)."""

    points: np.ndarray | None = None
    previous_generation: bool = False


class Driver:
    """Base: `ask()` -> (k, n_var) points in [0, 1]; `tell(X, F)` with F the (k, n_obj) losses of exactly X."""

    name = "driver"

    def __init__(self, n_var: int, n_obj: int, pop_size: int, seed: int, seeds: np.ndarray | None = None):
        if n_var < 1 or n_obj < 1 or pop_size < 1:
            raise DriverError(f"{self.name}: needs at least one gene, one objective and a population of 1 or more")
        self.n_var, self.n_obj, self.pop_size, self.seed = n_var, n_obj, pop_size, seed
        self.generation = 0  # generations told so far

    def ask(self) -> np.ndarray:
        raise NotImplementedError

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        raise NotImplementedError

    def can_ask_ahead(self) -> bool:
        """Whether `ask()` may be called now although an earlier ask is not told yet."""
        return False

    def revise(self, losses: dict[Hashable, np.ndarray], key: Callable[[np.ndarray], Hashable]) -> int:
        """Points told before get new losses (`losses[key(x)]`: an estimate measured since): where the driver keeps
        told points (a surviving population), they compete with those from now on. Returns how many it held. A
        driver that keeps no told points (random search; CMA-ES, whose distribution moved once and for all) has
        nothing to revise."""
        return 0

    def parents(self) -> Lineage:
        """The parents of the next ask (random search: none)."""
        return Lineage()

    def _check(self, X: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X, F = np.asarray(X, dtype=float), np.asarray(F, dtype=float).reshape(len(X), -1)
        if F.shape[1] != self.n_obj:
            raise ValueError(f"{self.name}: told {F.shape[1]} objectives, expected {self.n_obj}")
        return X, F


class RandomSearch(Driver):
    name = "random"

    def __init__(self, n_var: int, n_obj: int, pop_size: int, seed: int, seeds: np.ndarray | None = None):
        super().__init__(n_var, n_obj, pop_size, seed, seeds)
        self.rng = np.random.default_rng(seed)
        self._seeds = seeds
        self.asks = 0  # asks so far (the first one holds the seeds)

    def ask(self) -> np.ndarray:
        asks, self.asks = self.asks, self.asks + 1
        if asks == 0:
            return _first_population(self.pop_size, self.n_var, self._seeds, self.rng)
        return self.rng.random((self.pop_size, self.n_var))

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        self._check(X, F)
        self.generation += 1

    def can_ask_ahead(self) -> bool:
        return True


# pycma's bound transform bends points near a bound inwards, which would move seeds that sit on a bound (a
# parent is weight 0 or 1). Its box is widened by this margin, so [0, 1] lies in the transform's identity region;
# the loop clips what lies outside [0, 1] when it decodes.
CMA_MARGIN = 0.1
# Where CMA-ES's distribution starts: the cube's centre with the seeds injected into its first population, or
# (best_seed) at the best point of a first population of seeds and uniform points: a warm start, for spaces whose
# good region is a thin neighbourhood of a seed (a data-flow path one run away from a parent's own layers).
CMA_STARTS = ("center", "best_seed")


class CMAES(Driver):
    name = "cmaes"

    def __init__(self, n_var: int, n_obj: int, pop_size: int, seed: int, seeds: np.ndarray | None = None,
                 sigma0: float = 0.3, start: str = "center"):
        super().__init__(n_var, n_obj, pop_size, seed, seeds)
        if n_obj != 1:
            raise DriverError(f"cmaes optimises one objective, the job has {n_obj}: use nsga2, nsga3 or smsemoa"
                              ", or keep one objective")
        if n_var < 2:
            raise DriverError("cmaes needs at least 2 genes (pycma does not do 1-D); use random or nsga2")
        if start not in CMA_STARTS:
            raise DriverError(f"start: must be one of {', '.join(CMA_STARTS)}, got {start!r}")
        self._np_state = np.random.RandomState(seed).get_state()
        # pycma samples with opts["randn"]: give it a generator of its own, untouched by anything else.
        self.rs = np.random.RandomState(seed + 1)
        self.sigma0, self.start = sigma0, start
        self.es: Any = None
        self._first: np.ndarray | None = None
        if start == "center":
            self._strategy(np.full(n_var, 0.5))
            if seeds is not None and len(seeds):
                with _numpy_global_state(self):
                    self.es.inject([np.clip(s, 0, 1) for s in np.asarray(seeds, dtype=float)], force=True)
        else:  # best_seed: a first population (the seeds, then uniform points), and CMA-ES from its best point
            self._first = _first_population(pop_size, n_var, seeds, np.random.default_rng(seed))
        self._asked: list[np.ndarray] | None = None

    def _strategy(self, x0: np.ndarray) -> None:
        import cma

        with _numpy_global_state(self):
            self.es = cma.CMAEvolutionStrategy(
                x0, self.sigma0, {"bounds": [-CMA_MARGIN, 1.0 + CMA_MARGIN], "randn": self.rs.randn,
                                  "seed": float("nan"), "popsize": self.pop_size, "verbose": -9, "verb_log": 0,
                                  "verb_disp": 0})

    def ask(self) -> np.ndarray:
        if self.es is None:
            assert self._first is not None
            self._asked = list(self._first)
            return self._first.copy()
        with _numpy_global_state(self):
            self._asked = self.es.ask()
        return np.array(self._asked)

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        X, F = self._check(X, F)
        if self._asked is None or len(X) != len(self._asked):
            raise ValueError("cmaes: tell() must get exactly the points of the last ask()")
        if self.es is None:  # the first population told: the distribution starts at its best point
            finite = np.where(np.isfinite(F[:, 0]), F[:, 0], np.inf)
            self._strategy(np.clip(np.asarray(self._asked[int(np.argmin(finite))], dtype=float), 0, 1))
        else:
            with _numpy_global_state(self):
                self.es.tell(self._asked, [float(f) for f in F[:, 0]])
        self._asked = None
        self.generation += 1

    def parents(self) -> Lineage:
        """The previous generation, whose ranking moved the distribution."""
        return Lineage(previous_generation=True)


class PymooDriver(Driver):
    """pymoo's ask/tell: the algorithm never sees the problem's `_evaluate`; losses arrive through tell."""

    def __init__(self, name: str, n_var: int, n_obj: int, pop_size: int, seed: int, seeds: np.ndarray | None = None,
                 same: Callable[[np.ndarray], Hashable] | None = None, **options: Any):
        self.name = name
        super().__init__(n_var, n_obj, pop_size, seed, seeds)
        init = _first_population(pop_size, n_var, seeds, np.random.default_rng(seed))
        self.duplicates = None if same is None else _recipe_duplicates(same)
        if self.duplicates is not None:
            options = {"eliminate_duplicates": self.duplicates, **options}
        self.algo = _pymoo_algorithm(name, n_obj, pop_size, init, options)
        self.problem = UnitProblem(n_var, n_obj)
        from pymoo.termination import get_termination

        self.algo.setup(self.problem, seed=seed, termination=get_termination("n_gen", 10**9), verbose=False)
        self._asked: list[Any] = []  # populations asked and not told yet, oldest first

    def ask(self) -> np.ndarray:
        """The next points; none (shape (0, n_var)) when mating found nothing unlike what was asked before."""
        pop = self.algo.ask()
        if pop is None or len(pop) == 0:
            return np.zeros((0, self.n_var))
        self._asked.append(pop)
        X = np.array(pop.get("X"), dtype=float)
        if self.duplicates is not None:
            self.duplicates.asked.update(self.duplicates.key(x) for x in X)
        return X

    def tell(self, X: np.ndarray, F: np.ndarray) -> None:
        from pymoo.problems.static import StaticProblem

        X, F = self._check(X, F)
        asked = self._asked
        if not asked or len(asked[0]) != len(X):
            raise ValueError(f"{self.name}: tell() must get exactly the points of the oldest ask() not told yet")
        pop = asked.pop(0)
        self.algo.evaluator.eval(StaticProblem(self.problem, F=F), pop)
        self.algo.tell(infills=pop)
        self.generation += 1

    def revise(self, losses: dict[Hashable, np.ndarray], key: Callable[[np.ndarray], Hashable]) -> int:
        """The surviving population's members among `losses` take their new losses: the next survival ranks them
        with those (an over-estimated elite would otherwise outlive every candidate it wrongly dominates)."""
        pop = self.algo.pop
        if pop is None or not losses:
            return 0
        held = 0
        for ind in pop:
            f = losses.get(key(np.asarray(ind.X, dtype=float)))
            if f is not None:
                ind.set("F", np.asarray(f, dtype=float))
                held += 1
        return held

    def can_ask_ahead(self) -> bool:
        # before its first tell, pymoo's ask() would hand out the initial sampling again
        return bool(self.algo.is_initialized)

    def parents(self) -> Lineage:
        """The surviving population as last told (None before the first tell)."""
        pop = self.algo.pop
        return Lineage(points=None if pop is None else np.asarray(pop.get("X"), dtype=float))


def _recipe_duplicates(key: Callable[[np.ndarray], Hashable]):
    """pymoo's duplicate elimination by what a point means: `key(x)` (cached per point), against every point asked
    so far (`asked`, filled by `PymooDriver.ask`) and the populations pymoo compares with."""
    from pymoo.core.duplicate import DuplicateElimination

    class RecipeDuplicates(DuplicateElimination):
        def __init__(self) -> None:
            super().__init__()
            self.asked: set[Hashable] = set()
            self._keys: dict[bytes, Hashable] = {}

        def key(self, x: np.ndarray) -> Hashable:
            b = np.asarray(x, dtype=float).tobytes()
            if b not in self._keys:
                self._keys[b] = key(np.asarray(x, dtype=float))
            return self._keys[b]

        def _do(self, pop, other, is_duplicate):
            earlier = self.asked if other is None else {self.key(x) for x in other.get("X")}
            batch: set[Hashable] = set()  # this population's points before each one
            for i, x in enumerate(pop.get("X")):
                k = self.key(x)
                is_duplicate[i] = k in earlier or k in batch
                batch.add(k)
            return is_duplicate

    return RecipeDuplicates()


def _pymoo_algorithm(name: str, n_obj: int, pop_size: int, init: np.ndarray, options: dict[str, Any]):
    common = {"pop_size": pop_size, "sampling": init, "eliminate_duplicates": True, **options}
    if name == "nsga2":
        from pymoo.algorithms.moo.nsga2 import NSGA2

        return NSGA2(**common)
    if name == "smsemoa":
        from pymoo.algorithms.moo.sms import SMSEMOA, cv_and_dom_tournament
        from pymoo.operators.selection.tournament import TournamentSelection

        selection = TournamentSelection(func_comp=cv_and_dom_tournament)
        return SMSEMOA(**{"n_offsprings": pop_size, "selection": selection, **common})
    if name == "nsga3":
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.util.ref_dirs import get_reference_directions

        partitions = 1
        while _das_dennis_count(n_obj, partitions + 1) <= pop_size:
            partitions += 1
        from pymoo.algorithms.moo.nsga3 import comp_by_cv_then_random
        from pymoo.operators.selection.tournament import TournamentSelection

        ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=partitions)
        return NSGA3(ref_dirs=ref_dirs, selection=TournamentSelection(func_comp=comp_by_cv_then_random), **common)
    raise DriverError(f"unknown driver algorithm '{name}'; choose one of {', '.join(DRIVERS)}")


def _das_dennis_count(n_obj: int, partitions: int) -> int:
    from math import comb

    return comb(partitions + n_obj - 1, n_obj - 1)


def UnitProblem(n_var: int, n_obj: int):
    """A pymoo Problem over [0, 1]^n_var that pymoo never evaluates itself (ask/tell)."""
    from pymoo.core.problem import Problem

    return Problem(n_var=n_var, n_obj=n_obj, xl=0.0, xu=1.0)


# Options evomerge sets itself: a spec's `driver.options` may not override them (the population, the seeds, the
# budget and the evaluation loop are the search's).
_OWN_OPTIONS = {"pop_size", "sampling", "seed", "termination", "evaluator", "output", "display", "callback",
                "verbose", "save_history", "archive"}


def accepted_options(name: str) -> list[str]:
    """The `driver.options` an algorithm takes: cmaes its sigma0, a pymoo algorithm the named parameters of its
    constructors (pymoo passes unknown keywords on and ignores them, so a misspelt option would do nothing)."""
    import inspect

    if name == "random":
        return []
    if name == "cmaes":
        return ["sigma0", "start"]
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.algorithms.moo.sms import SMSEMOA

    cls = {"nsga2": NSGA2, "nsga3": NSGA3, "smsemoa": SMSEMOA}[name]
    names = {p for c in cls.__mro__ if "__init__" in vars(c)
             for p, v in inspect.signature(c.__init__).parameters.items()
             if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return sorted(names - _OWN_OPTIONS - ({"ref_dirs"} if name == "nsga3" else set()))


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise DriverError for an option the algorithm does not take, with the closest one it does."""
    from evomerge.config import suggest

    known = accepted_options(name)
    for key in options:
        if key not in known:
            taken = f"it takes {', '.join(known)}" if known else "it takes none"
            raise DriverError(f"{key}: not an option of {name}." + suggest(key, known, list_known=False)
                              + f" ({taken})")
    if name == "cmaes":  # values too, so a typo stops the job before anything is stored or started
        if "start" in options and options["start"] not in CMA_STARTS:
            raise DriverError(f"start: {options['start']!r} is not one of {', '.join(CMA_STARTS)}."
                              + suggest(str(options["start"]), CMA_STARTS, list_known=False))
        sigma = options.get("sigma0", 0.3)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise DriverError(f"sigma0: expected a number > 0 (the initial step, a share of the unit cube), got {sigma!r}")


def make_driver(name: str, n_var: int, n_obj: int, pop_size: int, seed: int, seeds: np.ndarray | None = None,
                same: Callable[[np.ndarray], Hashable] | None = None, **options: Any) -> Driver:
    """`same`: a point's identity (its recipe) for the pymoo drivers' duplicate elimination; random and cmaes
    ask what they draw (CMA-ES must be told the points it sampled), repeats answered from the archive."""
    if name == "random":
        return RandomSearch(n_var, n_obj, pop_size, seed, seeds)
    if name == "cmaes":
        return CMAES(n_var, n_obj, pop_size, seed, seeds, **options)
    if name in DRIVERS:
        return PymooDriver(name, n_var, n_obj, pop_size, seed, seeds, same, **options)
    from evomerge.config import suggest

    raise DriverError(f"unknown algorithm '{name}'." + suggest(name, DRIVERS, list_known=False)
                      + f" Choose one of {', '.join(DRIVERS)}")
