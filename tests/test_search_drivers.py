"""Drivers through ask and tell: seeds first, a fresh driver told the same losses continues the same trajectory,
and they optimise."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.drivers import DRIVERS, Driver, DriverError, make_driver

N_VAR = 4


def losses(X: np.ndarray, n_obj: int) -> np.ndarray:
    a = ((X - 0.3) ** 2).sum(1)
    b = ((X - 0.7) ** 2).sum(1)
    return np.stack([a, b], 1)[:, :n_obj]


def n_obj_for(name: str) -> int:
    return 1 if name == "cmaes" else 2


@pytest.mark.parametrize("name", DRIVERS)
def test_ask_tell_puts_seeds_first_and_stays_in_the_cube(name):
    seeds = np.array([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    d = make_driver(name, N_VAR, n_obj_for(name), 8, seed=0, seeds=seeds)
    X = d.ask()
    assert X.shape[1] == N_VAR and 1 <= len(X) <= 8
    np.testing.assert_allclose(X[:2], seeds)
    for _ in range(3):
        d.tell(X, losses(X, n_obj_for(name)))
        X = d.ask()
        if name != "cmaes":  # pycma's box is a little wider than [0, 1]; the loop clips
            assert X.min() >= 0 and X.max() <= 1
    assert d.generation == 3


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.parametrize("ahead", [False, True])
def test_a_fresh_driver_told_the_same_losses_continues_the_same_trajectory(name, ahead):
    """What a resume relies on instead of a pickle: the same seed, asks and tells (in the same interleaving, with
    asks ahead where the driver can) give the same points, so the archive can be replayed into a fresh driver."""
    n_obj = n_obj_for(name)

    def run(d: Driver, tells: int, record: list) -> None:
        asked = []
        while len(record) < tells:
            while not asked or (ahead and len(asked) < 2 and d.can_ask_ahead()):
                asked.append(d.ask())
            X = asked.pop(0)
            d.tell(X, losses(X, n_obj))
            record.append(X)

    straight, replayed = [], []
    d = make_driver(name, N_VAR, n_obj, 6, seed=5)
    run(d, 5, straight)
    e = make_driver(name, N_VAR, n_obj, 6, seed=5)
    run(e, 5, replayed)
    for a, b in zip(straight, replayed):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(d.ask(), e.ask())
    other = make_driver(name, N_VAR, n_obj, 6, seed=6)
    assert not np.array_equal(other.ask(), straight[0])  # the comparison can fail: the seed matters


def test_other_numpy_use_does_not_change_cmaes():
    def trajectory(noise: bool) -> np.ndarray:
        d = make_driver("cmaes", N_VAR, 1, 6, seed=2)
        for _ in range(3):
            X = d.ask()
            if noise:
                np.random.seed(123)
                np.random.rand(50)
            d.tell(X, losses(X, 1))
        return d.ask()

    np.testing.assert_array_equal(trajectory(False), trajectory(True))


def test_tell_must_match_ask():
    d = make_driver("cmaes", N_VAR, 1, 6, seed=0)
    X = d.ask()
    with pytest.raises(ValueError, match="exactly the points"):
        d.tell(X[:3], losses(X[:3], 1))


def test_configuration_errors():
    with pytest.raises(DriverError, match="one objective"):
        make_driver("cmaes", N_VAR, 2, 6, seed=0)
    with pytest.raises(DriverError, match="Choose one of"):
        make_driver("nsgaii", N_VAR, 2, 6, seed=0)


def _best_after(name: str, seed: int, n_obj: int = 1, gens: int = 8) -> float:
    d = make_driver(name, N_VAR, n_obj, 8, seed=seed)
    best = np.inf
    for _ in range(gens):
        X = d.ask()
        F = losses(X, n_obj)
        best = min(best, F[:, 0].min())
        d.tell(X, F)
    return best


def test_cmaes_beats_random_search_on_a_sphere():
    assert all(_best_after("cmaes", s) < _best_after("random", s) for s in range(3))


def test_nsga2_front_beats_random_search():
    from evomerge.search.front import hypervolume, pareto_mask

    def hv(name: str, seed: int) -> float:
        d = make_driver(name, N_VAR, 2, 8, seed=seed)
        allF = []
        for _ in range(10):
            X = d.ask()
            F = losses(X, 2)
            allF.append(F)
            d.tell(X, F)
        F = np.concatenate(allF)
        return hypervolume(F[pareto_mask(F)], np.array([2.0, 2.0]))

    assert sum(hv("nsga2", s) for s in range(3)) > sum(hv("random", s) for s in range(3))


def test_cmaes_best_seed_starts_at_the_best_point_of_the_first_population():
    """A warm start: the distribution's mean after the first tell is the best seed, so the next asks lie around it
    (sigma0 0.05: within 0.25 of it), while the centre start's lie around 0.5."""
    seeds = np.array([[0.9, 0.1, 0.9, 0.1], [0.3, 0.3, 0.3, 0.3]])  # the second is the loss's optimum
    d = make_driver("cmaes", N_VAR, 1, 8, seed=0, seeds=seeds, sigma0=0.05, start="best_seed")
    X = d.ask()
    np.testing.assert_allclose(X[:2], seeds)
    d.tell(X, losses(X, 1))
    np.testing.assert_allclose(d.es.mean, seeds[1])
    nxt = d.ask()
    assert np.abs(nxt - 0.3).max() < 0.25
    centre = make_driver("cmaes", N_VAR, 1, 8, seed=0, seeds=seeds, sigma0=0.05)
    X = centre.ask()
    centre.tell(X, losses(X, 1))
    assert np.abs(centre.es.mean - 0.3).max() > 0.05  # the comparison can fail: the start matters
    with pytest.raises(DriverError, match="start"):
        make_driver("cmaes", N_VAR, 1, 8, seed=0, start="best")


