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
            "runtime": {"evaluator": "evomerge.scoring.toy:scorer", **runtime}, "store": "out/store.sqlite"}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_bad_scorer_factory_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["run", str(write_job(tmp_path, evaluator="nosuch:factory"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: runtime.evaluator: cannot import 'nosuch:factory'") and "module:function" in err


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
        assert main(["run", str(write_job(bad, evaluator="nosuch:factory"))]) == 2  # a failed command as well
        assert signal.getsignal(signal.SIGTERM) is mine and vars(tqdm.tqdm)["__init__"] is init
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()
