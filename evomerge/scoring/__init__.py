"""Scoring: a candidate recipe becomes weights (the merge) and the weights a `FitnessResult` (fitness).

A scorer is per-worker state built by a factory `factory(spec, split)`: `default_scorer` (`recipe_scorer`: the
job's models resident, the fitness Evaluator), `evomerge.scoring.toy:scorer` (synthetic, for tests and demos), or
a plug-in named by `runtime.scorer: "package.module:factory"` (`load_factory`). Importing this package loads
neither torch nor a model.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from evomerge.errors import ConfigError
from evomerge.scoring.recipe_scorer import RecipeScorer, default_scorer


def load_factory(ref: str) -> Callable[..., Any]:
    """The scorer factory named by `package.module:factory`."""
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"runtime.scorer: cannot import '{ref}' ({e}); give module:function of an importable "
                          "scorer factory") from None


__all__ = ["RecipeScorer", "default_scorer", "load_factory"]
