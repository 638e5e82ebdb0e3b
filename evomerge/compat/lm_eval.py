"""lm-eval's private task API (0.4.10+), and wrapping a method of one lm-eval object.

`evomerge.fitness.tasks` needs a task's full config (its `include:` chain merged, `!function` tags resolved)
without building the task, and a task index entry for a YAML given by path. lm-eval 0.4.x has no public call
for either: `TaskIndex.entry_from_path` and `TaskManager._factory._load_full_config` are what its own
`TaskManager` uses. Both are looked up here, with a clear error when an installed release lacks them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

from evomerge.compat import missing

NEEDS = ">=0.4.10,<0.5 (TaskIndex.entry_from_path, TaskManager._factory._load_full_config)"


def entry_from_path(path: Path) -> Any:
    """The task index entry of a task YAML, or None when the file is not an lm-eval task."""
    try:
        from lm_eval.tasks._index import TaskIndex
    except ImportError:
        raise missing("lm_eval", "lm_eval.tasks._index.TaskIndex", NEEDS) from None
    if not hasattr(TaskIndex, "entry_from_path"):
        raise missing("lm_eval", "TaskIndex.entry_from_path", NEEDS)
    return TaskIndex.entry_from_path(Path(path))


def load_full_config(manager: Any, entry: Any) -> dict:
    """A task's config dict with `include:` chains merged and `!function` tags resolved, as lm-eval builds it."""
    load = getattr(getattr(manager, "_factory", None), "_load_full_config", None)
    if load is None:
        raise missing("lm_eval", "TaskManager._factory._load_full_config", NEEDS)
    return load(entry, None)


def wrap_method(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Replace `obj.name` (on this instance only) by `make(original)`; returns the function that puts it back.

    Used for lm-eval objects evomerge owns (its HFLM and VLLM instances, its tasks) to time the forward pass and
    memoise per-document work. A missing method is an lm-eval that changed its model interface: say so."""
    original = getattr(obj, name, None)
    if not callable(original):
        raise missing("lm_eval", f"{type(obj).__name__}.{name}", ">=0.4.5,<0.5")
    had_own = name in vars(obj)
    setattr(obj, name, make(original))

    def restore() -> None:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)

    return restore


def time_methods(obj: Any, names: Iterable[str], add: Callable[[float], None]) -> None:
    """Wrap each method `names` of `obj` (see `wrap_method`) so that every call's seconds go to `add`: how the
    backends measure their forward passes apart from lm-eval's own bookkeeping."""
    def make(inner: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                add(time.perf_counter() - start)

        return timed

    for name in names:
        wrap_method(obj, name, make)
