"""Helpers the test modules share (tests import from here or conftest, never from each other): toy job specs over
the golden models, quiet progress, the quiz scorer (an lm-eval stand-in with known item parameters for IRT), and
what the Ray service tests share (free ports, toy specs that travel, the CLI in-process)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

from evomerge.fitness.objectives import Objective, ObjectiveSet
from evomerge.fitness.result import FitnessResult
from evomerge.scoring import toy
from evomerge.search.loop import Progress

GOLDEN = Path(__file__).resolve().parent / "golden" / "models"


def write_job(tmp_path: Path, name: str = "toy", **overrides) -> Path:
    """A toy job over the golden models (the toy scorer, 24 candidates); `overrides` merge into its sections."""
    spec = {
        "name": name,
        "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
        "search_space": "sakana_ps",
        "driver": {"algorithm": "nsga2", "population": 6, "budget": {"evaluations": 24}, "seed": 1},
        "runtime": {"scorer": "evomerge.scoring.toy:scorer"},
        "store": "out/store.sqlite",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        elif value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def quiet(stream: io.StringIO | None = None) -> dict:
    """`run_job`'s output and progress into memory (`stream`: where the progress lines go)."""
    return {"out": io.StringIO(), "progress": Progress(stream or io.StringIO(), live=False)}


class StopAfter(Progress):
    """Ctrl-C in the middle of a search, whatever the runtime: KeyboardInterrupt at the n-th recorded outcome."""

    def __init__(self, n: int):
        super().__init__(io.StringIO(), live=False)
        self.n = n

    def candidate(self, text: str) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


@contextlib.contextmanager
def offline_lm_eval(**extra: str) -> Iterator[None]:
    """lm-eval's datasets offline and its bars off (plus `extra` variables) for a test module, then the environment
    as it was; torch on one thread."""
    import os

    import torch

    names = ("HF_DATASETS_OFFLINE", "TQDM_DISABLE", *extra)
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", **extra})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------ the quiz scorer

ITEMS = 200


