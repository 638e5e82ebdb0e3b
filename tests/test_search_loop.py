"""The search loop with the synthetic scorer: specs fail fast, candidates are cached, failures are isolated,
Ctrl-C leaves a resumable job, and the report scores the front on the test split."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from evomerge.scoring import toy
from evomerge.search.jobs import resume_job, run_job, scorer_factory
from evomerge.search.loop import Progress, Search
from evomerge.runtime.local import LocalRuntime
from evomerge.search.spec import JobSpecError, SearchStopped, load_job
from evomerge.search.state import LoopState
from evomerge.service.cli import main
from evomerge.store import Store, StoreError
from conftest import REPO
from helpers import GOLDEN, quiet, write_job

def test_a_job_runs_and_reports_the_front_on_the_test_split(tmp_path):
    path = write_job(tmp_path)
    result = run_job(path, **quiet())
    store = Store(result.store)
    assert store.objectives("toy") == [("fit", "maximise"), ("size", "minimise")]  # directions as resolved
    again = tmp_path / "again" / "job.yaml"  # the stored YAML form is a job file: read elsewhere, the same job
    again.parent.mkdir()
    again.write_text(store.job("toy")["spec_yaml"])
    assert load_job(again).to_dict() == load_job(path).to_dict() == store.job("toy")["spec"]
    rows = store.candidates("toy")
    assert len(rows) == 24 and {r.generation for r in rows} == {0, 1, 2, 3}
    assert {r.origin for r in rows if r.generation == 0} >= {"parent:base", "parent:a", "parent:b", "average"}
    assert any(r.parents for r in rows if r.generation > 0)  # lineage: the population they were bred from
    assert store.job("toy")["status"] == "done"
    assert store.last_checkpoint("toy")[0] == 4
    report = json.loads(result.json_path.read_text())
    assert report["split"] == "test" and report["front"]
    for c in report["front"]:  # test-split values: the toy's test split is 0.01 below its fitness split
        assert c["test"]["fit"] == pytest.approx(c["fitness"]["fit"] - 0.01)
    assert {p["name"] for p in report["parents"]} == {"base", "a", "b"} and all(p["test"] for p in report["parents"])
    assert "Plotly.newPlot" in result.html_path.read_text()  # the front plotted (tests/test_report.py: the rest)
    assert (result.json_path.parent / "front" / f"candidate-{report['front'][0]['id']}.yaml").is_file()


def test_identical_recipes_are_evaluated_once(tmp_path):
    space = {"kind": "ps", "method": "ties", "weight_bounds": [0.5, 0.5], "density_bounds": [1.0, 1.0]}  # one recipe only
    result = run_job(write_job(tmp_path, search_space=space, driver={"algorithm": "random"}), **quiet())
    counts = Store(result.store).counts("toy")
    assert counts == {"done": 1, "cached": 23}


def test_the_pymoo_drivers_never_ask_a_recipe_asked_before(tmp_path):
    """On layer paths over the golden models most genomes mean a path asked before. With `duplicates: cache` the
    archive answers them and they spend the budget; with `skip` (the default) the driver breeds again, and the
    same budget evaluates that many distinct recipes, in generations of the full population."""
    space = {"kind": "dfs", "repeats": 1, "min_layers": 1, "max_layers": 4, "scales": "none"}
    counts = {}
    for mode in ("cache", "skip"):
        (tmp_path / mode).mkdir()
        result = run_job(write_job(tmp_path / mode, search_space=space, driver={"duplicates": mode}), **quiet())
        store = Store(result.store)
        rows = store.candidates("toy")
        counts[mode] = store.counts("toy")
        assert len(rows) == 24
        if mode == "skip":
            assert len({r.recipe_hash for r in rows}) == 24
            assert [r.generation for r in rows] == [i // 6 for i in range(24)]
            assert store.job("toy")["spec"]["driver"]["duplicates"] == "skip"
    assert counts["cache"].get("cached", 0) >= 6  # the space does repeat (else this test shows nothing)
    assert counts["skip"] == {"done": 24}


def test_a_space_of_one_recipe_ends_the_search_with_one_line(tmp_path):
    """Every genome means the same merge: the first population is that one candidate, the driver breeds nothing
    new, and the search ends (done, report written) before its budget, saying why."""
    space = {"kind": "ps", "method": "ties", "weight_bounds": [0.5, 0.5], "density_bounds": [1.0, 1.0]}
    lines = io.StringIO()
    result = run_job(write_job(tmp_path, search_space=space), **quiet(lines))
    store = Store(result.store)
    assert store.counts("toy") == {"done": 1} and store.job("toy")["status"] == "done"
    assert "bred nothing new" in lines.getvalue() and "before its budget" in lines.getvalue()
    assert result.json_path.is_file()


def test_failed_candidates_are_recorded_and_the_search_goes_on(tmp_path):
    path = write_job(tmp_path, runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"fail_above": 0.5}})
    result = run_job(path, **quiet())
    store = Store(result.store)
    failed = store.candidates("toy", status="failed")
    assert failed and all("fail_above" in r.reason for r in failed)
    done = store.candidates("toy", status="done")
    assert done and store.job("toy")["status"] == "done"
    for r in failed:  # told a loss worse, per objective, than every real one told up to its generation
        seen = np.array([d.losses for d in done if d.generation <= r.generation])
        assert np.all(np.array(r.losses) >= seen.max(axis=0) + 1.0), (r.losses, seen.max(axis=0))


def test_a_failure_is_told_a_loss_worse_than_any_real_one_whatever_the_units():
    from evomerge.search.problem import FAIL_LOSS, Problem

    problem = Problem.__new__(Problem)  # only the loss rule: no space or objectives needed
    problem.objectives = type("Objs", (), {"objectives": (None, None)})()
    assert problem.failure_losses([[-0.9, 7.05e9], [-0.2, 3e9]]) == pytest.approx([0.8, 1.41e10])  # params of 7e9: worse still
    assert problem.failure_losses([[-5.0, 2.0]]) == [0.0, 4.0]
    assert problem.failure_losses([]) == [FAIL_LOSS, FAIL_LOSS] and FAIL_LOSS > 1e200  # nothing real yet: worse than any


def test_too_many_failures_in_a_row_stop_the_job_with_a_diagnosis(tmp_path):
    path = write_job(tmp_path, runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"fail_all": True}},
                     driver={"max_failures_in_a_row": 4})
    with pytest.raises(SearchStopped, match="4 candidates failed in a row.*fail_all.*evomerge resume"):
        run_job(path, **quiet())
    store = Store(tmp_path / "out" / "store.sqlite")
    assert store.job("toy")["status"] == "stopped" and store.counts("toy")["failed"] == 4


class InterruptingScorer(toy.ToyScorer):
    calls = 0

    def evaluate(self, recipe):
        InterruptingScorer.calls += 1
        if InterruptingScorer.calls == 9:
            raise KeyboardInterrupt
        return super().evaluate(recipe)


def interrupting(spec, split=None):
    return InterruptingScorer(dict(spec.runtime.scorer_options), split)


def test_ctrl_c_leaves_a_resumable_job_that_ends_like_an_uninterrupted_one(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run_job(write_job(tmp_path / "a"), **quiet())
    path = write_job(tmp_path / "b", runtime={"scorer": f"{__name__}:interrupting"})
    with pytest.raises(KeyboardInterrupt):
        run_job(path, **quiet())
    store = Store(tmp_path / "b" / "out" / "store.sqlite")
    assert store.job("toy")["status"] == "interrupted"
    assert store.last_checkpoint("toy")[0] == 1  # generation 0 done, generation 1 under way
    resume_job(path, **quiet())
    a = [r.identity() for r in Store(straight.store).candidates("toy")]
    b = [r.identity() for r in store.candidates("toy")]
    assert a == b


@pytest.mark.parametrize("algorithm, space", [("cmaes", "layerwise_ps"), ("nsga3", "dfs"), ("smsemoa", "ps_then_dfs")])
def test_each_driver_and_space_runs_a_job(tmp_path, algorithm, space):
    options = {"objectives": 1} if algorithm == "cmaes" else {}
    path = write_job(tmp_path, search_space=space, driver={"algorithm": algorithm, "budget": {"evaluations": 12}},
                     runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": options})
    result = run_job(path, **quiet())
    assert Store(result.store).counts("toy").get("done", 0) >= 1 and result.report["front"]


def test_a_time_budget_ends_the_search(tmp_path):
    path = write_job(tmp_path, driver={"budget": {"seconds": 0.3}},
                     runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"delay": 0.05}})
    result = run_job(path, **quiet())
    assert 1 <= Store(result.store).last_checkpoint("toy")[0] <= 3


# ---------------------------------------------------------------- bad specs fail fast


@pytest.mark.parametrize("overrides, field, hint", [
    ({"name": None}, "name", "Give the job a name"),
    ({"models": {"base": "nowhere", "sources": {"a": str(GOLDEN / "a")}}}, "models.base", "config.json"),
    ({"search_space": "nope"}, "search_space", "presets: dfs"),
    ({"search_space": {"kind": "ps", "method": "slerp"}}, "search_space", "cannot be searched here without t"),
    ({"driver": {"algorithm": "nsga22"}}, "driver.algorithm", "Did you mean 'nsga2'"),
    ({"driver": {"budget": {}}}, "driver.budget", "never ends"),
    ({"driver": {"populaton": 4}}, "driver.populaton", "Did you mean 'population'"),
    ({"driver": {"mode": "async"}}, "driver.mode", "generational or steady"),
    ({"driver": {"duplicates": "drop"}}, "driver.duplicates", "skip (never ask a recipe asked before) or cache"),
    ({"driver": {"algorithm": "cmaes", "options": {"sigma": 0.3}}}, "driver.options", "Did you mean 'sigma0'"),
    ({"runtime": {"device": "cdua"}}, "runtime.device", "Did you mean 'cuda'"),
    ({"runtime": {"kind": "local", "backend": "vllm"}}, "runtime.backend", "vllm is not installed"),
    ({"driver": {"options": {"eliminate_duplicate": False}}}, "driver.options", "Did you mean 'eliminate_duplicates'"),
    ({"driver": {"algorithm": "random", "options": {"seed": 3}}}, "driver.options", "it takes none"),
    ({"driver": {"mode": "steady", "lag": -1}}, "driver.lag", "whole number >= 0"),
    ({"runtime": {"scorer": None}}, "objectives", "objectives file"),
    ({"objectives": {"objectives": [{"task": "zoo_mix"}, {"builtin": "params"}]}, "driver": {"algorithm": "cmaes"}},
     "driver.algorithm", "one objective"),
    ({"objectives": {"objectives": [{"tsk": "zoo_mix"}]}}, "objectives", "task"),
    ({"objectives": {"split": "test", "objectives": [{"task": "zoo_mix"}]}}, "report_split", "held-out"),
])
def test_invalid_specs_name_file_field_and_hint(tmp_path, overrides, field, hint):
    path = write_job(tmp_path, **overrides)
    with pytest.raises(JobSpecError) as e:
        load_job(path)
    assert str(e.value).startswith(f"{path}: {field}") and hint in str(e.value)


def test_an_accepted_driver_option_reaches_the_algorithm(tmp_path):
    path = write_job(tmp_path, driver={"options": {"n_offsprings": 3}, "budget": {"evaluations": 12}})
    store = Store(run_job(path, **quiet()).store)
    sizes = [len(store.candidates("toy", generation=g)) for g in range(3)]
    assert sizes == [6, 3, 3]  # the first population, then pymoo's 3 offspring per generation


def test_a_job_that_cannot_start_records_nothing(tmp_path, capsys):
    path = write_job(tmp_path, runtime={"scorer": "no_such_module:scorer"})
    with pytest.raises(ValueError, match="cannot import"):
        run_job(path, **quiet())
    assert Store(tmp_path / "out" / "store.sqlite").jobs() == []
    assert main(["run", str(write_job(tmp_path, driver={"algorithm": "nope"}))]) == 2
    assert "error: " in capsys.readouterr().err


def test_run_twice_and_resume_a_missing_job_say_what_to_do(tmp_path, capsys):
    path = write_job(tmp_path)
    run_job(path, **quiet())
    with pytest.raises(StoreError, match="exists already.*evomerge resume"):
        run_job(path, **quiet())
    with pytest.raises(StoreError, match="no job named 'other'"):
        resume_job(tmp_path / "out" / "store.sqlite", "other", **quiet())
    assert main(["resume", str(tmp_path / "nowhere.sqlite")]) == 2
    assert "no store there" in capsys.readouterr().err


# ---------------------------------------------------------------- steady mode (no generation barrier)


def archive(store_path: Path, job: str = "toy") -> list[tuple]:
    store = Store(store_path, readonly=True)
    try:
        return [r.identity() for r in store.candidates(job)]
    finally:
        store.close()


@pytest.mark.parametrize("algorithm, space, lag", [("nsga2", "sakana_ps", 1), ("nsga2", "sakana_ps", 2),
                                                   ("random", "sakana_ps", 1), ("cmaes", "layerwise_ps", 1)])
def test_steady_mode_reaches_the_budget_evaluating_every_candidate_once(tmp_path, algorithm, space, lag):
    options = {"objectives": 1} if algorithm == "cmaes" else {}
    path = write_job(tmp_path, search_space=space, driver={"algorithm": algorithm, "mode": "steady", "lag": lag},
                     runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": options})
    result = run_job(path, **quiet())
    store = Store(result.store)
    rows = store.candidates("toy")
    assert [r.id for r in rows] == list(range(24)) and [r.generation for r in rows] == [i // 6 for i in range(24)]
    assert {r.status for r in rows} <= {"done", "failed", "cached"}
    evaluated = [r.recipe_hash for r in rows if r.status != "cached"]
    assert len(evaluated) == len(set(evaluated))  # a repeated recipe is answered from the cache, never re-run
    assert store.last_checkpoint("toy")[0] == 4 and store.job("toy")["status"] == "done"
    state = LoopState.from_json(store.last_checkpoint("toy")[1])
    assert state.evaluations == 24 and state.ahead == 0
    assert result.report["runtime"]["mode"] == "steady" and result.report["runtime"]["candidates"] == len(evaluated)


def test_steady_random_search_asks_what_the_generational_one_asks(tmp_path):
    """Random search never reads a tell, so asking ahead changes nothing it proposes: same archive."""
    (tmp_path / "g").mkdir()
    (tmp_path / "s").mkdir()
    gen = run_job(write_job(tmp_path / "g", driver={"algorithm": "random"}), **quiet())
    steady = run_job(write_job(tmp_path / "s", driver={"algorithm": "random", "mode": "steady", "lag": 2}), **quiet())
    assert archive(gen.store) == archive(steady.store)


class InterruptAt(toy.ToyScorer):
    """Raises KeyboardInterrupt at its `interrupt_at`-th evaluation (counted per process)."""

    calls = 0

    def evaluate(self, recipe):
        InterruptAt.calls += 1
        if InterruptAt.calls == int(self.options.get("interrupt_at", 0)):
            raise KeyboardInterrupt
        return super().evaluate(recipe)


def interrupt_at(spec, split=None):
    return InterruptAt(dict(spec.runtime.scorer_options), split)


@pytest.mark.parametrize("lag", [1, 2])
def test_a_steady_search_interrupted_then_resumed_ends_like_an_uninterrupted_one(tmp_path, lag):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    driver = {"mode": "steady", "lag": lag, "budget": {"evaluations": 36}}
    options = {"fail_above": 0.8}
    straight = run_job(write_job(tmp_path / "a", driver=driver,
                                 runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": options}),
                       **quiet())
    InterruptAt.calls = 0
    path = write_job(tmp_path / "b", driver=driver,
                     runtime={"scorer": f"{__name__}:interrupt_at", "scorer_options": {**options, "interrupt_at": 16}})
    with pytest.raises(KeyboardInterrupt):
        run_job(path, **quiet())
    store = Store(tmp_path / "b" / "out" / "store.sqlite")
    assert store.job("toy")["status"] == "interrupted"
    told, blob = store.last_checkpoint("toy")
    assert told >= 1 and LoopState.from_json(blob).ahead  # interrupted with batches asked ahead of the last tell
    resume_job(path, **quiet())
    assert archive(straight.store) == archive(tmp_path / "b" / "out" / "store.sqlite")
    assert store.front("toy") == Store(straight.store).front("toy")


class ReversedRuntime(LocalRuntime):
    """Hands out the newest queued candidate first: completion order opposite to submission (id) order."""

    def next_outcome(self, timeout=None):
        if self._queue:
            self._queue.insert(0, self._queue.pop())
        return super().next_outcome(timeout)


@pytest.mark.parametrize("mode", ["generational", "steady"])
def test_the_failure_counter_does_not_depend_on_completion_order(tmp_path, mode):
    """Every checkpoint (failures_in_a_row, the recent reasons) and the archive are the same whether candidates
    finish in id order or in reverse."""
    states, archives = [], []
    for name, kind in (("inorder", LocalRuntime), ("reversed", ReversedRuntime)):
        path = write_job(tmp_path, name=name, driver={"mode": mode, "max_failures_in_a_row": 50},
                         runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"fail_above": 0.3}})
        spec = load_job(path)
        store = Store(spec.store)
        store.create_job(spec.name, spec.to_dict(), spec.driver.seed)
        runtime = kind(scorer_factory(spec), spec.runtime.threads)
        Search(spec, store, runtime, Progress(io.StringIO(), live=False)).run()
        saved = [LoopState.from_json(state) for _, state in store.checkpoints(name)]  # every one is kept
        states.append([(s.generation, s.failures.failures_in_a_row, s.failures.recent) for s in saved])
        archives.append([r.identity() for r in store.candidates(name)])
        store.close()
    assert states[0] == states[1] and len(states[0]) == 4
    assert any(n > 0 for _, n, _ in states[0])  # the counter was exercised: some batch ends on a failure
    assert archives[0] == archives[1]


def test_a_moved_store_resumes_with_its_report_beside_it_not_at_the_old_place(tmp_path):
    import shutil

    (tmp_path / "first").mkdir()
    result = run_job(write_job(tmp_path / "first"), **quiet())
    old_report = result.json_path
    before = old_report.read_text()
    moved = tmp_path / "elsewhere" / "copy.sqlite"
    moved.parent.mkdir()
    shutil.copy(result.store, moved)
    lines = io.StringIO()
    again = resume_job(moved, out=io.StringIO(), progress=Progress(lines, live=False))
    assert again.json_path == moved.parent / "report.json" and again.json_path.is_file()
    assert old_report.read_text() == before  # the old place was not written to
    assert "its reports now go beside it" in lines.getvalue()


def test_a_spec_stored_by_an_older_evomerge_reads_back_as_the_same_job(tmp_path):
    """Stores of schema 1-2 kept the JobSpec's fields (`asdict`), objectives unparsed beside their folder and the
    scorer under its old name: `JobSpec.from_dict` reads that form as the job it was."""
    from evomerge.search.spec import JobSpec

    objectives = {"include": ["fitness"], "objectives": [{"task": "zoo_mix", "limit": 10}, {"builtin": "params"}]}
    path = write_job(tmp_path, objectives={**objectives, "include": [str(REPO / "fitness")]})
    spec = load_job(path)
    old = {"name": spec.name, "base": spec.base, "models": {k: str(v) for k, v in spec.models.items()},
           "search_space": spec.search_space, "objectives": objectives, "objectives_dir": str(REPO),
           "driver": {"algorithm": "nsga2", "population": 6, "max_evaluations": 24, "max_seconds": None, "seed": 1,
                      "options": {}, "max_failures_in_a_row": 10, "mode": "generational", "lag": 1},
           "runtime": {"kind": "auto", "workers": 1, "threads": 1, "gpus": 0.0, "max_retries": 2, "device": "cpu",
                       "backend": "hf", "batch_size": 64, "evaluator": "evomerge.scoring.toy:scorer",
                       "evaluator_options": {}},
           "store": str(spec.store), "report": str(spec.report), "report_split": "test", "source": str(path)}
    want = spec.to_dict()
    assert want["driver"]["duplicates"] == "skip"  # a new job's default; an old one asked its repeats, and still does
    want["driver"]["duplicates"] = "cache"
    assert JobSpec.from_dict(old).to_dict() == want
