"""`evomerge import-evolve`: a mergekit-evolve config over the tiny zoo becomes a job spec that loads and runs;
the weighted task sum is one `sum` objective (its value the weighted sum of the tasks' values), or with --pareto
one objective per task; what maps differently is noted, what cannot map is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers import offline_lm_eval, quiet

FITNESS = REPO / "fitness"


@pytest.fixture(scope="module", autouse=True)
def _env():
    with offline_lm_eval():
        yield


def evolve_config(folder: Path, zoo: Path, **over) -> Path:
    """A mergekit-evolve config as its users write them: models relative to the config's folder."""
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    genome = {"models": [rel(zoo / "llama/arith"), rel(zoo / "llama/cipher")], "merge_method": "ties",
              "base_model": rel(zoo / "llama/base"), "layer_granularity": 2, "normalize": None,
              "allow_negative_weights": False, "smooth": False, "filters": ["self_attn", "mlp"]}
    genome.update(over.pop("genome", {}))
    data = {"genome": genome, "tasks": [{"name": "zoo_arith", "weight": 0.75, "metric": "exact_match"},
                                        {"name": "zoo_cipher", "weight": 0.25, "metric": "exact_match"}],
            "limit": 8, **over}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "evolve.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str) -> int:
    from evomerge.service.cli import main

    return main([str(a) for a in args])


def test_an_evolve_config_becomes_a_job_that_runs(zoo_dir, tmp_path, capsys):
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import parse_objectives
    from evomerge.search.jobs import run_job
    from evomerge.search.spec import load_job
    from evomerge.store import Store

    src = evolve_config(tmp_path / "evolve", zoo_dir)
    job_file = tmp_path / "jobs" / "job.yaml"
    assert cli("import-evolve", src, "-o", job_file, "--include", FITNESS, "--budget", 4, "--population", 4) == 0
    err = capsys.readouterr().err
    assert "note: filters -> modules ['self_attn', 'mlp', '*']" in err
    assert "note: apply_chat_template: mergekit-evolve's default is true, but the base model's tokenizer has no chat template" in err
    assert "# note: dtype: mergekit-evolve merges in bfloat16" in job_file.read_text()  # the notes stay with the job

    spec = load_job(job_file)
    assert spec.models == {"base": zoo_dir / "llama/base", "arith": zoo_dir / "llama/arith",
                           "cipher": zoo_dir / "llama/cipher"}
    assert spec.search_space == {"kind": "ps", "method": "ties", "layer_groups": 2, "modules": ["self_attn", "mlp", "*"],
                                 "weight_bounds": [0.0, 1.0], "density_bounds": [0.0, 1.0],
                                 "parameters": {"normalize": True, "stable_ties": True}, "seed": 0}  # 4 layers / granularity 2
    (score,) = spec.objectives.objectives
    assert score.kind == "sum" and score.direction == "maximise"
    assert [(w, t.task, t.metric, t.limit) for w, t in score.terms] == [(0.75, "zoo_arith", "exact_match", 8),
                                                                         (0.25, "zoo_cipher", "exact_match", 8)]
    assert spec.driver.algorithm == "cmaes" and spec.driver.options == {"sigma0": pytest.approx(1 / 6, abs=1e-6)}

    result = run_job(job_file, **quiet())
    store = Store(result.store)
    assert store.job(spec.name)["status"] == "done"
    rows = store.candidates(spec.name, status="done")
    assert len(rows) >= 4 and all(set(r.values) == {"score"} for r in rows)
    # the stored score is the weighted sum of the two tasks' values, measured apart
    parent = next(r for r in rows if r.origin == "parent:arith")
    apart = Evaluator(parse_objectives({"include": [str(FITNESS)], "objectives": [
        {"task": "zoo_arith", "limit": 8}, {"task": "zoo_cipher", "limit": 8}]}), zoo_dir / "llama/arith",
        backend="hf").evaluate()
    want = 0.75 * apart.values["zoo_arith"] + 0.25 * apart.values["zoo_cipher"]
    assert parent.values["score"] == pytest.approx(want, abs=1e-12)
    assert apart.values["zoo_arith"] != apart.values["zoo_cipher"]  # so the weights matter: swapped, the sum differs


