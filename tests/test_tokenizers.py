"""Merging models whose vocabularies differ (fine-tunes that added tokens), against mergekit 0.1.5 run on the same
recipe: `tokenizer_source: union`, the `tokenizer:` block with per-token sources and padding, a model's tokenizer,
and `chat_template`; the merged vocabulary and every tensor must match mergekit's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.api import load_recipe
from evomerge.merge.recipe import RecipeError

REPO = Path(__file__).resolve().parent.parent
MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "evomerge-cache"))


def with_added_tokens(source: Path, out: Path, tokens: list[str], seed: int, template: str | None = None) -> Path:
    """A fine-tune that added tokens: its tokenizer extended, embeddings and head resized with seeded new rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    tok.add_tokens(tokens)
    if template is not None:
        tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[old:] = 0.1 * torch.randn(w[old:].shape, generator=g)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory, zoo_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    llama = zoo_dir / "llama"
    return {"base": llama / "base",
            "a": with_added_tokens(llama / "arith", root / "a", ["<tool>", "<a_only>"], 1, template="{{ 'A' }}"),
            "b": with_added_tokens(llama / "cipher", root / "b", ["<b_only>", "<tool>", "<b_two>"], 2,
                                   template="{{ 'A' }}")}


def write(tmp_path: Path, family: dict[str, Path], name: str, **top) -> Path:
    recipe = {"merge_method": "ties", "base_model": str(family["base"]), "parameters": {"normalize": True},
              "dtype": "float32",
              "models": [{"model": str(family["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": str(family["b"]), "parameters": {"weight": 0.5, "density": 0.7}}]} | top
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def ours(path: Path, out: Path) -> None:
    from evomerge.service.cli import main

    assert main(["merge", str(path), "-o", str(out)]) == 0


def theirs(path: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(MERGEKIT), str(path), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


CASES = {
    "union": {"tokenizer_source": "union"},
    "block": {"tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<b_only>": {"source": {"kind": "zero"}},
        "<tool>": {"source": {"kind": "model_token", "model": "B", "token": "<unk>"}, "force": True},
        "<a_only>": {"source": "A"}}}},
    "model": {"tokenizer_source": "B", "chat_template": "auto"},
}


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit venv missing (make venv-mergekit)")
@pytest.mark.parametrize("case", list(CASES))
def test_differing_vocabularies_merge_as_mergekit_merges_them(tmp_path, family, case):
    top = json.loads(json.dumps(CASES[case]).replace('"A"', json.dumps(str(family["a"])))
                     .replace('"B"', json.dumps(str(family["b"]))))
    path = write(tmp_path, family, case, **top)
    ours(path, tmp_path / "ours")
    theirs(path, tmp_path / "theirs")
    # mergekit orders a union's new tokens by Python's set order of the models (it differs between runs); ours by
    # the recipe's model order. The same tokens, and each token's rows equal, wherever its id is.
    va, vb = vocab(tmp_path / "ours"), vocab(tmp_path / "theirs")
    assert va.keys() == vb.keys() and all(va[t] == vb[t] for t in vocab(family["base"]))  # the base's ids kept
    a, b = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        if a[name].shape[0] == a["model.embed_tokens.weight"].shape[0]:  # vocabulary rows: compare token by token
            order = torch.tensor([vb[t] for t in sorted(va, key=va.get)])
            n = len(va)
            assert torch.allclose(a[name][:n], b[name][order], atol=1e-5, rtol=0), name
            assert torch.allclose(a[name][n:], b[name][n:], atol=1e-5, rtol=0), name  # padding rows
        else:
            assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["vocab_size"] == a["model.embed_tokens.weight"].shape[0] == b["model.embed_tokens.weight"].shape[0]
    if case == "block":
        assert config["vocab_size"] % 8 == 0 and config["vocab_size"] > len(vocab(tmp_path / "ours"))
    if case == "model":
        saved = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
        assert saved.get("chat_template") == "{{ 'A' }}" or (tmp_path / "ours" / "chat_template.jinja").read_text() == "{{ 'A' }}"


def test_vocabularies_that_differ_need_a_tokenizer_config_and_names_must_be_models(tmp_path, family, capsys):
    from evomerge.service.cli import main

    assert main(["merge", str(write(tmp_path, family, "plain")), "-o", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err  # no tokenizer config: refused, saying what to write
    assert "vocab_size 56 != 54" in said and "tokenizer_source: union" in said, said
    assert not (tmp_path / "out").exists()
    bad = write(tmp_path, family, "bad", tokenizer={"source": "union", "tokens": {"<tool>": {"source": "nope"}}})
    with pytest.raises(RecipeError, match=r"tokenizer.tokens.<tool>.source: 'nope' is not one of the recipe's models"):
        load_recipe(bad)
    both = write(tmp_path, family, "both", tokenizer_source="union", tokenizer={"source": "union"})
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(both)
    typo = write(tmp_path, family, "typo", tokenizer={"sorce": "union"})
    with pytest.raises(RecipeError, match="sorce"):
        load_recipe(typo)


def padded(source: Path, out: Path, rows: int, seed: int) -> Path:
    """A model whose embeddings hold more rows than its tokenizer has tokens (as Qwen's do)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[old:] = 0.1 * torch.randn(w[old:].shape, generator=g)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit venv missing (make venv-mergekit)")
@pytest.mark.parametrize("top, rows", [({"tokenizer_source": "base"}, 54), ({"chat_template": "{{ 'X' }}"}, 64)],
                         ids=["tokenizer-source-drops-padding", "template-alone-keeps-it"])
def test_padded_vocabularies_are_sized_as_mergekit_sizes_them(tmp_path, zoo_dir, top, rows):
    base = padded(zoo_dir / "llama" / "base", tmp_path / "base", 64, 1)
    arith = padded(zoo_dir / "llama" / "arith", tmp_path / "arith", 64, 2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(arith), "parameters": {"weight": 0.7}}]} | top
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ours(path, tmp_path / "ours")
    theirs(path, tmp_path / "theirs")
    a, b = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert a["model.embed_tokens.weight"].shape[0] == b["model.embed_tokens.weight"].shape[0] == rows
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == rows


def test_a_token_source_that_lacks_the_token_is_named(tmp_path, family, capsys):
    from evomerge.service.cli import main

    path = write(tmp_path, family, "lacks", tokenizer={"source": "union", "tokens": {
        "<a_only>": {"source": str(family["b"])}}})
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer.tokens.<a_only>.source: model '{family['b']}' has no token '<a_only>'" in err, err
    assert not (tmp_path / "out").exists()
