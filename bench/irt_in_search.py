"""IRT estimates on the candidates a search produces, replayed from a full-fitness search's store.

Why a replay: the error that matters is the one on the search's own candidates (layer paths over merges, later
generations far from the seed candidates), and measuring it needs every one of them scored in full. A search run
with `estimator: full` records every candidate's per-item results; this bench replays the IRT policy over that
archive generation by generation, exactly as `evomerge/search/irt_policy.py` schedules it (seed phase, a fit every
`calibrate_every` generations on the candidates scored in full before it, `calibrate_count` calibration candidates
chosen by the policy's own rule in the generation before each refit, per generation `confirm_count` estimated
candidates whose interval overlaps the front scored in full by the policy's rule, every other candidate estimated
from its responses on the anchors), and compares each estimate with the candidate's measured full-split score.
What a replay cannot show: the search's own path under its estimates (`bench/irt_search_quality.py` runs that).

Printed per objective, as ratios against the bounds and baselines measured in the same run:
- MAE on the anchor-scored candidates (the true in-search error) and the error the search would print
  (`irt.Calibration.printed_error`) at each fit: their ratio should be near 1 (the issue's target: within 25%);
- the same MAE for the plain mean of the anchors' responses and for the mean of a random item subset of the same
  size (seeded): the chosen estimator must beat both;
- coverage: the share of anchor-scored candidates with |error| <= 2 sd (target >= 90%), and the mean 2-sd width;
- the share of items scored against full scoring (target <= 25%).

    OMP_NUM_THREADS=1 .venv/bin/python bench/irt_in_search.py out/irt_search/full0/store.sqlite [--job full0]
        [--anchors 30 --seed-candidates 24 --calibrate-every 2 --calibrate-count 2 --confirm-count 1]

Data: `evomerge run` of a full-fitness job: the demo's spec (`evomerge.service.demo.demo_spec(zoo, out, 1, 240)`)
with each objective's IRT keys (estimator, anchors, seed_candidates, calibrate_every, calibrate_count) removed,
`driver.seed` 0, 1 or 2 and `runtime: {kind: local}`; 240 candidates asked, about 5 minutes each on one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.fitness import irt  # noqa: E402
from evomerge.search.front import pareto_mask  # noqa: E402
from evomerge.search.irt_policy import calibration_choice, overlapping, printed_error  # noqa: E402
from evomerge.store import Store  # noqa: E402


def load(store_path: Path, job: str | None) -> tuple[str, list, dict[str, tuple[list[str], np.ndarray, list]]]:
    """The job's done candidates scored in full on every objective, and per objective its item ids and their 0/1
    results (rows: those candidates, in id order)."""
    store = Store(store_path, readonly=True)
    job = job or store.jobs()[0]
    rows = [r for r in store.candidates(job, status="done")]
    names = [n for n, _ in (store.objectives(job) or [])]
    items = {n: store.items_of(job, n) for n in names}
    ids = {n: sorted({i for v in items[n].values() for i in v}) for n in names}
    keep = [r for r in rows if all(len(items[n].get(r.id, {})) == len(ids[n]) for n in names)]
    data = {n: (ids[n], np.array([[items[n][r.id][i] for i in ids[n]] for r in keep]), keep) for n in names}
    store.close()
    return job, rows, data


def replay(data: dict[str, tuple[list[str], np.ndarray, list]], anchors: int, seed_candidates: int, every: int,
           count: int, confirm: int, seed: int = 0, neighbours: bool = True) -> dict[str, dict]:
    """The policy over the archive, every objective at once (maximised, as the zoo's accuracies): the seed phase,
    a fit every `every` generations, `count` calibration candidates chosen by the policy's rule in the generation
    before each refit, and per generation and objective up to `confirm` estimated candidates whose interval
    overlaps the front scored in full (`entrants`' rule, `overlapping`: the front of what earlier generations and
    this one's measured candidates were told). With `neighbours`, each generation's estimates are corrected by the
    candidates of earlier generations scored in full (`irt.neighbours`, as `IRTPolicy._neighbours`). Returns per
    objective what `main` prints."""
    names = list(data)
    rows = data[names[0]][2]
    Ys = [data[n][1] for n in names]
    gens = np.array([r.generation for r in rows])
    parents = [k for k, r in enumerate(rows) if r.origin.startswith("parent:")]
    truth = np.array([Y.mean(1) for Y in Ys]).T  # candidates x objectives
    told = np.full_like(truth, np.nan)  # what the driver was told
    full: list[set[int]] = [set() for _ in names]  # per objective, rows scored in full so far (by the policy)
    g0, cals = None, [None] * len(names)
    checks: list[list[tuple[float, float]]] = [[] for _ in names]  # calibration candidates: (error, unscaled sd)
    rng = np.random.default_rng([seed, 5])
    out = {n: {"est_rows": [], "est": [], "sds": [], "printed": [], "measured": [], "plain": [], "rand": [],
               "chosen": [], "fits": 0, "t_fit": 0.0} for n in names}
    confirmed = 0
    for g in sorted(set(gens.tolist())):
        here = [k for k in range(len(rows)) if gens[k] == g]
        if g0 is None:
            for f in full:
                f.update(here)
            told[here] = truth[here]
            if len(full[0]) >= seed_candidates:
                g0 = g + 1
            continue
        if (g - g0) % every == 0:  # refit on everything scored in full before this generation
            for j, n in enumerate(names):
                fit_rows = sorted(full[j])
                t = time.perf_counter()
                cals[j] = irt.calibrate(Ys[j][fit_rows], anchors, "irt", 0,
                                        [fit_rows.index(p) for p in parents if p in full[j]],
                                        extra_residuals=checks[j])
                out[n]["t_fit"] += time.perf_counter() - t
                out[n]["fits"] += 1
                out[n]["printed"].append((g, printed_error(cals[j], [abs(r) for r, _ in checks[j]])[0],
                                          len(out[n]["est_rows"])))
                out[n]["chosen"].append(cals[j].estimator)
        est = {k: [cals[j].estimate(Ys[j][k, cals[j].anchors.items]) for j in range(len(names))] for k in here}
        if neighbours:
            for j in range(len(names)):
                items_j = cals[j].anchors.items
                ref = sorted(k for k in full[j] if gens[k] < g)
                raw = np.array([cals[j].estimate(Ys[j][k, items_j]).value for k in ref])
                nb = irt.neighbours(Ys[j][ref][:, items_j], truth[ref, j] - raw)
                for k in here:
                    est[k][j] = nb.correct(est[k][j], Ys[j][k, items_j])
        calib = set()
        if count and (g - g0) % every == every - 1:
            calib = {here[i] for i in calibration_choice([0.0] * len(here), count, [seed, g, 17])}
        # entrants: the front of earlier generations' told values and this one's calibration candidates
        before = [k for k in range(len(rows)) if gens[k] < g] + sorted(calib)
        F = -np.array([truth[k] if k in calib else told[k] for k in before])
        front = F[pareto_mask(F)] if len(F) else F
        chosen: list[set[int]] = [set() for _ in names]  # per objective: its estimate measured
        for j in range(len(names)):
            candidates = []
            for k in here:
                if k in calib:
                    continue
                point = -np.array([e.value for e in est[k]])
                best = point.copy()
                best[j] -= 2 * est[k][j].sd
                candidates.append((k, point, best))
            chosen[j].update(overlapping(front, candidates, j, confirm))
        confirmed += len(set().union(*chosen))
        for k in here:
            for j, n in enumerate(names):
                measured_now = k in calib or k in chosen[j]
                if measured_now:
                    full[j].add(k)
                told[k, j] = truth[k, j] if measured_now else est[k][j].value
                e, o = est[k][j], out[n]
                if k in calib:
                    o["measured"].append(abs(e.value - truth[k, j]))
                    checks[j].append((e.value - truth[k, j], e.sd / cals[j].sd_scale))
                    continue
                # confirmed candidates were estimated too (their estimate is in the error, as in the store)
                o["est_rows"].append(k)
                o["est"].append(e.value)
                o["sds"].append(e.sd)
                o["plain"].append(Ys[j][k, cals[j].anchors.items].mean())
                o["rand"].append(Ys[j][k, rng.choice(Ys[j].shape[1], len(cals[j].anchors.items), replace=False)].mean())
    results = {}
    for j, n in enumerate(names):
        o, Y = out[n], Ys[j]
        t = truth[o["est_rows"], j]
        err = np.abs(np.array(o["est"]) - t)
        # what was printed at each fit against the error of the estimates made under that fit and later
        ratios = [p / err[start:].mean() for _, p, start in o["printed"] if start < len(err)]
        n_anchors = len(cals[j].anchors.items)
        estimated = set(o["est_rows"])
        # confirmed here: anchors, then every item; confirmed on another objective only: anchors again
        items = sum(Y.shape[1] if k in full[j] else n_anchors for k in range(len(rows))) + n_anchors * sum(
            1 for k in estimated if any(k in f for f in full))
        results[n] = {"estimated": len(o["est_rows"]), "mae": float(err.mean()), "worst": float(err.max()),
                      "printed": o["printed"],
                      "measured_on_calibration": float(np.mean(o["measured"])) if o["measured"] else None,
                      "plain_anchor_mean_mae": float(np.abs(np.array(o["plain"]) - t).mean()),
                      "random_subset_mae": float(np.abs(np.array(o["rand"]) - t).mean()),
                      "within_2sd": float(np.mean(err <= 2 * np.array(o["sds"]))), "mean_2sd": float(2 * np.mean(o["sds"])),
                      "items_fraction": items / (Y.shape[0] * Y.shape[1]), "fits": o["fits"], "fit_seconds": o["t_fit"],
                      "printed_over_true": ratios, "estimators": o["chosen"], "confirmed": confirmed,
                      "confirmed_here": sum(1 for k in estimated if k in full[j])}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--job")
    ap.add_argument("--anchors", type=int, default=30)
    ap.add_argument("--seed-candidates", type=int, default=24)
    ap.add_argument("--calibrate-every", type=int, default=2)
    ap.add_argument("--calibrate-count", type=int, default=2)
    ap.add_argument("--confirm-count", type=int, default=1)
    ap.add_argument("--no-neighbours", action="store_true", help="replay without the neighbour correction only")
    args = ap.parse_args()
    job, rows, data = load(args.store, args.job)
    print(f"{args.store} job {job}: {len(rows)} candidates; anchors {args.anchors}, seed_candidates "
          f"{args.seed_candidates}, calibrate every {args.calibrate_every} generations x {args.calibrate_count}, "
          f"confirm {args.confirm_count} per generation and objective")
    results = replay(data, args.anchors, args.seed_candidates, args.calibrate_every, args.calibrate_count,
                     args.confirm_count, neighbours=not args.no_neighbours)
    # the peer: the same replay without the neighbour correction
    without = None if args.no_neighbours else replay(data, args.anchors, args.seed_candidates, args.calibrate_every,
                                                     args.calibrate_count, args.confirm_count, neighbours=False)
    for name, r in results.items():
        ids, Y, _ = data[name]
        ratios = r["printed_over_true"]
        print(f"\n{name}: {len(ids)} items, {Y.shape[0]} candidates, {r['estimated']} estimated ({r['confirmed_here']} "
              f"of them measured later; {r['confirmed']} confirmed on any objective), {r['fits']} fits ({r['fit_seconds']:.1f} s), estimators "
              f"{', '.join(r['estimators'])}")
        print(f"  in-search MAE {r['mae']:.4f} (worst {r['worst']:.3f}); printed at the fits: "
              + ", ".join(f"g{g} {p:.4f}" for g, p, _ in r["printed"]))
        print("  printed / the error of the estimates made from then on: " + ", ".join(f"{x:.2f}" for x in ratios)
              + f" (median {np.median(ratios):.2f})")
        mc = r["measured_on_calibration"]
        print(f"  measured on calibration candidates {mc:.4f}" if mc is not None else "  no calibration candidates")
        print(f"  baselines: plain anchor mean {r['plain_anchor_mean_mae']:.4f} (ratio {r['mae'] / r['plain_anchor_mean_mae']:.2f}), "
              f"random subset of {args.anchors} {r['random_subset_mae']:.4f} (ratio {r['mae'] / r['random_subset_mae']:.2f})")
        print(f"  within 2 sd: {r['within_2sd']:.0%} (target 90%), mean 2-sd width {r['mean_2sd']:.3f}; "
              f"items scored {r['items_fraction']:.0%} of full scoring (target 25%)")
        if without is not None:
            w = without[name]
            print(f"  without the neighbour correction: in-search MAE {w['mae']:.4f} (with / without "
                  f"{r['mae'] / w['mae']:.2f}), within 2 sd {w['within_2sd']:.0%}, items {w['items_fraction']:.0%}")


if __name__ == "__main__":
    main()