class QuizScorer:
    """A stand-in for an lm-eval task: 200 right/wrong items from a two-dimensional 2PL model; a candidate's ability
    comes from its recipe's numbers, its answers from a generator seeded by them (same recipe, same answers)."""

    calls = 0
    interrupt_at: int | None = None
    fail_at: int | None = None  # the call that fails as a candidate does (CandidateFailed)
    asked: list[tuple[str, bool]] | None = None  # a list: every evaluate call, (the recipe as stored, scored in full)

    def __init__(self, options: dict, split: str | None = None):
        rng = np.random.default_rng(5)
        self.a = rng.lognormal(0.6, 0.3, (ITEMS, 2)) * np.where(np.arange(2)[None, :] == np.arange(ITEMS)[:, None] % 2, 1, 0.1)
        self.b = rng.normal(0, 1, ITEMS)
        self.ids = [f"q{i:03d}" for i in range(ITEMS)]
        self.options = options
        quiz = Objective("quiz", kind="task", task="quiz", direction="maximise", **options.get("irt", {}))
        objs = [quiz, Objective("size", kind="task", task="toy", direction="minimise")]
        if "second" in options:  # a second IRT objective, `quiz2`: the same kind of items, the skills swapped
            objs.insert(1, Objective("quiz2", kind="task", task="quiz2", direction="maximise", **options["second"]))
        self.objectives = ObjectiveSet(tuple(objs), split=split or "fitness", source="<quiz>")

    def answers(self, recipe, second: bool = False) -> np.ndarray:
        xs = np.round(toy.numbers(recipe), 6)
        # a parent's recipe (the report scores the parents) has one number: the others at the middle of their range.
        # (This used to raise IndexError, recorded as the parents' test score; a bug now stops the job instead.)
        theta_in = np.pad(xs, (0, max(0, 4 - len(xs))), constant_values=0.5)
        theta = np.array([3 * (theta_in[0] - 0.5) + (theta_in[2] - 0.5), 3 * (theta_in[1] - 0.5) - (theta_in[3] - 0.5)])
        z = self.a @ (theta[::-1] if second else theta) - self.b
        if self.options.get("drift"):  # a third skill that only the search's later candidates have: a third of the
            # items also need it, and it grows only past 0.75 of the first weight (where the driver heads)
            skill = 8.0 * max(0.0, theta_in[0] - 0.75)
            z = z + np.where(np.arange(ITEMS) % 3 == 2, 3.0 * skill - 1.5, 0.0)
        p = 1 / (1 + np.exp(-z))
        y = (np.random.default_rng([zlib.crc32(xs.tobytes())] + [1] * second).random(ITEMS) < p).astype(float)
        return np.ones(ITEMS) if self.options.get("constant") else y

    def evaluate(self, recipe, items=None):
        from evomerge.search.problem import recipe_text

        QuizScorer.calls += 1
        if QuizScorer.asked is not None:
            QuizScorer.asked.append((recipe_text(recipe), not (items and "quiz" in items)))
        if QuizScorer.interrupt_at is not None and QuizScorer.calls == QuizScorer.interrupt_at:
            raise KeyboardInterrupt
        if QuizScorer.fail_at is not None and QuizScorer.calls == QuizScorer.fail_at:
            from evomerge.fitness.objectives import CandidateFailed

            raise CandidateFailed("quiz: the worker ran out of memory on the full item set")
        y = self.answers(recipe)
        keep = [self.ids.index(i) for i in items["quiz"]] if items and "quiz" in items else list(range(ITEMS))
        xs = toy.numbers(recipe)
        values = {"quiz": float(y[keep].mean()), "size": sum(xs) / len(xs)}
        per_item = {"quiz": {self.ids[i]: float(y[i]) for i in keep}}
        if "second" in self.options:
            y2 = self.answers(recipe, second=True)
            keep2 = [self.ids.index(i) for i in items["quiz2"]] if items and "quiz2" in items else list(range(ITEMS))
            values["quiz2"], per_item["quiz2"] = float(y2[keep2].mean()), {self.ids[i]: float(y2[i]) for i in keep2}
        return FitnessResult(values, per_item)


def quiz_scorer(spec, split=None):
    return QuizScorer(dict(spec.runtime.scorer_options), split)


def failing_scorer(spec, split=None):
    """A scorer plug-in that cannot be built: what a metric typo in a real task does, after the store is opened."""
    from evomerge.fitness.objectives import FitnessConfigError

    raise FitnessConfigError("objectives: zoo_mix: metric 'exact_mach' is not one the task computes")


def quiz_job(folder: Path, irt: dict | None = None, **options) -> Path:
    """A quiz-scored IRT search (the quiz objective's IRT settings updated by `irt`; `options` go to the scorer)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"estimator": "irt", "anchors": 20, "seed_candidates": 12, "calibrate_every": 2, "calibrate_count": 2,
                **(irt or {})}
    spec = {"name": "quiz", "search_space": "sakana_ps",
            "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
            "driver": {"algorithm": "nsga2", "population": 6, "budget": {"evaluations": 48}, "seed": 2},
            "runtime": {"scorer": "helpers:quiz_scorer", "scorer_options": {"irt": settings, **options}},
            "store": "store.sqlite"}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------- Ray heads and submitted jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_spec(folder: Path, name: str, **options) -> Path:
    """A toy-scored search with relative model and store paths (they must travel as absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    spec = {
        "name": name,
        "models": {"base": rel(GOLDEN / "base"), "sources": {"a": rel(GOLDEN / "a"), "b": rel(GOLDEN / "b")}},
        "search_space": "sakana_ps",
        "driver": {"algorithm": "nsga2", "population": 6, "budget": {"evaluations": options.pop("evaluations", 24)},
                   "seed": 1},
        "runtime": {"kind": "local", "scorer": "evomerge.scoring.toy:scorer", "scorer_options": options},
        "store": "out/store.sqlite",
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`evomerge ARGV...` in this process: its exit code, stdout and stderr."""
    from evomerge.service.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err