def test_pareto_makes_one_objective_per_task(zoo_dir, tmp_path):
    from evomerge.search.evolve_import import convert_evolve
    from evomerge.search.spec import parse_job

    src = evolve_config(tmp_path, zoo_dir, genome={"allow_negative_weights": True, "smooth": True,
                                                  "layer_granularity": 0, "filters": None,
                                                  "models": [str(zoo_dir / "llama/base"), str(zoo_dir / "llama/arith")]},
                        apply_chat_template=False, num_fewshot=2)
    imp = convert_evolve(src, pareto=True, include=[str(FITNESS)], output_dir=tmp_path)
    spec = parse_job(imp.job, "job.yaml", tmp_path)
    assert [(o.name, o.task, o.direction, o.num_fewshot, o.apply_chat_template) for o in spec.objectives.objectives] == [
        ("zoo_arith", "zoo_arith", "maximise", 2, False), ("zoo_cipher", "zoo_cipher", "maximise", 2, False)]
    assert spec.driver.algorithm == "nsga2" and list(spec.models) == ["base", "arith"]
    assert spec.search_space["weight_bounds"] == [-1.0, 1.0] and spec.search_space["layer_groups"] == 1
    assert spec.search_space["modules"] == ["*"]
    notes = " | ".join(imp.notes)
    assert "smooth: true is not mapped" in notes and "genome.models lists the base model" in notes
    assert "weight_bounds [-1.0, 1.0]" in notes


@pytest.mark.parametrize("over,match", [
    ({"genome": {"merge_mehtod": "ties"}}, r"evolve.yml: genome.merge_mehtod: unknown field. Did you mean 'merge_method'\?"),
    ({"limits": 8}, r"evolve.yml: limits: unknown field. Did you mean 'limit'\?"),
    ({"genome": {"models": ["nowhere/model"]}}, r"evolve.yml: genome.models\[0\]: .nowhere/model.: not in the Hugging Face cache"),
    ({"genome": {"models": ["./nowhere/model"]}}, r"evolve.yml: genome.models\[0\]: no model folder with a config.json at "),
    ({"genome": {"merge_method": "slerp"}}, r"evolve.yml: genome.merge_method: slerp is not searched here"),
    ({"genome": {"merge_method": "dare_tie"}}, r"evolve.yml: genome.merge_method: unknown method 'dare_tie'. "
                                               r"Did you mean 'dare_ties'\?"),
    ({"genome": {"base_model": None}}, r"evolve.yml: genome.base_model: required here"),
    ({"genome": {"layer_granularity": 3}}, r"evolve.yml: genome.layer_granularity: 4 layers are not a multiple of 3"),
    ({"tasks": [{"name": "zoo_arith", "wieght": 1}]}, r"evolve.yml: tasks\[0\].wieght: unknown field. Did you mean 'weight'\?"),
])
def test_what_cannot_map_is_refused_in_one_line(zoo_dir, tmp_path, over, match):
    from evomerge.search.evolve_import import EvolveImportError, convert_evolve

    src = evolve_config(tmp_path, zoo_dir, **over)
    with pytest.raises(EvolveImportError, match=match) as e:
        convert_evolve(src, include=[str(FITNESS)], output_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_the_cli_refuses_and_writes_nothing(zoo_dir, tmp_path, capsys):
    src = evolve_config(tmp_path, zoo_dir, genome={"merge_method": "slerp"})
    assert cli("import-evolve", src, "-o", tmp_path / "job.yaml") == 2
    assert "genome.merge_method: slerp is not searched here" in capsys.readouterr().err
    assert not (tmp_path / "job.yaml").exists()
    # a task that is not there: the job check (as `evomerge run` does it) refuses before writing
    src = evolve_config(tmp_path / "b", zoo_dir, tasks=[{"name": "zoo_arith", "metric": "exact_match"}])
    assert cli("import-evolve", src, "-o", tmp_path / "job.yaml", "--include", tmp_path / "nowhere") == 2
    assert "--include" in capsys.readouterr().err and not (tmp_path / "job.yaml").exists()


def test_force_replaces_only_a_job_file_import_evolve_wrote_and_never_an_input(zoo_dir, tmp_path, capsys):
    source = evolve_config(tmp_path, zoo_dir)
    out = tmp_path / "job.yaml"
    assert cli("import-evolve", str(source), "-o", str(out)) == 0
    assert cli("import-evolve", str(source), "-o", str(out), "--force") == 0  # its own file: replaced
    capsys.readouterr()
    before = source.read_text()
    assert cli("import-evolve", str(source), "-o", str(source), "--force") == 2  # the config itself: never
    assert source.read_text() == before and "the input" in capsys.readouterr().err
    mine = tmp_path / "notes.yaml"
    mine.write_text("mine: true\n")
    assert cli("import-evolve", str(source), "-o", str(mine), "--force") == 2  # not one evomerge wrote
    assert mine.read_text() == "mine: true\n" and "not written by" in capsys.readouterr().err
