"""End to end on the tiny zoo with the real fitness evaluator (lm-eval, in-memory merges): a PS job and a
PS-then-DFS job run, and the report scores the front and the parents on the test split."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from evomerge.search.jobs import run_job
from evomerge.search.loop import Progress
from evomerge.store import Store

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("space", ["sakana_ps", "ps_then_dfs"])
def test_zoo_job_end_to_end(tmp_path, zoo_dir, space):
    spec = yaml.safe_load((REPO / "search_spaces/jobs/zoo_mix.yaml").read_text())
    spec["models"] = {"base": str(zoo_dir / "llama/base"),
                      "sources": {"arith": str(zoo_dir / "llama/arith"), "cipher": str(zoo_dir / "llama/cipher")}}
    spec["objectives"]["include"] = [str(REPO / "fitness")]
    for o in spec["objectives"]["objectives"]:
        o["limit"] = 40
    spec.update(search_space=space, store=str(tmp_path / "store.sqlite"), report=str(tmp_path / "report"))
    spec["driver"].update(population=4, budget={"evaluations": 8})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    store = Store(result.store, readonly=True)
    assert store.counts(spec["name"]).get("done", 0) >= 4
    rows = store.candidates(spec["name"], status="done")
    assert all(store.items(spec["name"], r.id)["zoo_mix"] for r in rows)  # per-item results kept
    report = json.loads(result.json_path.read_text())
    assert report["front"] and all(c["test"] is not None for c in report["front"])
    assert {p["name"] for p in report["parents"]} == {"base", "arith", "cipher"}
    assert all(p["test"]["zoo_mix"] is not None for p in report["parents"])
