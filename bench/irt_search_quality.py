"""IRT-reduced searches against full-fitness searches of the same seeds: is the front as good, at what item cost?

For each seed, one search scores every candidate on every item (`estimator: full`) and one or more score most
candidates on the IRT anchors (the demo's objectives; IRT settings over a fixed base, varied by `--irt KEY=V,...`).
After each IRT search the candidates of its final front are scored in full here (what a user exports is measured
anyway), and the bench prints, per seed and summed over seeds, as ratios against the full-fitness search run in
the same bench:
- hypervolume of the IRT front re-scored in full / hypervolume of the full-fitness front (target >= 0.95; the
  reference point is 0 on every objective: accuracies, all maximised). The re-scored front is recomputed as the
  search would: its old members, now measured, with the candidates the search had measured on every objective
  (seed, calibration and confirmed candidates an over-estimated member may have pushed off it); its old members
  alone are printed beside it;
- items scored by the IRT search, with its in-search confirmations and the post-search confirmation, / items
  scored by the full-fitness search (target <= 0.25), and the same with this bench's re-scoring of the front
  added (a measurement of the bench, not something the search or a user runs: what a user exports, the front's
  best per objective and its knee, the post-search confirmation measured already);
- the error of the estimates the IRT search measured later (its calibration and confirmed candidates), and the
  error it printed at its last fit.
- with `--rescore-all`, every candidate of each IRT search scored in full afterwards: the hypervolume of everything
  it produced (against the re-scored front: the loss from not recognising good candidates on their estimates,
  against the full search: the loss from never producing them), and the error and bias of all its anchor
  estimates and of those on the best tenth of its candidates by measured value.

    OMP_NUM_THREADS=1 .venv/bin/python bench/irt_search_quality.py --zoo .cache/zoo --out out/bench_irt \\
        [--space hybrid|sakana_ps|layerwise_ps|...] [--seeds 0,1,2] [--evaluations 280] [--parallel 2] \\
        [--irt confirm_count=0 --irt confirm_count=1,seed_candidates=12] [--rescore-all]

Every search runs as its own `evomerge run` process (`--parallel` at once, one thread each); a search whose store
holds a finished job of the same spec is not run again (delete OUT to start over). About 1-2 minutes per search
on one thread at 280 evaluations of the demo's two zoo tasks (7-11 on earlier, slower machines; two at once on a
2-core machine; every one of the 280 is a distinct merge since the drivers breed repeats again,
`driver.duplicates: skip`). Seeds differ a lot (one setting's ratio ranged 0.81-0.99 over six): compare settings on
six seeds or more.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.search.confirm import choose  # noqa: E402
from evomerge.search.front import hypervolume, pareto_mask  # noqa: E402
from evomerge.search.irt_policy import irt_summary  # noqa: E402
from evomerge.service.demo import demo_spec  # noqa: E402
from evomerge.store import Store  # noqa: E402

# The demo's space until 2026-12-06 (a task-arithmetic merge, then a layer path through it and the parents), what
# this bench's README tables measured as `hybrid`; the demo searches the `sakana_ps` preset now
HYBRID_SPACE = {"kind": "hybrid",
                "ps": {"method": "task_arithmetic", "weight_bounds": [0.0, 1.0], "parameters": {"normalize": False}},
                "dfs": {"repeats": 1, "min_layers": 2, "max_layers": 8, "embed": "merge", "head": "merge",
                        "scales": "none"}}

IRT_KEYS = ("estimator", "anchors", "seed_candidates", "calibrate_every", "calibrate_count", "confirm_count",
            "recheck_every", "reestimate", "max_error", "irt_estimator", "anchor_method")


def _value(key: str, text: str) -> int | float | str:
    """An `--irt` value as the objective's key takes it: an error (float), a name (str), else a count (int).
    `evaluations` is the IRT search's own candidate budget (default `--evaluations`, the full search's)."""
    key = key.split(".", 1)[-1]  # OBJECTIVE.KEY: one objective's setting
    if key not in IRT_KEYS + ("evaluations",):
        raise SystemExit(f"--irt: unknown key '{key}' (one of {', '.join(IRT_KEYS)}, or evaluations)")
    if key in ("estimator", "irt_estimator", "anchor_method"):
        return text
    try:
        return float(text) if key == "max_error" else int(text)
    except ValueError:
        raise SystemExit(f"--irt: {key}={text}: expected {'a number' if key == 'max_error' else 'a whole number'}")


def job(zoo: Path, out: Path, name: str, space: str, seed: int, evaluations: int, irt: dict | None) -> dict:
    """The demo's job (two zoo tasks, NSGA-II, population 12) on one local thread, its IRT settings replaced by
    `irt` (None: full fitness)."""
    spec = demo_spec(zoo, out, 1, evaluations)
    spec.update(name=name, store=str(out / name / "store.sqlite"), report=str(out / name / "report"))
    spec.pop("report_split", None)  # the test split is not what this bench compares
    spec["search_space"] = copy.deepcopy(HYBRID_SPACE) if space == "hybrid" else space
    spec["driver"]["seed"] = seed
    spec["runtime"] = {"kind": "local", "threads": 1, "device": "cpu", "backend": "hf", "batch_size": 64}
    for o in spec["objectives"]["objectives"]:
        for k in IRT_KEYS:
            o.pop(k, None)
        if irt is not None:
            own = o.get("name") or o.get("task")  # `zoo_composed.confirm_count=2`: that objective's only
            o.update({"estimator": "irt", "anchors": 30, "seed_candidates": 24, "calibrate_every": 2,
                      "calibrate_count": 2, **{k: v for k, v in irt.items() if "." not in k},
                      **{k.split(".", 1)[1]: v for k, v in irt.items() if k.split(".", 1)[0] == own and "." in k}})
    return spec


def finished(spec: dict) -> bool:
    path = Path(spec["store"])
    if not path.exists():
        return False
    store = Store(path, readonly=True)
    try:
        row = store.job(spec["name"])
        if not row or row["status"] != "done":
            return False
        return row["spec"]["driver"].get("duplicates", "cache") == spec["driver"]["duplicates"]
    finally:
        store.close()


def run_all(specs: list[dict], parallel: int) -> None:
    todo = [s for s in specs if not finished(s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    running: list[tuple[subprocess.Popen, dict, float]] = []
    while todo or running:
        while todo and len(running) < parallel:
            s = todo.pop(0)
            folder = Path(s["store"]).parent
            if folder.exists():
                for p in folder.glob("store.sqlite*"):
                    p.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "job.yaml"
            path.write_text(yaml.safe_dump(s, sort_keys=False))
            log = open(folder / "run.log", "w")
            p = subprocess.Popen([str(REPO / ".venv/bin/evomerge"), "run", str(path)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
            running.append((p, s, time.monotonic()))
            print(f"  started {s['name']}", flush=True)
        time.sleep(2)
        for p, s, t in list(running):
            if p.poll() is not None:
                running.remove((p, s, t))
                print(f"  {s['name']}: rc {p.returncode} after {time.monotonic() - t:.0f} s", flush=True)
                if p.returncode != 0:
                    raise SystemExit(f"{s['name']} failed: see {Path(s['store']).parent / 'run.log'}")


def items_scored(store: Store, job_name: str) -> int:
    """Every item scoring the search ran: per IRT objective as its report counts them (`irt_summary`: the anchors of
    candidates measured later, and anchors scored again when another objective was confirmed, included), per other
    objective the items stored for its done candidates."""
    summary = irt_summary(store, job_name)
    done = {r.id for r in store.candidates(job_name, status="done")}
    total = 0
    for name, _ in store.objectives(job_name) or []:
        if name in summary:
            total += summary[name]["items_scored"]
        else:
            total += sum(len(v) for c, v in store.items_of(job_name, name).items() if c in done)
    return total


def rescore_front(spec_dict: dict) -> tuple[np.ndarray, np.ndarray, int, int, dict[int, dict[str, float]]]:
    """The final front's candidates still estimated, scored in full here. Returns the front's measured values
    (rows: candidates, columns: objectives), the measured values of the search's other candidates scored in full on
    every objective (seed, calibration and confirmed candidates the estimated front dominated: once the front is
    measured, they may be on it again, as `Recorder.front_ids` would recompute it), the items this scoring ran and
    how many candidates it scored, and the re-scored values by candidate id. Candidates off the front still
    estimated are left out (their values are not known): what the two sets' front covers is a lower bound on the
    re-scored search's."""
    store = Store(Path(spec_dict["store"]), readonly=True)
    name = spec_dict["name"]
    front = set(store.front(name))
    done = store.candidates(name, status="done")
    rows = [r for r in done if r.id in front]
    names = [o[0] for o in store.objectives(name)]
    values = {r.id: dict(r.values) for r in rows}
    others = np.array([[r.values[n] for n in names] for r in done if r.id not in front and not r.estimated])
    todo = [r for r in rows if r.estimated]
    scored = score_in_full(store, name, todo)
    values.update({cid: v for cid, (v, _) in scored.items()})
    spent = sum(n for _, n in scored.values())
    store.close()
    measured = np.array([[values[r.id][n] for n in names] for r in rows]).reshape(-1, len(names))
    rescored = {r.id: values[r.id] for r in todo}
    return measured, others.reshape(-1, len(names)), spent, len(todo), rescored


