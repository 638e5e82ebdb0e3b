"""Pins for evomerge.compat: each shim does its job against the installed third party, and undoes it.

When a release of lm-eval, vLLM, Ray or tqdm moves a private name these shims use, a test here fails first and
names the shim to update."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import tqdm

from evomerge.compat import ThirdPartyAPIError
from evomerge.compat import lm_eval as lm_eval_compat
from evomerge.compat import quiet
from evomerge.compat import ray as ray_compat
from evomerge.compat import vllm as vllm_compat

FITNESS = Path(__file__).resolve().parents[1] / "fitness"


def bars_off() -> bool:
    return inspect.signature(tqdm.tqdm.__init__).parameters["disable"].default is True


# ---------------------------------------------------------------- quiet


def test_quiet_third_party_changes_everything_it_lists_and_restores_it(monkeypatch):
    from transformers.utils import logging as hf_logging

    for name in quiet.QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # a value the user set is kept
    hf_logging.set_verbosity_warning()
    init, levels = vars(tqdm.tqdm)["__init__"], {n: logging.getLogger(n).level for n in quiet.QUIET_LOGGERS}
    with quiet.quiet_third_party():
        assert bars_off()
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert all(logging.getLogger(n).level == lvl for n, lvl in quiet.QUIET_LOGGERS.items())
        assert logging.getLogger("lm_eval").level == logging.ERROR
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert vars(tqdm.tqdm)["__init__"] is init and not bars_off()
    assert "TQDM_DISABLE" not in os.environ and os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert {n: logging.getLogger(n).level for n in quiet.QUIET_LOGGERS} == levels
    assert hf_logging.get_verbosity() == hf_logging.WARNING


def test_quiet_without_bars_leaves_tqdm_alone(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with quiet.quiet_third_party(bars=False):
        assert not bars_off() and "TQDM_DISABLE" not in os.environ


def test_quiet_nests_and_restores_in_order():
    init = vars(tqdm.tqdm)["__init__"]
    restore = quiet.install()
    with quiet.quiet_third_party():
        assert bars_off()
    assert bars_off()  # the outer install still holds
    restore()
    assert vars(tqdm.tqdm)["__init__"] is init


# ---------------------------------------------------------------- lm-eval


def test_lm_eval_task_entry_and_full_config():
    from lm_eval.tasks import TaskManager

    entry = lm_eval_compat.entry_from_path(FITNESS / "zoo_mix.yaml")
    assert entry is not None and Path(entry.yaml_path).name == "zoo_mix.yaml"
    cfg = lm_eval_compat.load_full_config(TaskManager(include_path=str(FITNESS), include_defaults=False), entry)
    assert cfg["task"] == "zoo_mix" and cfg["metric_list"][0]["metric"] == "exact_match"


def test_lm_eval_missing_private_api_is_a_clear_error():
    with pytest.raises(ThirdPartyAPIError, match=r"lm_eval .* has no TaskManager._factory._load_full_config.*>=0.4.10"):
        lm_eval_compat.load_full_config(types.SimpleNamespace(), None)


def test_wrap_method_replaces_one_instance_and_restores_it():
    class Model:
        def _model_call(self, x):
            return x + 1

    m, other = Model(), Model()
    restore = lm_eval_compat.wrap_method(m, "_model_call", lambda inner: lambda x: inner(x) * 10)
    assert m._model_call(1) == 20 and other._model_call(1) == 2
    restore()
    assert m._model_call(1) == 2 and "_model_call" not in vars(m)
    with pytest.raises(ThirdPartyAPIError, match="Model._model_generate"):
        lm_eval_compat.wrap_method(m, "_model_generate", lambda inner: inner)


def test_hflm_has_the_methods_evomerge_wraps():
    from lm_eval.models.huggingface import HFLM

    assert all(callable(getattr(HFLM, name, None)) for name in ("_model_call", "_model_generate", "tok_encode"))


# ---------------------------------------------------------------- vLLM


def test_vllm_version_is_answered_for_lm_eval_only_inside_the_block(monkeypatch):
    if not vllm_compat.needs_shim():
        pytest.skip("a `vllm` distribution is installed: the shim is a no-op")
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="9.9.9"))
    original = md.version
    ask = "def ask():\n    return importlib.metadata.version('vllm')\n"
    from_lm_eval: dict = {"__name__": "lm_eval.models.vllm_causallms", "importlib": __import__("importlib.metadata")}
    from_elsewhere: dict = {"__name__": "vllm.platforms", "importlib": __import__("importlib.metadata")}
    exec(ask, from_lm_eval)
    exec(ask, from_elsewhere)
    with vllm_compat.version_answered():
        assert from_lm_eval["ask"]() == "9.9.9"
        with pytest.raises(md.PackageNotFoundError):
            from_elsewhere["ask"]()  # vLLM's own platform detection relies on the error
    assert md.version is original
    with pytest.raises(md.PackageNotFoundError):
        from_lm_eval["ask"]()


# ---------------------------------------------------------------- Ray


def test_ray_loopback_switch_is_set_and_restored():
    pytest.importorskip("ray")
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    restore = ray_compat.set_loopback_only()
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    restore()
    assert ray_constants.ENABLE_RAY_CLUSTER == before


def test_ray_has_the_auth_cache_evomerge_reloads():
    pytest.importorskip("ray")
    from ray._raylet import AuthenticationTokenLoader, Config

    assert callable(Config.initialize) and callable(AuthenticationTokenLoader.instance().reset_cache)
