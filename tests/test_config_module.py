"""evomerge.config: the one set of rules every YAML reader uses (messages, numbers, bounds, paths), and the one
layer-count reader and writer of checkpoints/arch.py."""

from __future__ import annotations

import pytest

from evomerge.checkpoints.arch import Architecture, set_layer_count
from evomerge.config import (DTYPES, Where, bounds_field, check_keys, float_field, int_field, resolve_path,
                             suggest)
from evomerge.errors import ConfigError
from evomerge.merge.recipe import RecipeError

WHERE = Where("job.yaml", RecipeError)


def test_suggest_has_one_format():
    assert suggest("densty", ["weight", "density"]) == " Did you mean 'density'?"
    assert suggest("zzz", ["weight", "density"]) == " Known: weight, density."
    assert suggest("zzz", ["weight", "density"], list_known=False) == ""
    assert suggest("zoo_mx", ["zoo_mix", "zoo_max", "other"], n=2) == " Did you mean 'zoo_mix' or 'zoo_max'?"


def test_check_keys_names_file_field_and_fix():
    with pytest.raises(RecipeError, match=r"^job\.yaml: driver\.populaton: unknown field\. Did you mean 'population'\?$"):
        check_keys({"seed": 1, "populaton": 4}, ("seed", "population"), WHERE, "driver.")
    check_keys({"seed": 1}, ("seed",), WHERE)
    with pytest.raises(ConfigError, match=r"^<config>: x: unknown field\. Known: seed\.$"):
        check_keys({"x": 1}, ("seed",), Where(None))
    with pytest.raises(ConfigError, match=r"^x: unknown field"):  # no file part: the caller adds its own
        check_keys({"x": 1}, ("seed",), Where(None, default=""))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_int_field_refuses(value):
    with pytest.raises(RecipeError, match=rf"^job\.yaml: driver\.population: must be a whole number >= 1, got {value!r}$"):
        int_field(WHERE, "driver.population", value)


def test_numbers_within_bounds():
    assert int_field(WHERE, "f", 0, low=0) == 0 and int_field(WHERE, "f", 5, low=1, high=5) == 5
    with pytest.raises(RecipeError, match=r"must be a whole number in \[1, 5\], got 6"):
        int_field(WHERE, "f", 6, low=1, high=5)
    assert float_field(WHERE, "t", 1, low=0, high=1) == 1.0
    for bad in (float("nan"), 1.5, False):
        with pytest.raises(RecipeError, match=r"t: must be a finite number in \[0, 1\]"):
            float_field(WHERE, "t", bad, low=0, high=1)


def test_bounds_field():
    assert bounds_field(WHERE, "weight", [0, 1]) == (0.0, 1.0)
    assert bounds_field(WHERE, "density", (0.5, 0.5), low=0, high=1) == (0.5, 0.5)
    for bad in ([1, 0], [0], [0, "1"], [0, float("inf")], 0.5, [True, 1]):
        with pytest.raises(RecipeError, match=r"weight: must be \[low, high\]: two finite numbers with low <= high"):
            bounds_field(WHERE, "weight", bad)
    with pytest.raises(RecipeError, match=r"both in \[0, 1\], got \[0, 2\]"):
        bounds_field(WHERE, "density", [0, 2], low=0, high=1)


def test_resolve_path_file_folder_first_then_cwd(tmp_path, monkeypatch):
    spec_dir, cwd = tmp_path / "specs", tmp_path / "cwd"
    (spec_dir / "m").mkdir(parents=True)
    (cwd / "m").mkdir(parents=True)
    (cwd / "only_cwd").mkdir()
    monkeypatch.chdir(cwd)
    assert resolve_path("m", spec_dir) == spec_dir / "m"  # both have it: the file's folder wins
    assert resolve_path("only_cwd", spec_dir) == cwd / "only_cwd"
    assert resolve_path("nowhere", spec_dir) == spec_dir / "nowhere"  # neither: the file's folder, for the error
    assert resolve_path("m", None) == cwd / "m"
    assert resolve_path(tmp_path / "abs", spec_dir) == tmp_path / "abs"
    assert resolve_path("m", spec_dir, accept=lambda p: p.parent == cwd) == cwd / "m"


def test_dtypes_are_one_table():
    import torch

    assert DTYPES == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("config, keys", [
    ({"num_hidden_layers": 4}, ["num_hidden_layers"]),
    ({"n_layer": 4}, ["n_layer"]),  # GPT-2
    ({"num_hidden_layers": 4, "num_layers": 4}, ["num_hidden_layers", "num_layers"]),
])
def test_layer_count_reader_and_writer_agree(config, keys):
    assert Architecture.from_config(config).num_layers == 4
    set_layer_count(config, 7)
    assert Architecture.from_config(config).num_layers == 7 and all(config[k] == 7 for k in keys)


def test_layer_count_in_text_config():
    config = {"model_type": "gemma3", "text_config": {"num_hidden_layers": 26}}
    assert Architecture.from_config(config).num_layers == 26
    set_layer_count(config, 3)
    assert config["text_config"]["num_hidden_layers"] == 3 and "num_hidden_layers" not in config


def test_yaml_files_that_are_not_text_or_expand_without_bound_are_refused_naming_the_file(tmp_path):
    from evomerge.config import MAX_NODES, ConfigError, read_yaml

    garbage = tmp_path / "g.yaml"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ConfigError, match=r"g.yaml: not a text file \(byte 0 is not UTF-8\); a job spec file is YAML"):
        read_yaml(garbage, ConfigError, "job spec")
    for fan, depth in ((9, 14), (11, 10)):  # 117 aliases; 90 aliases (under any alias count one would allow)
        letters = "abcdefghijklmnopqrstuvwxyz"
        lines = [f"a: &a [{', '.join(['x'] * fan)}]"] + [f"{c}: &{c} [{', '.join(['*' + q] * fan)}]"
                                                       for q, c in zip(letters[:depth - 1], letters[1:depth])]
        bomb = tmp_path / "bomb.yaml"
        bomb.write_text("\n".join(lines) + "\n")  # fan^depth values when walked, about 1 KB on disk
        with pytest.raises(ConfigError, match=rf"bomb.yaml: expands to .* values through its YAML aliases; "
                                              rf"evomerge reads at most {MAX_NODES:,}"):
            read_yaml(bomb, ConfigError, "job spec")
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &b {weight: 0.5}\nmodels: [*b, *b]\n")
    assert read_yaml(fine, ConfigError, "recipe")[0] == {"base": {"weight": 0.5}, "models": [{"weight": 0.5}] * 2}