def score_in_full(store: Store, name: str, rows: list) -> dict[int, tuple[dict[str, float], int]]:
    """The job's candidates `rows` scored on every item here, on the job's own runtime: {id: (values, items
    scored)}. A candidate that fails stops the bench (it was scored once already)."""
    if not rows:
        return {}
    from evomerge.search.jobs import make_runtime
    from evomerge.search.spec import JobSpec
    from evomerge.spaces.presets import build_space

    spec = JobSpec.from_dict(store.job(name)["spec"])
    space = build_space(spec.search_space, spec.models, spec.base)
    runtime = make_runtime(spec)
    for r in rows:
        runtime.submit(r.id, space.decode(np.array(r.genome)))
    out = {}
    for res in runtime.as_completed():
        assert res.ok, res.reason
        out[res.cid] = (dict(res.values), sum(len(v) for v in res.items.values()))
    runtime.close()
    return out


def rescore_all(spec_dict: dict) -> tuple[list[str], dict[int, dict[str, float]]]:
    """Every done candidate's measured values (objectives in order, by id): the search's own where it measured them,
    the rest scored in full here (a full-fitness search's cost per IRT search; kept in the run's folder as
    rescored_all.json and reused). What splits a hypervolume loss into candidates the search never produced and
    ones it produced but did not recognise on their estimates."""
    store = Store(Path(spec_dict["store"]), readonly=True)
    name = spec_dict["name"]
    names = [o[0] for o in store.objectives(name)]
    done = store.candidates(name, status="done")
    cache = Path(spec_dict["store"]).parent / "rescored_all.json"
    kept = json.loads(cache.read_text()) if cache.exists() else {}
    # reused only for the same recipe under the same id (a search run again in the folder makes other candidates)
    known = {r.id: kept[str(r.id)]["values"] for r in done
             if str(r.id) in kept and kept[str(r.id)].get("recipe") == r.recipe_hash}
    todo = [r for r in done if r.estimated and r.id not in known]
    if todo:
        print(f"  {name}: scoring its {len(todo)} estimated candidates in full (--rescore-all)", flush=True)
        known.update({cid: v for cid, (v, _) in score_in_full(store, name, todo).items()})
        hashes = {r.id: r.recipe_hash for r in done}
        cache.write_text(json.dumps({str(c): {"recipe": hashes[c], "values": v} for c, v in sorted(known.items())}))
    truth = {r.id: known[r.id] if r.estimated else dict(r.values) for r in done}
    store.close()
    return names, truth


