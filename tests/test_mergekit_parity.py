"""Our engine reproduces mergekit 0.1.5 on the committed goldens (tests/golden/, see make_golden.py).

Each case folder holds a mergekit recipe (model paths relative to the folder) and the tensors
`mergekit-yaml` produced from it in float32. Every output tensor must match within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dict
from evomerge.merge.api import load_recipe

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "recipe.yaml").is_file() and (p / "merged.safetensors").is_file())
TOLERANCE = 1e-5


def test_goldens_are_present():
    assert {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "slices_ties"} <= set(CASES)
    # every deterministic method of mergekit 0.1.5 has a case (dare_*, della* are random: tests/test_methods.py)
    assert {"nuslerp", "model_stock", "multislerp", "multislerp_nobase", "karcher", "sce", "nearswap", "arcee_fusion",
            "ram", "ramplus_tl"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_engine_matches_mergekit(case):
    expected = load_file(GOLDEN / case / "merged.safetensors")
    merged = merge_to_dict(load_recipe(GOLDEN / case / "recipe.yaml"))
    assert sorted(merged) == sorted(expected), f"{case}: tensor names differ"
    for name, want in expected.items():
        got = merged[name].to(torch.float32)
        assert got.shape == want.shape, f"{case}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        diff = (got - want).abs().max().item()
        assert diff <= TOLERANCE, f"{case}: {name} differs from mergekit by {diff:.3g}"
