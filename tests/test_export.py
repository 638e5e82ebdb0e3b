"""`evomerge export`: selection (--candidate, --best, --knee), the three formats, and the checks on OUT."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dict
from evomerge.merge.export import ExportError
from evomerge.merge.recipe import parse_recipe
from evomerge.search.front import knee_index
from evomerge.search.jobs import run_job
from evomerge.search.loop import Progress
from evomerge.service.cli import main
from evomerge.service.export import export, mergekit_yaml, objectives_of, select
from evomerge.store import Store

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "models"
MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A finished toy search over the golden models (TIES, deterministic); candidates with a first weight above
    0.8 fail, so the parents' own recipes (weight 1) fail."""
    folder = tmp_path_factory.mktemp("export_job")
    spec = {
        "name": "toy",
        "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
        "search_space": "sakana_ps",
        "driver": {"algorithm": "nsga2", "population": 6, "budget": {"evaluations": 24}, "seed": 1},
        "runtime": {"kind": "local", "scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"fail_above": 0.8}},
        "store": "out/store.sqlite",
    }
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    return folder / "out" / "store.sqlite"


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------- selection


def test_knee_is_the_point_nearest_the_ideal_after_scaling():
    # objectives in very different units: scaled to [0, 1] over the front, (0.5, 0.2) is nearest the origin
    assert knee_index(np.array([[0.0, 100.0], [0.5, 20.0], [1.0, 0.0]])) == 1
    assert knee_index(np.array([[0.0, 1.0], [0.6, 0.6], [1.0, 0.0]])) == 1  # 0.849 < 1
    assert knee_index(np.array([[0.0, 1.0], [0.8, 0.8], [1.0, 0.0]])) == 0  # 1.131 > 1: the first extreme (a tie)
    assert knee_index(np.array([[3.0], [1.0], [2.0]])) == 1  # one objective: the best
    assert knee_index(np.array([[1.0, 5.0], [0.0, 5.0]])) == 1  # a constant objective counts for nothing
    with pytest.raises(ValueError):
        knee_index(np.zeros((0, 2)))


def test_directions_of_a_job_stored_before_the_objective_table_come_from_its_losses(job, tmp_path):
    import shutil

    from conftest import as_schema_2

    old = tmp_path / "old.sqlite"
    shutil.copy(job, old)
    as_schema_2(old, b"unused")
    Store(old).close()  # opened for writing: upgraded, the job's directions still unknown
    store = Store(old, readonly=True)
    assert store.objectives("toy") is None  # no table: not resumed since the upgrade
    assert store.directions("toy") == Store(job, readonly=True).directions("toy") == [("fit", "maximise"), ("size", "minimise")]


def test_best_and_knee_pick_the_expected_candidates(job):
    store = Store(job, readonly=True)
    done = store.candidates("toy", status="done")
    objectives = {o.name: o for o in objectives_of(store, "toy")}
    assert {n: o.direction for n, o in objectives.items()} == {"fit": "maximise", "size": "minimise"}

    best_fit = max(done, key=lambda r: (r.values["fit"], -r.id))
    best_size = min(done, key=lambda r: (r.values["size"], r.id))
    assert select(store, "toy", best="fit").row.id == best_fit.id
    assert select(store, "toy", best="size").row.id == best_size.id

    front = [store.candidate("toy", i) for i in store.front("toy")]
    F = np.array([[-r.values["fit"], r.values["size"]] for r in front])  # losses, computed here from the values
    scaled = (F - F.min(0)) / (F.max(0) - F.min(0))
    expected = front[int(np.argmin(np.hypot(scaled[:, 0], scaled[:, 1])))]
    knee = select(store, "toy", knee=True)
    assert knee.row.id == expected.id and "knee" in knee.why
    store.close()


def test_an_estimate_is_a_pick_only_if_it_wins_at_the_worse_end_of_its_interval(job, tmp_path):
    """The best by fit is given an estimate: with a small sd it stays the pick of `export --best`, the report and
    the confirmation alike; with an sd whose worse end (value - 2 sd) falls below the runner-up's measured fit,
    the runner-up is picked. The knee moves the same way once its values are estimates with wide intervals."""
    import shutil
    from types import SimpleNamespace

    from evomerge.search.confirm import CAUTION_SDS, choose
    from evomerge.search.report import pick_summary

    path = tmp_path / "est.sqlite"
    shutil.copy(job, path)
    store = Store(path)
    done = sorted(store.candidates("toy", status="done"), key=lambda r: (-r.values["fit"], r.id))
    first, second = done[0], done[1]
    gap = first.values["fit"] - second.values["fit"]
    assert gap > 0
    names = ["fit", "size"]
    objectives = SimpleNamespace(objectives=[SimpleNamespace(name="fit", direction="maximise"),
                                             SimpleNamespace(name="size", direction="minimise")])

    def estimate(cid: int, objective: str, sd: float) -> None:
        row = store.candidate("toy", cid)
        with store.transaction():
            store.save_estimate("toy", cid, objective, row.values[objective], sd, "irt", 0.5, 10, 100, 0)

    def picked() -> tuple[int, int | None]:
        chosen = choose(store, "toy", names, store.front("toy"))
        summary = pick_summary(store, "toy", objectives, store.candidates("toy", status="done"))
        assert select(store, "toy", best="fit").row.id == summary["best"]["fit"]["id"] == chosen.best["fit"]
        assert select(store, "toy", knee=True).row.id == (summary["knee"] or {}).get("id") == chosen.knee
        return chosen.best["fit"], chosen.knee

    knee_before = picked()[1]
    estimate(first.id, "fit", 0.4 * gap / CAUTION_SDS)  # worse end: first's fit - 0.4 gap, still above second's
    assert picked()[0] == first.id
    assert "an estimate chosen at the worse end" in select(store, "toy", best="fit").why
    estimate(first.id, "fit", 1.5 * gap / CAUTION_SDS)  # worse end below second's measured fit
    assert picked()[0] == second.id and "estimate" not in select(store, "toy", best="fit").why
    front = [store.candidate("toy", c) for c in store.front("toy")]
    assert len(front) >= 3 and knee_before is not None
    span = {n: np.ptp([r.losses[k] for r in front]) for k, n in enumerate(names)}
    for n in names:  # the knee's values made uncertain by more than the front spans: it drops to an extreme
        estimate(knee_before, n, span[n] / CAUTION_SDS)
    assert picked()[1] != knee_before
    store.close()


def test_a_failed_candidate_is_refused_with_its_reason(job, tmp_path, capsys):
    store = Store(job, readonly=True)
    failed = store.candidates("toy", status="failed")
    store.close()
    assert failed
    for fmt in ("recipe", "model"):
        rc, _, err = cli(capsys, "export", job, "--candidate", failed[0].id, "--format", fmt, "-o", tmp_path / f"f-{fmt}")
        assert rc == 2 and f"candidate {failed[0].id} failed (toy: first weight" in err and "fail_above" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_unknown_candidate_objective_and_store_are_clear(job, tmp_path, capsys):
    rc, _, err = cli(capsys, "export", job, "--candidate", 999, "-o", tmp_path / "x.yaml")
    assert rc == 2 and "no candidate 999 (ids 0..23)" in err
    rc, _, err = cli(capsys, "export", job, "--best", "speed", "-o", tmp_path / "x.yaml")
    assert rc == 2 and "no such objective (objectives: fit, size)" in err
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a database\n" * 100)
    rc, _, err = cli(capsys, "export", text, "--knee", "-o", tmp_path / "x.yaml")
    assert rc == 2 and "not an evomerge store" in err
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    rc, _, err = cli(capsys, "export", other, "--knee", "-o", tmp_path / "x.yaml")
    assert rc == 2 and "not an evomerge store" in err


# ---------------------------------------------------------------- formats and OUT


def test_recipe_export_is_the_stored_recipe_and_never_overwrites(job, tmp_path, capsys):
    out = tmp_path / "knee.yaml"
    rc, stdout, err = cli(capsys, "export", job, "--knee", "--format", "recipe", "-o", out)
    assert rc == 0, err
    store = Store(job, readonly=True)
    knee = select(store, "toy", knee=True).row
    store.close()
    assert f"candidate {knee.id}" in stdout
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(knee.recipe)
    before = out.read_text()

    rc, _, err = cli(capsys, "export", job, "--best", "size", "-o", out)
    assert rc == 2 and "already exists" in err and "--force" in err and out.read_text() == before
    rc, _, err = cli(capsys, "export", job, "--best", "size", "-o", out, "--force")
    assert rc == 0 and out.read_text() != before
    assert no_temporaries(tmp_path)


def test_out_paths_that_could_write_elsewhere_are_refused(job, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link.yaml"
    link.symlink_to(elsewhere / "target.yaml")  # dangling: would create a file outside OUT's folder
    for extra in ([], ["--force"]):
        rc, _, err = cli(capsys, "export", job, "--knee", "-o", link, *extra)
        assert rc == 2 and "symbolic link" in err
    assert not (elsewhere / "target.yaml").exists()
    rc, _, err = cli(capsys, "export", job, "--knee", "-o", tmp_path / "missing" / "x.yaml")
    assert rc == 2 and "does not exist" in err
    rc, _, err = cli(capsys, "export", job, "--knee", "-o", elsewhere, "--force")  # a folder for a file format
    assert rc == 2 and "is a folder" in err
    with pytest.raises(ExportError, match="symbolic link"):
        export(job, link, fmt="model", knee=True, force=True)


def test_mergekit_export_of_a_parameter_space_recipe(job, tmp_path, capsys):
    out = tmp_path / "mk.yml"
    rc, _, err = cli(capsys, "export", job, "--best", "fit", "--format", "mergekit", "-o", out)
    assert rc == 0, err
    data = yaml.safe_load(out.read_text())
    assert data["merge_method"] == "ties" and "seed" not in data
    assert [m["model"] for m in data["models"]] == [str(GOLDEN / "a"), str(GOLDEN / "b")]
    parse_recipe(data)  # and it is still our recipe format


def test_random_methods_warn_that_mergekit_draws_other_masks():
    text = yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(GOLDEN / "base"), "seed": 3,
                           "models": [{"model": str(GOLDEN / "a"), "parameters": {"weight": 0.5, "density": 0.5}}]})
    config, notes = mergekit_yaml(text)
    assert "seed" not in yaml.safe_load(config) and notes and "random masks" in notes[0]


