"""`make demo` end to end: the search on local Ray with IRT, the export, and the comparison with the parents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

def test_the_demo_never_deletes_a_folder_it_did_not_write(zoo_dir, tmp_path, capsys):
    from evomerge.service.demo import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["--zoo", str(zoo_dir), "--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "is not a demo output folder" in capsys.readouterr().err


def test_the_demo_scores_with_irt_or_in_full_and_takes_the_seed(tmp_path):
    """`--fitness full` (bench/demo_margin.py's reference) is the same search with every candidate scored on every
    item; `--seed` reaches the driver."""
    from evomerge.fitness.objectives import parse_objectives
    from evomerge.service.demo import TASKS, demo_spec

    irt = demo_spec(tmp_path / "zoo", tmp_path / "out", 2, 240)
    full = demo_spec(tmp_path / "zoo", tmp_path / "out", 2, 240, seed=3, fitness="full")
    assert [o.estimator for o in parse_objectives(irt["objectives"], base_dir=TASKS).objectives] == ["irt", "irt"]
    assert [o.estimator for o in parse_objectives(full["objectives"], base_dir=TASKS).objectives] == ["full", "full"]
    assert (irt["driver"]["seed"], full["driver"]["seed"]) == (0, 3)
    assert {k: v for k, v in irt.items() if k not in ("objectives", "driver")} == \
        {k: v for k, v in full.items() if k not in ("objectives", "driver")}


def test_the_demo_searches_ties_weights_and_densities_per_expert(zoo_dir, tmp_path):
    """The space the README's demo margins were measured on: TIES, a weight and a density gene per expert (the
    `sakana_ps` preset, loaded into the job), decoding to a two-model mergekit recipe."""
    import numpy as np

    from evomerge.spaces.presets import build_space
    from evomerge.service.demo import demo_spec

    spec = demo_spec(zoo_dir, tmp_path, 2, 240)
    models = {"base": zoo_dir / "llama/base", "arith": zoo_dir / "llama/arith", "cipher": zoo_dir / "llama/cipher"}
    space = build_space(spec["search_space"], models, "base")
    assert sorted(space.gene_names) == ["density.arith", "density.cipher", "weight.arith", "weight.cipher"]
    recipe = space.decode(np.full(len(space.gene_names), 0.5))
    assert recipe.merge_method == "ties" and len(recipe.models) == 2, recipe


@pytest.mark.slow
def test_the_demo_finds_exports_and_verifies_a_merge_that_beats_its_parents(zoo_dir, tmp_path, capsys):
    from evomerge.service.demo import main
    from evomerge.store import Store

    out = tmp_path / "demo"
    rc = main(["--zoo", str(zoo_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]  # 0 only when the exported merge and path beat every parent (test split)
    merged = re.search(r"The merged model beats every parent, by ([0-9.]+) points", printed)
    # the target is 10 points (bench/demo_margin.py, seeds 0-2, 2026-12-06: +13.8, +13.2, +10.2); the pick and its
    # margin move with the machine's floating point, so seed 0 is held to 8 here (the hybrid the demo searched
    # before gave +3.6 to +8.4 at seed 0 over machines and settings, +5.5 on average over seeds 0-2)
    assert merged and float(merged.group(1)) >= 8.0, printed[-3000:]
    # stage 5: a data-flow search on the depth family finds a real path (longer than either parent: not a parent's
    # own layers), exports it as a standard checkpoint, and the checkpoint beats every parent on zoo_composed
    path = re.search(r"The path beats every parent, by ([0-9.]+) points", printed)
    assert path and float(path.group(1)) >= 10.0, printed[-3000:]
    config = yaml.safe_load((out / "paths" / "best-path" / "config.json").read_text())
    assert config["num_hidden_layers"] > 8, config
    assert "passthrough" in (out / "paths" / "best-path.yaml").read_text()
    # the search ran on Ray workers, with IRT estimates after calibration, and its front picks are measured
    store = Store(out / "store.sqlite", readonly=True)
    rows = store.candidates("demo")
    assert {r.worker.split("@")[0] for r in rows if r.status == "done"} >= {"ray-0", "ray-1"}  # ray-N@node
    assert any(r.estimated for r in rows) and store.irt_history("demo")
    # the exported recipe and checkpoint
    recipe = yaml.safe_load((out / "best-recipe.yaml").read_text())
    assert recipe["merge_method"] == "ties" and len(recipe["models"]) == 2, recipe  # mergekit YAML, the TIES space
    assert (out / "best-model" / "config.json").is_file() and list((out / "best-model").glob("*.safetensors"))
    assert (out / "report" / "report.html").is_file()
    assert Path(out / "job.yaml").is_file()
