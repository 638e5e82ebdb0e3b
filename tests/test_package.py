"""A wheel, built here and installed (not editable) into a folder of its own, holds the search-space presets and the
example tasks, and runs the example job from outside the checkout with only the installed files visible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PRESETS = {"sakana_ps", "layerwise_ps", "dfs", "ps_then_dfs"}
TASKS = {"zoo_arith", "zoo_cipher", "zoo_composed", "zoo_mix", "zoo_reverse"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps --target SITE` of a wheel built from a copy of the checkout (the build writes
    build/ and *.egg-info where it runs: not in the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("evomerge", "fitness", "search_spaces"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (root / "dist").glob("evomerge-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   text=True)
    return site


def run_installed(site: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_the_wheel_ships_presets_and_example_tasks(installed, tmp_path):
    examples = installed / "evomerge" / "examples"
    for folder in (examples / "search_spaces", examples / "fitness"):
        assert folder.is_dir() and not folder.is_symlink()  # copies, not links into a checkout
    assert {p.stem for p in (examples / "fitness").glob("zoo_*.yaml")} == TASKS
    assert all((examples / "fitness" / "data" / t.removeprefix("zoo_") / "test.jsonl").is_file() for t in TASKS)
    out = run_installed(installed, tmp_path, "-c", "import json, evomerge; from evomerge.spaces.presets import "
                        "PRESET_DIR, preset_names; print(json.dumps([evomerge.__file__, str(PRESET_DIR), preset_names()]))")
    assert out.returncode == 0, out.stderr
    module, preset_dir, names = json.loads(out.stdout)
    assert Path(module).is_relative_to(installed) and Path(preset_dir).is_relative_to(installed)
    assert PRESETS <= set(names)


def test_the_installed_package_runs_the_example_job(installed, tmp_path, zoo_dir):
    """The README's example job (a preset space, the example tasks), scaled down, run from outside the checkout."""
    examples = installed / "evomerge" / "examples"
    spec = yaml.safe_load((examples / "search_spaces" / "jobs" / "zoo_mix.yaml").read_text())
    spec["models"] = {"base": str(zoo_dir / "llama/base"),
                      "sources": {"arith": str(zoo_dir / "llama/arith"), "cipher": str(zoo_dir / "llama/cipher")}}
    spec["objectives"]["include"] = [str(examples / "fitness")]
    for o in spec["objectives"]["objectives"]:
        o["limit"] = 8
    spec["driver"].update(algorithm="random", population=2, budget={"evaluations": 2})
    spec.update(store="out/store.sqlite", report="out/report")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    probe = run_installed(installed, tmp_path, "-c", "import evomerge; print(evomerge.__file__)")
    assert Path(probe.stdout.strip()).is_relative_to(installed), probe.stdout + probe.stderr
    done = run_installed(installed, tmp_path, "-m", "evomerge", "run", str(job))
    assert done.returncode == 0, done.stderr[-3000:]
    from evomerge.store import Store

    store = Store(tmp_path / "out" / "store.sqlite")
    (name,) = store.jobs()
    rows = store.candidates(name, status="done")
    assert len(rows) >= 2 and all(0.0 <= r.values["zoo_mix"] <= 1.0 for r in rows)
    assert store.job(name)["status"] == "done"
