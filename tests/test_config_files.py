"""Every YAML file a user writes (recipe, objectives, job spec) fails the same clear way when missing or broken."""

from __future__ import annotations

import pytest

from evomerge.fitness.objectives import FitnessConfigError, load_objectives
from evomerge.merge.api import load_recipe
from evomerge.merge.recipe import RecipeError
from evomerge.search.spec import JobSpecError, load_job

LOADERS = [(load_recipe, RecipeError, "recipe"), (load_objectives, FitnessConfigError, "objectives"),
           (load_job, JobSpecError, "job spec")]


@pytest.mark.parametrize("load,error,what", LOADERS)
def test_missing_and_malformed_files_name_the_file(tmp_path, load, error, what):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(error, match=f"{missing}: no such {what} file"):
        load(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [a, b\nmerge_method: ties\n")
    with pytest.raises(error, match=f"{broken}: not valid YAML"):
        load(broken)


def test_job_spec_reports_a_broken_objectives_file(tmp_path, tiny_llamas):
    (tmp_path / "objectives.yaml").write_text("objectives: [{task: zoo_mix\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: j\nmodels: {{base: {tiny_llamas['base']}, sources: {{a: {tiny_llamas['a']}, b: {tiny_llamas['b']}}}}}\n"
                   "search_space: sakana_ps\nobjectives: objectives.yaml\nstore: s.sqlite\n")
    with pytest.raises(JobSpecError, match=r"objectives.*not valid YAML"):
        load_job(job)
