"""IRT estimates on the candidates a search produces, replayed from a full-fitness search's store.

Why a replay: the error that matters is the one on the search's own candidates (layer paths over merges, later
generations far from the seed candidates), and measuring it needs every one of them scored in full. A search run
with `estimator: full` records every candidate's per-item results; this bench replays the IRT policy over that
archive generation by generation, exactly as `evomerge/search/irt_policy.py` schedules it (seed phase, a fit every
`calibrate_every` generations on the candidates scored in full before it, `calibrate_count` calibration candidates
chosen by the policy's own rule in the generation before each refit, every other candidate estimated from its
responses on the anchors), and compares each estimate with the candidate's measured full-split score.

Printed per objective, as ratios against the bounds and baselines measured in the same run:
- MAE on the anchor-scored candidates (the true in-search error) and the error the search would print
  (`irt.Calibration.printed_error`) at each fit: their ratio should be near 1 (the issue's target: within 25%);
- the same MAE for the plain mean of the anchors' responses and for the mean of a random item subset of the same
  size (seeded): the chosen estimator must beat both;
- coverage: the share of anchor-scored candidates with |error| <= 2 sd (target >= 90%), and the mean 2-sd width;
- the share of items scored against full scoring (target <= 25%).

    OMP_NUM_THREADS=1 .venv/bin/python bench/irt_in_search.py out/irt_search/full0/store.sqlite [--job full0]
        [--anchors 30 --seed-candidates 24 --calibrate-every 2 --calibrate-count 2]

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
from evomerge.search.irt_policy import calibration_choice, printed_error  # noqa: E402
from evomerge.store import Store  # noqa: E402


def load(store_path: Path, job: str | None) -> tuple[str, list, dict[str, tuple[list[str], np.ndarray]]]:
    store = Store(store_path, readonly=True)
    job = job or store.jobs()[0]
    rows = [r for r in store.candidates(job, status="done")]
    data = {}
    for name in (store.objectives(job) or []):
        items = store.items_of(job, name[0])
        ids = sorted({i for v in items.values() for i in v})
        keep = [r for r in rows if len(items.get(r.id, {})) == len(ids)]
        data[name[0]] = (ids, np.array([[items[r.id][i] for i in ids] for r in keep]), keep)
    store.close()
    return job, rows, data


def replay(ids: list[str], Y: np.ndarray, rows: list, anchors: int, seed_candidates: int, every: int, count: int,
           seed: int = 0) -> dict:
    gens = np.array([r.generation for r in rows])
    parents = [k for k, r in enumerate(rows) if r.origin.startswith("parent:")]
    truth = Y.mean(1)
    full = set()  # rows scored in full so far (by the simulated policy)
    g_all = sorted(set(gens.tolist()))
    g0 = None
    cal = None
    checks: list[tuple[float, float]] = []  # calibration candidates: (error, unscaled sd)
    chosen: list[str] = []
    est_rows, est, sds, printed, measured, plain, rand = [], [], [], [], [], [], []
    rng = np.random.default_rng([seed, 5])
    fits = 0
    t_fit = 0.0
    for g in g_all:
        here = [k for k in range(len(rows)) if gens[k] == g]
        if g0 is None:
            full.update(here)
            if len(full) >= seed_candidates:
                g0 = g + 1
            continue
        if (g - g0) % every == 0:  # refit on everything scored in full before this generation
            fit_rows = sorted(full)
            t = time.perf_counter()
            cal = irt.calibrate(Y[fit_rows], anchors, "irt", 0, [fit_rows.index(p) for p in parents if p in full],
                                extra_residuals=checks)
            t_fit += time.perf_counter() - t
            fits += 1
            printed.append((g, printed_error(cal, [abs(r) for r, _ in checks])[0], len(est_rows)))
            chosen.append(cal.estimator)
        calib = set()
        if count and (g - g0) % every == every - 1:
            ests = [cal.estimate(Y[k, cal.anchors.items]) for k in here]
            calib = {here[i] for i in calibration_choice([e.sd for e in ests], count, [seed, g, 17])}
        for k in here:
            e = cal.estimate(Y[k, cal.anchors.items])
            if k in calib:
                measured.append(abs(e.value - truth[k]))
                checks.append((e.value - truth[k], e.sd / cal.sd_scale))
                full.add(k)
                continue
            est_rows.append(k)
            est.append(e.value)
            sds.append(e.sd)
            plain.append(Y[k, cal.anchors.items].mean())
            rand.append(Y[k, rng.choice(Y.shape[1], len(cal.anchors.items), replace=False)].mean())
    t = truth[est_rows]
    err = np.abs(np.array(est) - t)
    # what was printed at each fit against the error of the estimates made under that fit and later
    ratios = [p / err[start:].mean() for _, p, start in printed if start < len(err)]
    items = sum(Y.shape[1] if k in full else len(cal.anchors.items) for k in range(len(rows)))
    return {"estimated": len(est_rows), "mae": float(err.mean()), "worst": float(err.max()),
            "printed": printed, "measured_on_calibration": float(np.mean(measured)) if measured else None,
            "plain_anchor_mean_mae": float(np.abs(np.array(plain) - t).mean()),
            "random_subset_mae": float(np.abs(np.array(rand) - t).mean()),
            "within_2sd": float(np.mean(err <= 2 * np.array(sds))), "mean_2sd": float(2 * np.mean(sds)),
            "items_fraction": items / (Y.shape[0] * Y.shape[1]), "fits": fits, "fit_seconds": t_fit,
            "printed_over_true": ratios, "estimators": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--job")
    ap.add_argument("--anchors", type=int, default=30)
    ap.add_argument("--seed-candidates", type=int, default=24)
    ap.add_argument("--calibrate-every", type=int, default=2)
    ap.add_argument("--calibrate-count", type=int, default=2)
    args = ap.parse_args()
    job, rows, data = load(args.store, args.job)
    print(f"{args.store} job {job}: {len(rows)} candidates; anchors {args.anchors}, seed_candidates "
          f"{args.seed_candidates}, calibrate every {args.calibrate_every} generations x {args.calibrate_count}")
    for name, (ids, Y, keep) in data.items():
        r = replay(ids, Y, keep, args.anchors, args.seed_candidates, args.calibrate_every, args.calibrate_count)
        ratios = r["printed_over_true"]
        print(f"\n{name}: {len(ids)} items, {Y.shape[0]} candidates, {r['estimated']} estimated, {r['fits']} fits "
              f"({r['fit_seconds']:.1f} s), estimators {', '.join(r['estimators'])}")
        print(f"  in-search MAE {r['mae']:.4f} (worst {r['worst']:.3f}); printed at the fits: "
              + ", ".join(f"g{g} {p:.4f}" for g, p, _ in r["printed"]))
        print("  printed / the error of the estimates made from then on: " + ", ".join(f"{x:.2f}" for x in ratios)
              + f" (median {np.median(ratios):.2f}; target within 0.75-1.25)")
        mc = r["measured_on_calibration"]
        print(f"  measured on calibration candidates {mc:.4f}" if mc is not None else "  no calibration candidates")
        print(f"  baselines: plain anchor mean {r['plain_anchor_mean_mae']:.4f} (ratio {r['mae'] / r['plain_anchor_mean_mae']:.2f}), "
              f"random subset of {args.anchors} {r['random_subset_mae']:.4f} (ratio {r['mae'] / r['random_subset_mae']:.2f})")
        print(f"  within 2 sd: {r['within_2sd']:.0%} (target 90%), mean 2-sd width {r['mean_2sd']:.3f}; "
              f"items scored {r['items_fraction']:.0%} of full scoring")


if __name__ == "__main__":
    main()