def test_cmaes_best_seed_replays_identically():
    def run() -> list[np.ndarray]:
        d = make_driver("cmaes", N_VAR, 1, 6, seed=3, seeds=np.full((1, N_VAR), 0.2), start="best_seed")
        out = []
        for _ in range(4):
            X = d.ask()
            d.tell(X, losses(X, 1))
            out.append(X)
        return out

    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


def test_cmaes_option_values_are_checked_before_a_job_starts():
    from evomerge.search.drivers import check_options

    with pytest.raises(DriverError, match="start: 'best' is not one of center, best_seed. Did you mean 'best_seed'"):
        check_options("cmaes", {"start": "best"})
    for bad in (0, -0.1, "0.3", True):
        with pytest.raises(DriverError, match="sigma0: expected a number > 0"):
            check_options("cmaes", {"sigma0": bad})
    check_options("cmaes", {"start": "best_seed", "sigma0": 0.2})


def test_a_driver_given_what_points_mean_never_asks_one_twice_and_ends_with_an_empty_ask():
    """`same`: a point's identity (the search passes its recipe's hash). Eleven identities (the first gene in
    tenths): every ask holds new ones only, across generations; once mating reaches none it has not asked (in
    pymoo's 100 tries) the ask is empty."""
    same = lambda x: round(float(x[0]) * 10)  # noqa: E731
    d = make_driver("nsga2", 3, 2, 4, seed=0, same=same)
    seen, sizes = [], []
    for _ in range(20):
        X = d.ask()
        sizes.append(len(X))
        if len(X) == 0:
            break
        seen += [same(x) for x in X]
        d.tell(X, np.stack([X[:, 0], 1 - X[:, 1]], axis=1))
    assert len(seen) == len(set(seen)) and 8 <= len(seen) <= 11
    assert sizes[-1] == 0 and all(n > 0 for n in sizes[:-1])
    plain = make_driver("nsga2", 3, 2, 4, seed=0)  # by coordinates only: identities repeat
    keys = []
    for _ in range(5):
        X = plain.ask()
        keys += [same(x) for x in X]
        plain.tell(X, np.stack([X[:, 0], 1 - X[:, 1]], axis=1))
    assert len(keys) > len(set(keys))


@pytest.mark.parametrize("name", ["nsga2", "smsemoa"])
def test_a_revised_elite_is_ranked_on_its_new_losses_at_the_next_survival(name):
    """A point told a loss that dominates everything survives every later tell; revised to a loss worse than every
    other, it is dropped at the next survival (the population keeps the others)."""
    pop = 6
    X = make_driver(name, N_VAR, 2, pop, seed=0).ask()  # what each driver below asks first (the same seed)
    F = 1.0 + losses(X, 2)
    F[0] = [0.0, 0.0]  # told as dominating every other point
    key = lambda x: tuple(np.round(x, 12))  # noqa: E731
    for revised in (False, True):
        e = make_driver(name, N_VAR, 2, pop, seed=0)
        e.tell(e.ask(), F)
        Y = e.ask()
        if revised:
            assert e.revise({key(X[0]): np.array([50.0, 50.0])}, key) == 1
        e.tell(Y, 1.0 + losses(Y, 2))
        kept = {key(x) for x in e.algo.pop.get("X")}
        assert (key(X[0]) in kept) is not revised
        assert len(kept) == pop


@pytest.mark.parametrize("name", ["random", "cmaes"])
def test_drivers_that_keep_no_told_points_have_nothing_to_revise(name):
    d = make_driver(name, N_VAR, n_obj_for(name), 6, seed=0)
    X = d.ask()
    d.tell(X, losses(X, n_obj_for(name)))
    assert d.revise({tuple(X[0]): np.zeros(n_obj_for(name))}, tuple) == 0
