"""The one exception hierarchy of evomerge.

Every error evomerge raises on purpose says who has to act on it:

- `UserError`: the input is wrong (a YAML file, a model folder, a store, a command-line value). The message names
  the file, the field and the fix; the CLI prints it as one line and exits with status 2, no traceback.
  `ConfigError` is the generic one for a config field.
- `CandidateError`: one candidate failed (NaN weights, NaN scores). The search records it and goes on.
- `InternalError`: a bug in evomerge itself. It must stop the job with the failing frame, never be counted as a
  failed candidate.

The concrete classes (`RecipeError`, `JobSpecError`, `CandidateFailed`, ...) live beside the code that raises them
and subclass one of these; many also keep the `ValueError`/`RuntimeError` base they always had, so code that
catches those still does. Catch the category, not the list of classes: a new error class then needs no edit in the
places that handle its category.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Root of every exception evomerge raises on purpose."""


class UserError(EvomergeError):
    """Bad input the user can fix; the message says where and how (the CLI prints it, exit 2)."""


class ConfigError(UserError, ValueError):
    """A value in a config file or a job spec is wrong, where no file-specific class (RecipeError, JobSpecError,
    ...) applies. A ValueError too, like those classes."""


class CandidateError(EvomergeError):
    """One candidate failed; the search records the reason and goes on with the next one."""


class InternalError(EvomergeError):
    """A bug in evomerge: stops the job with a clear message instead of failing candidates one by one."""


class Terminated(KeyboardInterrupt):
    """A stop request by signal (SIGTERM: `evomerge stop`, a Ray job stop, a pod shutdown), handled as Ctrl-C is:
    the job is left `interrupted` and resumable. A KeyboardInterrupt, so every Ctrl-C path handles it too."""

    def __init__(self, signal_name: str = "SIGTERM"):
        super().__init__(signal_name)
        self.signal_name = signal_name