def test_mergekit_export_of_data_flow_recipes(tmp_path):
    src = {"A": str(GOLDEN / "a"), "B": str(GOLDEN / "b")}
    plain = {"sources": src, "dataflow": {"path": [{"model": "A", "layer": 0}, {"model": "A", "layer": 1},
                                                   {"model": "B", "layer": 1}, {"model": "B", "layer": 3}]}}
    config, _ = mergekit_yaml(yaml.safe_dump(plain))
    data = yaml.safe_load(config)
    assert data["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in data["slices"]] == [[0, 2], [1, 2], [3, 4]]

    scaled = {"sources": src, "dataflow": {"path": [{"model": "A", "layer": 0}, {"model": "B", "layer": 1, "scale": 0.8}]}}
    with pytest.raises(ExportError, match=r"not expressible in mergekit: 1 hop\(s\) scale the residual stream "
                                          r"\(hop 1: 0.8\).*--format model"):
        mergekit_yaml(yaml.safe_dump(scaled))
    mixed = {"sources": {"MIX": {"merge_method": "linear", "models": [{"model": src["A"], "parameters": {"weight": 1.0}}]},
                         **src},
             "dataflow": {"embed": "B", "path": [{"model": "MIX", "layer": 0}, {"model": "A", "layer": 1}]}}
    with pytest.raises(ExportError, match=r"parameter-space merge\(s\) MIX.*embeddings come from 'B'"):
        mergekit_yaml(yaml.safe_dump(mixed))


def test_model_export_holds_the_merge_and_a_model_card(job, tmp_path, capsys):
    out = tmp_path / "model"
    rc, stdout, err = cli(capsys, "export", job, "--knee", "--format", "model", "-o", out, "-q")
    assert rc == 0, err
    store = Store(job, readonly=True)
    knee = select(store, "toy", knee=True).row
    test = store.scores("toy", "test")[f"candidate:{knee.id}"]["values"]
    store.close()
    assert {"config.json", "model.safetensors", "README.md", "recipe.yaml"} <= {p.name for p in out.iterdir()}
    expected = merge_to_dict(parse_recipe(yaml.safe_load(knee.recipe)))
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "## Objectives" in card and "## Lineage" in card
    assert f"| fit | maximise | {knee.values['fit']:.6g} | {test['fit']:.6g} |" in card
    assert f"| size | minimise | {knee.values['size']:.6g} | {test['size']:.6g} |" in card
    assert f"candidate {knee.id} (knee of the front" in card
    assert "bred from the population of candidates " + ", ".join(str(p) for p in knee.parents[:1]) in card
    assert "merge_method: ties" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == yaml.safe_load(knee.recipe)

    before = (out / "README.md").read_text()
    rc, _, err = cli(capsys, "export", job, "--best", "fit", "--format", "model", "-o", out, "-q")
    assert rc == 2 and "already exists" in err and (out / "README.md").read_text() == before
    rc, _, err = cli(capsys, "export", job, "--best", "fit", "--format", "model", "-o", out, "-q", "--force")
    assert rc == 0, err
    assert no_temporaries(tmp_path)


def test_a_candidate_off_the_front_says_it_has_no_test_scores(job, tmp_path):
    store = Store(job, readonly=True)
    off = [r for r in store.candidates("toy", status="done") if r.id not in store.front("toy")
           and not r.origin.startswith("parent:")]
    store.close()
    path, _, _ = export(job, tmp_path / "m", fmt="model", candidate=off[0].id)
    card = (path / "README.md").read_text()
    assert "Not scored on the `test` split" in card and f"| {off[0].values['fit']:.6g} | - |" in card


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit venv missing (make venv-mergekit)")
def test_mergekit_accepts_the_export_and_gives_the_same_tensors(job, tmp_path):
    config = tmp_path / "mk.yml"
    path, selected, notes = export(job, config, fmt="mergekit", knee=True)
    # the search merged TIES with stable ties (a new job's default): the export says mergekit's order may differ;
    # on these float32 models no tie straddles a threshold, so mergekit gives our tensors all the same
    assert len(notes) == 1 and "stable_ties" in notes[0] and "stable_ties" not in config.read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(MERGEKIT), str(config), str(tmp_path / "theirs")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "theirs").glob("*.safetensors"):
        theirs.update(load_file(shard))
    ours = merge_to_dict(parse_recipe(yaml.safe_load(selected.row.recipe)))
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        assert (theirs[name].float() - tensor.float()).abs().max().item() <= 1e-5, name


@pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit venv missing (make venv-mergekit)")
@pytest.mark.parametrize("method", ["multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_the_new_methods_searched_export_to_mergekit_with_the_same_tensors(method, tmp_path):
    """A recipe decoded from a space with one of the methods mergekit 0.1.5 added (issue 15), exported as
    mergekit YAML: mergekit runs it and gives our tensors."""
    from evomerge.merge.api import to_mergekit
    from evomerge.spaces.ps import ParameterSpace

    one = method in ("nearswap", "arcee_fusion")
    models = {"base": GOLDEN / "base", "a": GOLDEN / "a", **({} if one else {"b": GOLDEN / "b"})}
    params = {"t": 0.04} if method == "nearswap" else {"epsilon": 0.05} if method.startswith("ram") else {}
    space = ParameterSpace(models, "base", methods=["ties", method], layer_groups=2, parameters=params)
    recipe = space.decode(space.genome({"a": 0.7, "b": 0.4}, 0.6, method))
    text, notes = to_mergekit(recipe)
    assert yaml.safe_load(text)["merge_method"] == method
    assert [n for n in notes if "arcee_fusion" in n] == ([notes[0]] if method == "arcee_fusion" else [])
    (tmp_path / "mk.yml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(MERGEKIT), str(tmp_path / "mk.yml"), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "theirs").glob("*.safetensors"):
        theirs.update(load_file(shard))
    ours = merge_to_dict(recipe)
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        assert (theirs[name].float() - tensor.float()).abs().max().item() <= 1e-5, name


def test_a_path_that_is_its_merge_in_order_exports_as_that_merge():
    """The PS-then-DFS hybrid's identity path over its merge is the merge: mergekit can express that."""
    merge = {"merge_method": "task_arithmetic", "base_model": str(GOLDEN / "base"),
             "models": [{"model": str(GOLDEN / "a"), "parameters": {"weight": 0.7}},
                        {"model": str(GOLDEN / "b"), "parameters": {"weight": 0.2}}]}
    n = yaml.safe_load((GOLDEN / "a" / "config.json").read_text())["num_hidden_layers"]
    identity = {"sources": {"merge": merge, "A": str(GOLDEN / "a")},
                "dataflow": {"embed": "merge", "head": "merge", "path": [{"model": "merge", "layer": i} for i in range(n)]}}
    config, notes = mergekit_yaml(yaml.safe_dump(identity))
    assert yaml.safe_load(config) == yaml.safe_load(parse_recipe(merge).to_yaml(mergekit_only=True))
    assert notes and "every layer of 'merge' in order" in notes[0]
    for hops in (list(range(n - 1)), [1, 0] + list(range(2, n))):  # a layer short, or out of order: a real path
        changed = {**identity, "dataflow": {**identity["dataflow"], "path": [{"model": "merge", "layer": i} for i in hops]}}
        with pytest.raises(ExportError, match="parameter-space merge"):
            mergekit_yaml(yaml.safe_dump(changed))


def test_force_never_replaces_an_input_or_what_evomerge_did_not_write(job, tmp_path, capsys):
    """The review's reproductions: `--force` deleted the store's folder, replaced the store with YAML, replaced a
    merge's own input model. Each is refused now, before any work, and nothing changes."""
    store_bytes = job.read_bytes()
    folder = job.parent
    before = sorted(p.name for p in folder.iterdir())
    for fmt, out, said in (("model", folder, "holds the input"), ("recipe", job, "is the input"),
                           ("model", folder / "inside-the-report", None)):
        rc, _, err = cli(capsys, "export", job, "--knee", "--format", fmt, "-o", out, "--force")
        if said is None:  # the report folder is the store's folder here: writing beside the store is fine
            assert rc == 0, err
            continue
        assert rc == 2 and said in err, err
    assert job.read_bytes() == store_bytes and set(before) <= {p.name for p in folder.iterdir()}

    mine = tmp_path / "someone-elses.yaml"  # a file evomerge did not write is not replaced, even with --force
    mine.write_text("precious: true\n")
    rc, _, err = cli(capsys, "export", job, "--knee", "-o", mine, "--force")
    assert rc == 2 and "not written by `evomerge export`" in err and mine.read_text() == "precious: true\n"
    theirs = tmp_path / "a-model"
    theirs.mkdir()
    (theirs / "weights.bin").write_text("theirs")
    rc, _, err = cli(capsys, "export", job, "--knee", "--format", "model", "-o", theirs, "--force", "-q")
    assert rc == 2 and "not written by evomerge" in err and (theirs / "weights.bin").read_text() == "theirs"
    ours = tmp_path / "ours.yaml"  # what evomerge wrote, it replaces
    assert cli(capsys, "export", job, "--knee", "-o", ours)[0] == 0
    assert ours.read_text().startswith("# evomerge export: job toy")
    assert cli(capsys, "export", job, "--best", "size", "-o", ours, "--force")[0] == 0


def test_merge_never_writes_over_or_into_its_inputs(tmp_path, capsys):
    import shutil

    model = tmp_path / "a"
    shutil.copytree(GOLDEN / "a", model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(model), "parameters": {"weight": 0.5}}, {"model": str(GOLDEN / "b"), "parameters": {"weight": 0.5}}]}))
    weights = (model / "model.safetensors").read_bytes()
    for out, said in ((model, "is the input"), (model / "merged", "lies inside the input"), (tmp_path, "holds the input")):
        rc, _, err = cli(capsys, "merge", recipe, "-o", out, "--force", "-q")
        assert rc == 2 and said in err, (out, err)
    assert (model / "model.safetensors").read_bytes() == weights and not (model / "merged").exists()
    assert cli(capsys, "merge", recipe, "-o", tmp_path / "m", "-q")[0] == 0
    assert (tmp_path / "m" / ".evomerge-output").is_file()
    assert cli(capsys, "merge", recipe, "-o", tmp_path / "m", "-q", "--force")[0] == 0  # its own output: replaced


