"""The error hierarchy: every class evomerge raises on purpose is a user, candidate or internal error, and the CLI
prints a user error as one line (exit 2) without a traceback, leaving the process as it found it."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import pytest
import tqdm
import yaml

from evomerge.checkpoints import CheckpointError, IncompatibleModelsError
from evomerge.compat import ThirdPartyAPIError
from evomerge.dashboard.server import DashboardError
from evomerge.fitness.result import FitnessResult
from evomerge.scoring import toy
from evomerge.errors import CandidateError, ConfigError, EvomergeError, InternalError, UserError
from evomerge.fitness.irt import IRTUnavailable
from evomerge.fitness.objectives import CandidateFailed, FitnessConfigError
from evomerge.merge.export import ExportError
from evomerge.merge.recipe import RecipeError
from evomerge.runtime.scheduler import WorkerStartError
from evomerge.search.drivers import DriverError
from evomerge.search.spec import JobSpecError, SearchStopped
from evomerge.service.cli import main
from evomerge.service.submit import ServiceError
from evomerge.spaces.ps import SpaceError
from evomerge.store import StoreError

GOLDEN = Path(__file__).resolve().parent / "golden" / "models"

# (class, its category, the builtin base it always had: code that catches that one still does)
CLASSES = [
    (CheckpointError, UserError, ValueError), (IncompatibleModelsError, UserError, ValueError),
    (RecipeError, UserError, ValueError), (ExportError, UserError, ValueError), (SpaceError, UserError, ValueError),
    (FitnessConfigError, UserError, ValueError), (JobSpecError, UserError, ValueError),
    (DriverError, UserError, ValueError), (DashboardError, UserError, ValueError), (ConfigError, UserError, ValueError),
    (StoreError, UserError, RuntimeError), (ServiceError, UserError, RuntimeError),
    (WorkerStartError, UserError, RuntimeError), (SearchStopped, UserError, RuntimeError),
    (ThirdPartyAPIError, UserError, RuntimeError),
    (CandidateFailed, CandidateError, RuntimeError), (IRTUnavailable, EvomergeError, ValueError),
]


@pytest.mark.parametrize("cls, category, builtin", CLASSES, ids=[c[0].__name__ for c in CLASSES])
def test_each_error_class_has_one_category(cls, category, builtin):
    assert issubclass(cls, category) and issubclass(cls, builtin)
    others = {UserError, CandidateError, InternalError} - {category}
    assert not any(issubclass(cls, o) for o in others)


def write_job(folder: Path, **runtime) -> Path:
    spec = {"name": "toy", "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a")}},
            "search_space": "sakana_ps", "driver": {"algorithm": "random", "population": 2, "budget": {"evaluations": 2}},
            "runtime": {"scorer": "evomerge.scoring.toy:scorer", **runtime}, "store": "out/store.sqlite"}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_bad_scorer_factory_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["run", str(write_job(tmp_path, scorer="nosuch:factory"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: runtime.scorer: cannot import 'nosuch:factory'") and "module:function" in err


def bar_disabled() -> bool:
    """Whether tqdm bars are off by default (what `quiet_third_party` changes)."""
    return inspect.signature(tqdm.tqdm.__init__).parameters["disable"].default is True


def test_a_command_restores_the_sigterm_handler_and_progress_bars(tmp_path, capsys):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    init = vars(tqdm.tqdm)["__init__"]
    bad = tmp_path / "bad"
    bad.mkdir()
    try:
        assert not bar_disabled()
        assert main(["run", str(write_job(tmp_path))]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert vars(tqdm.tqdm)["__init__"] is init and not bar_disabled()
        assert main(["run", str(write_job(bad, scorer="nosuch:factory"))]) == 2  # a failed command as well
        assert signal.getsignal(signal.SIGTERM) is mine and vars(tqdm.tqdm)["__init__"] is init
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()


class BrokenScorer(toy.ToyScorer):
    """The toy, with a failure for every candidate whose first weight is 1 (the seeds): `error: bug` raises what a
    bug raises (AttributeError), `error: value` what a candidate's numbers can raise (ValueError), `error: nan`
    returns a NaN value (a broken model's accuracy)."""

    def evaluate(self, recipe):
        if (toy.numbers(recipe) or [0.0])[0] > 0.99:
            if self.options["error"] == "bug":
                return self.options.no_such_attribute
            if self.options["error"] == "garbage":  # not numbers: a bug in the scorer, however it came about
                return FitnessResult({"fit": "high", "size": 0.1}, {})
            if self.options["error"] == "nan":
                result = super().evaluate(recipe)
                return FitnessResult({**result.values, "fit": float("nan")}, result.items)
            raise ValueError("weights out of range for this scorer")
        return super().evaluate(recipe)


def broken(spec, split=None) -> BrokenScorer:
    return BrokenScorer(dict(spec.runtime.scorer_options), split)


def test_a_bug_stops_the_job_with_its_frames_and_a_candidate_error_does_not(tmp_path, capsys):
    from evomerge.store import Store

    for error, rc in (("bug", 1), ("value", 0), ("nan", 0), ("garbage", 1)):
        folder = tmp_path / error
        folder.mkdir()
        path = write_job(folder, scorer=f"{__name__}:broken", scorer_options={"error": error})
        spec = yaml.safe_load(path.read_text())
        spec["driver"].update(population=4, budget={"evaluations": 8}, max_failures_in_a_row=50)
        path.write_text(yaml.safe_dump(spec))
        assert main(["run", str(path)]) == rc
        err = capsys.readouterr().err
        store = Store(folder / "out" / "store.sqlite", readonly=True)
        rows = store.candidates("toy")
        failed = [r for r in rows if r.status == "failed"]
        if error == "garbage":
            assert "the scorer returned a result evomerge cannot read (ValueError" in err
            assert store.job("toy")["status"] == "stopped" and len(failed) == 1
        elif error == "bug":
            first = next(r.id for r in rows if r.status not in ("done", "cached"))  # the first seed of weight 1
            said = f"internal error: job 'toy' stopped by an internal error while scoring candidate {first}"
            assert any(line.startswith(said) for line in err.splitlines()), err  # after the progress lines
            assert "AttributeError" in err and "test_errors.py" in err  # the failing frame, not only the message
            assert store.job("toy")["status"] == "stopped" and "internal error" in store.job("toy")["reason"]
            assert [r.id for r in failed] == [first] and failed[0].reason.startswith("internal error AttributeError")
            assert all(r.status in ("pending", "running") for r in rows if r.id > first)  # the job stopped there
        else:
            assert store.job("toy")["status"] == "done" and len(rows) == 8
            expected = "ValueError: weights out of range" if error == "value" else "objective fit is nan (not a finite"
            assert failed and all(r.reason.startswith(expected) for r in failed), [r.reason for r in failed]
            assert len(failed) < len(rows)  # the others were scored
            assert not set(store.front("toy")) & {r.id for r in failed}  # a NaN is never on the front
        store.close()


def test_the_old_scorer_keys_still_work_with_a_warning(tmp_path):
    from evomerge.config import EvomergeDeprecationWarning
    from evomerge.search.spec import JobSpecError, load_job, parse_job

    path = write_job(tmp_path, scorer_options={"delay": 0.0})
    data = yaml.safe_load(path.read_text())
    data["runtime"] = {"evaluator": data["runtime"]["scorer"], "evaluator_options": {"delay": 0.0}}
    path.write_text(yaml.safe_dump(data))
    with pytest.warns(EvomergeDeprecationWarning, match=r"runtime\.evaluator(_options)?: renamed to 'scorer"):
        spec = load_job(path)
    assert (spec.runtime.scorer, spec.runtime.scorer_options) == ("evomerge.scoring.toy:scorer", {"delay": 0.0})
    data["runtime"]["scorer"] = "evomerge.scoring.toy:scorer"
    with pytest.raises(JobSpecError, match="both are given"):
        parse_job(data, source="job.yaml", base_dir=tmp_path)


def test_a_run_refused_before_its_job_is_recorded_leaves_no_store_and_resume_never_makes_one(tmp_path, capsys):
    path = write_job(tmp_path, scorer="helpers:failing_scorer")
    assert main(["run", str(path)]) == 2
    assert "metric 'exact_mach'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "store.sqlite").exists() and not list((tmp_path / "out").glob("store.sqlite*"))
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    assert main(["resume", str(empty)]) == 2
    assert "an empty file, not an evomerge store" in capsys.readouterr().err and empty.stat().st_size == 0


def test_resume_says_when_the_job_file_was_edited_since_the_job_started(tmp_path, capsys):
    path = write_job(tmp_path)
    assert main(["run", str(path)]) == 0
    spec = yaml.safe_load(path.read_text())
    spec["driver"]["population"] = 8
    spec["runtime"]["scorer_options"] = {"delay": 0.5}
    spec["driver"]["budget"] = {"evaluations": 4}
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["resume", str(path)]) == 0
    said = capsys.readouterr()
    note = next(line for line in (said.out + said.err).splitlines() if "differs from the job as stored" in line)
    assert "driver.population" in note and "runtime.scorer_options.delay" in note and "another name" in note


@pytest.mark.parametrize("argv, words", [
    (["dashboard", "--store", "x.sqlite", "--port", "99999"], "must be 0-65535"),
    (["dashboard", "--store", "x.sqlite", "--port", "80a"], "must be a whole number 0-65535"),
])
def test_cli_values_are_checked_by_the_parser(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_backend_vllm_without_vllm_is_refused_for_every_local_kind(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    for kind in ("local", "auto"):
        folder = tmp_path / kind
        folder.mkdir()
        assert main(["run", str(write_job(folder, kind=kind, backend="vllm"))]) == 2
        assert "runtime.backend: vllm is not installed" in capsys.readouterr().err


def test_inline_sections_name_the_file_and_field_once(tmp_path, capsys):
    path = write_job(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["search_space"] = {"kind": "ps", "density_bounds": [0.1, 1.5]}
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count(str(path)) == 1 and err.count("search_space") == 1 and "density_bounds" in err, err
    spec["search_space"] = "sakana_ps"
    spec["objectives"] = {"objectives": [{"builtin": "params", "directon": "minimise"}]}
    spec["runtime"] = {}
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count(str(path)) == 1 and err.count("objectives:") == 1 and "Did you mean 'direction'" in err, err