def estimate_errors(spec_dict: dict, truth: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per IRT objective, the errors (estimate - measured) of every estimate the search made from anchors: all of
    them, and the tenth of those candidates best by measured value (where a search climbs: an estimator that
    shrinks new abilities towards what it was fitted on under-estimates exactly these)."""
    store = Store(Path(spec_dict["store"]), readonly=True)
    out = {}
    ests = [e for e in store.estimates(spec_dict["name"]) if e["scored"] < e["total"] and e["candidate"] in truth]
    store.close()
    for n in sorted({e["objective"] for e in ests}):
        mine = [e for e in ests if e["objective"] == n]
        t = np.array([truth[e["candidate"]][n] for e in mine])
        err = np.array([e["value"] for e in mine]) - t
        top = t >= np.quantile(t, 0.9)
        out[n] = {"n": len(mine), "mae": float(np.abs(err).mean()), "bias": float(err.mean()),
                  "top_mae": float(np.abs(err[top]).mean()), "top_bias": float(err[top].mean())}
    return out


def pick_values(spec_dict: dict, rescored: dict[int, dict[str, float]]) -> dict[str, float | None]:
    """What a user exports by `--best OBJECTIVE` from the IRT search (`confirm.choose`, after its confirmation):
    the pick's measured value per objective (the bench's re-scoring where the search left it estimated; None when
    it is still an estimate off the front, which the bench does not score)."""
    store = Store(Path(spec_dict["store"]), readonly=True)
    name = spec_dict["name"]
    names = [o[0] for o in store.objectives(name)]
    chosen = choose(store, name, names, store.front(name))
    still = store.open_estimates(name)
    out: dict[str, float | None] = {}
    for n, cid in chosen.best.items():
        row = store.candidate(name, cid)
        if n not in still.get(cid, ()):
            out[n] = row.values[n]
        else:
            out[n] = rescored[cid][n] if cid in rescored else None
    store.close()
    return out


def final_confirmation(spec_dict: dict) -> dict:
    """What the post-search confirmation of the picks did, from the search's log (`evomerge.search.confirm`'s
    lines): candidates scored, rounds, and whether picks were left estimated when the rounds ran out."""
    text = (Path(spec_dict["store"]).parent / "run.log").read_text()
    first = re.search(r"confirming the front's picks .*?: (\d+) estimated candidate", text)
    more = re.search(r"confirmed (\d+) candidate\(s\) in (\d+) rounds", text)
    if more:
        candidates, rounds = int(more.group(1)), int(more.group(2))
    else:
        candidates, rounds = (int(first.group(1)), 1) if first else (0, 0)
    return {"candidates": candidates, "rounds": rounds, "picks_left_estimated": "are still estimated" in text}


def hv(values: np.ndarray) -> float:
    F = -values  # losses of maximised accuracies; reference point 0
    return float(hypervolume(F[pareto_mask(F)], np.zeros(F.shape[1]))) if len(F) else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=str(REPO / ".cache/zoo"))
    ap.add_argument("--out", default=str(REPO / "out/bench_irt"))
    ap.add_argument("--space", default="hybrid", help="hybrid (task arithmetic, then a layer path: the demo's space "
                    "until 2026-12-06) or a preset name (sakana_ps: the demo's space now; layerwise_ps, ...)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--evaluations", type=int, default=280)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--duplicates", choices=("skip", "cache"), default="skip",
                    help="every search's driver.duplicates: skip (the default: repeats bred again) or cache (asked, "
                         "answered from the archive: how evomerge searched before 2026-12-03)")
    ap.add_argument("--irt", action="append", default=None,
                    help="IRT settings of one IRT search per seed, KEY=V[,KEY=V], over anchors 30, seed_candidates "
                         "24, calibrate_every 2, calibrate_count 2 (the demo's before confirmations; other keys: the "
                         "objectives' defaults); OBJECTIVE.KEY=V sets one objective's (zoo_composed.confirm_count=2); "
                         "repeat for more")
    ap.add_argument("--rescore-all", action="store_true",
                    help="also score every estimated candidate of each IRT search in full (a full search's cost "
                         "each, kept in its folder): the hypervolume of everything it produced, and its estimates' "
                         "error and bias overall and on the best tenth")
    args = ap.parse_args(argv)
    zoo, out = Path(args.zoo).resolve(), Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = []
    for text in args.irt or [""]:
        kv = dict(p.split("=", 1) for p in text.split(",") if p)
        settings.append({k: _value(k, v) for k, v in kv.items()})
    tag = lambda d: "-".join(f"{k}{v}" for k, v in sorted(d.items())) or "defaults"  # noqa: E731
    specs = {}
    for seed in seeds:
        specs[seed, "full"] = job(zoo, out, f"{args.space}-full-{seed}", args.space, seed, args.evaluations, None)
        for s in settings:
            own = {k: v for k, v in s.items() if k != "evaluations"}
            specs[seed, tag(s)] = job(zoo, out, f"{args.space}-irt-{tag(s)}-{seed}", args.space, seed,
                                      int(s.get("evaluations", args.evaluations)), own)
    for spec in specs.values():  # a stored search of the other setting is run again (`finished`)
        spec["driver"]["duplicates"] = args.duplicates
    print(f"{len(specs)} searches ({args.space}, {args.evaluations} evaluations, seeds {seeds}); "
          f"{sum(not finished(s) for s in specs.values())} to run", flush=True)
    run_all(list(specs.values()), args.parallel)

    results: dict = {"settings": vars(args), "runs": []}
    for s in settings:
        hv_sum = [0.0, 0.0, 0.0, 0.0]  # re-scored front, full search, old front alone, all produced (--rescore-all)
        items_sum = [0, 0, 0]
        pick_ratios: list[float] = []  # a --best pick's measured value over the full search's best (maximised)
        for seed in seeds:
            full, mine = specs[seed, "full"], specs[seed, tag(s)]
            fs = Store(Path(full["store"]), readonly=True)
            names = [o[0] for o in fs.objectives(full["name"])]
            frows = [r for r in fs.candidates(full["name"], status="done")]
            f_hv = hv(np.array([[r.values[n] for n in names] for r in frows]))
            f_items = items_scored(fs, full["name"])
            fs.close()
            front, others, spent, rescored, rescored_values = rescore_front(mine)
            picked = pick_values(mine, rescored_values)
            fs = Store(Path(full["store"]), readonly=True)
            full_best = {n: (max if d == "maximise" else min)(r.values[n] for r in frows)
                         for n, d in fs.objectives(full["name"])}
            fs.close()
            st = Store(Path(mine["store"]), readonly=True)
            search_items = items_scored(st, mine["name"])  # the search's own, confirmations included
            i_items = search_items + spent  # and the bench's re-scoring of the front
            n_done = len(st.candidates(mine["name"], status="done"))
            summ = irt_summary(st, mine["name"])
            final = final_confirmation(mine)
            st.close()
            i_hv = hv(np.vstack([front, others]))  # the front re-scored, with the measured candidates it dominated
            front_hv = hv(front)  # the old front's members alone (this bench's figure before 2026-12-02)
            hv_sum[0] += i_hv
            hv_sum[2] += front_hv
            hv_sum[1] += f_hv
            items_sum[0] += i_items
            items_sum[1] += f_items
            items_sum[2] += search_items
            entry = {"seed": seed, "irt": tag(s), "hv_irt_rescored": i_hv, "hv_full": f_hv, "hv_ratio": i_hv / f_hv,
                     "hv_front_only": front_hv, "hv_ratio_front_only": front_hv / f_hv,
                     "items_irt": i_items, "items_full": f_items, "items_ratio": i_items / f_items,
                     "items_ratio_search": search_items / f_items,
                     "evaluated_irt": n_done, "final_confirmation": final, "picks": picked, "full_best": full_best,
                     "front": len(front), "front_rescored": rescored, "rescore_items": spent,
                     "objectives": {n: {k: e.get(k) for k in ("measured_mae", "calibration_checks", "within_2sd",
                                                              "printed_error", "confirmed", "confirmed_mae")}
                                    for n, e in summ.items()}}
            pick_ratios += [v / full_best[n] for n, v in picked.items() if v is not None and full_best[n]]
            if args.rescore_all:
                names_all, truth = rescore_all(mine)
                found = hv(np.array([[truth[c][n] for n in names_all] for c in sorted(truth)]))
                entry["hv_produced"], entry["estimate_errors"] = found, estimate_errors(mine, truth)
                hv_sum[3] += found
            results["runs"].append(entry)
            errs = "; ".join(f"{n}: calibration {e['measured_mae']:.3f} on {e['calibration_checks']}, printed "
                             f"{e['printed_error']:.3f}, confirmed {e['confirmed']}"
                             + (f" off {e['confirmed_mae']:.3f}" if e["confirmed_mae"] is not None else "")
                             for n, e in entry["objectives"].items() if e["measured_mae"] is not None)
            print(f"{tag(s)} seed {seed}: hypervolume {i_hv:.4f} vs full {f_hv:.4f} ({i_hv / f_hv:.3f}x; the old front's members alone "
                  f"{front_hv / f_hv:.3f}x); items "
                  f"{search_items} vs {f_items} ({search_items / f_items:.3f}x; {n_done} evaluated), with the bench's "
                  f"re-scoring of {rescored} front candidates {i_items / f_items:.3f}x; the picks' confirmation "
                  f"{final['candidates']} candidate(s) in {final['rounds']} round(s)"
                  + (", picks left estimated" if final["picks_left_estimated"] else "") + "; --best picks "
                  + ", ".join(f"{n} {'?' if v is None else f'{v:.3f}'} (full search's best {full_best[n]:.3f})"
                              for n, v in picked.items()) + f"; {errs}", flush=True)
            if args.rescore_all:
                print(f"  everything it produced, measured: hypervolume {entry['hv_produced'] / f_hv:.3f}x the full "
                      "search's (the re-scored front above: what it recognised); estimates from anchors "
                      + "; ".join(f"{n}: {e['n']}, MAE {e['mae']:.3f}, bias {e['bias']:+.3f}, on the best tenth by "
                                  f"measured value MAE {e['top_mae']:.3f}, bias {e['top_bias']:+.3f}"
                                  for n, e in entry["estimate_errors"].items()), flush=True)
        print(f"{tag(s)} over seeds: hypervolume {hv_sum[0] / hv_sum[1]:.3f}x the full-fitness searches' (target "
              f">= 0.95; the old front's members alone {hv_sum[2] / hv_sum[1]:.3f}x), items {items_sum[2] / items_sum[1]:.3f}x (target <= 0.25), with the bench's re-scoring of the "
              f"front {items_sum[0] / items_sum[1]:.3f}x; the --best picks measured at "
              + (f"{np.mean(pick_ratios):.3f}x" if pick_ratios else "?")
              + " the full-fitness search's best value (mean over seeds and objectives)"
              + (f"; everything the IRT searches produced, measured: {hv_sum[3] / hv_sum[1]:.3f}x"
                 if args.rescore_all else "") + "\n", flush=True)
    (out / f"irt_search_quality-{args.space}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