def test_export_opens_the_store_read_only_and_never_changes_it(job, tmp_path, capsys):
    """Export reads the store without writing a byte, and an old store is refused with the command that upgrades
    it rather than upgraded behind the user's back."""
    import hashlib
    import shutil

    from conftest import as_schema_2

    copy = tmp_path / "store.sqlite"
    shutil.copy(job, copy)
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    rc, _, err = cli(capsys, "export", copy, "--best", "fit", "--format", "recipe", "-o", tmp_path / "r.yaml")
    assert rc == 0, err
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    wal = tmp_path / "store.sqlite-wal"  # a WAL reader's side files (SQLite's), with nothing written into them
    assert not wal.exists() or wal.stat().st_size == 0
    as_schema_2(copy, b"unused")
    old = copy.read_bytes()
    rc, _, err = cli(capsys, "export", copy, "--best", "fit", "--format", "recipe", "-o", tmp_path / "r2.yaml")
    assert rc == 2 and "older than" in err and "evomerge resume" in err and err.count("\n") == 1
    assert copy.read_bytes() == old and not (tmp_path / "r2.yaml").exists()


def test_an_output_made_while_a_merge_writes_is_never_replaced(tmp_path):
    """OUT is checked when the merge starts and again when it is finished: a folder someone made meanwhile (a
    user's, another merge's) survives, the merge fails saying so, and nothing is left half-written."""
    import torch

    from evomerge.merge.export import MARKER, ExportError, write_checkpoint

    def tensors(make):
        yield "w", torch.ones(2, 2)
        make()  # while the model is being written
        yield "v", torch.zeros(3)

    out = tmp_path / "OUT"

    def users():
        out.mkdir()
        (out / "precious.txt").write_text("mine")

    with pytest.raises(ExportError, match="appeared while the model was being written; nothing was replaced"):
        write_checkpoint(out, tensors(users), {"model_type": "llama"}, None, "card")
    assert (out / "precious.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]

    forced = tmp_path / "FORCED"
    forced.mkdir()
    (forced / MARKER).write_text("{}")  # evomerge's own output: --force may replace it ...

    def swapped():  # ... but it is swapped for a user's folder while the merge runs
        (forced / MARKER).unlink()
        (forced / "precious.txt").write_text("mine")

    with pytest.raises(ExportError, match="not written by evomerge"):
        write_checkpoint(forced, tensors(swapped), {"model_type": "llama"}, None, "card", force=True)
    assert (forced / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FORCED", "OUT"]


def test_a_tokenizer_source_that_names_custom_code_is_refused_before_the_merge(tmp_path, capsys):
    import shutil

    golden = Path(__file__).resolve().parent / "golden" / "models"
    base = tmp_path / "base"
    shutil.copytree(golden / "base", base)
    (base / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["tok.EvilTokenizer", null]}}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(golden / "a"), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "'auto_map' names custom code" in capsys.readouterr().err and not (tmp_path / "out").exists()
