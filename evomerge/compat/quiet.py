"""`quiet_third_party()`: one switch for the output of lm-eval, transformers, datasets and Ray.

A search prints one progress line; lm-eval and datasets would draw a bar per task load and log every request
build, transformers warns on every generation batch, Ray's job SDK logs every upload. Entry points (the CLI, the
demo, a worker process) call this; library code never changes these settings itself.

`TQDM_DISABLE` alone is not enough: tqdm reads TQDM_* variables once, when it is imported, so `tqdm.tqdm.__init__`
is wrapped as well. Everything is restored on exit (environment, logger levels, transformers' verbosity, tqdm).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Iterator

# Inherited by the processes started inside the block (Ray workers, a submitted job's driver).
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET_LOGGERS = {
    **{name: logging.ERROR for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.tasks")},
    # "uploading package ...": evomerge's own messages say enough
    **{name: logging.WARNING for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
                                          "ray.dashboard.modules.job.sdk")},
}


def job_env() -> dict[str, str]:
    """The environment variables a process started elsewhere (a Ray job's driver) needs to be as quiet."""
    return {"TQDM_DISABLE": QUIET_ENV["TQDM_DISABLE"]}


def install(bars: bool = True) -> Callable[[], None]:
    """Quiet third-party output now; returns the function that restores every setting changed.

    `bars=False` leaves tqdm alone: vLLM's offline runner divides by a progress bar's elapsed time."""
    undo: list[Callable[[], None]] = []
    for name, value in QUIET_ENV.items():
        if name == "TQDM_DISABLE" and not bars:
            continue
        if name not in os.environ:
            os.environ[name] = value
            undo.append(functools.partial(os.environ.pop, name, None))
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        undo.append(functools.partial(logger.setLevel, logger.level))
        logger.setLevel(level)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency, but a partial install should still run quiet
        pass
    else:
        undo.append(functools.partial(hf_logging.set_verbosity, hf_logging.get_verbosity()))
        hf_logging.set_verbosity_error()  # lm-eval passes max_length and max_new_tokens together: a warning a batch
    if bars:
        undo.append(_disable_tqdm())

    def restore() -> None:
        for step in reversed(undo):
            step()
        undo.clear()

    return restore


def _disable_tqdm() -> Callable[[], None]:
    import tqdm

    original = vars(tqdm.tqdm)["__init__"]  # the class's own attribute (tqdm wraps it in a descriptor itself)
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]

    def restore() -> None:
        tqdm.tqdm.__init__ = original  # type: ignore[method-assign]

    return restore


@contextlib.contextmanager
def quiet_third_party(bars: bool = True) -> Iterator[None]:
    """Third-party output quieted inside the block, every setting restored after it (see `install`)."""
    restore = install(bars=bars)
    try:
        yield
    finally:
        restore()
