"""Checkpoint I/O, architecture introspection and compatibility errors, on real tiny models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import save_tiny
from evomerge.checkpoints import (
    Architecture,
    CheckpointError,
    IncompatibleModelsError,
    check_compatible,
    classify_tensor,
    open_checkpoint,
)

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_of_each_family_has_a_role(tmp_path, family):
    ck = open_checkpoint(save_tiny(tmp_path / family, family))
    arch = Architecture.from_config(ck.config, ck.names())
    assert arch.num_layers == 3
    roles = {n: classify_tensor(n) for n in ck.names()}
    assert not [n for n, r in roles.items() if r.kind == "other"], "unmapped tensors"
    kinds = {r.kind for r in roles.values()}
    assert {"embed", "layer", "final_norm"} <= kinds
    assert {r.layer for r in roles.values() if r.kind == "layer"} == {0, 1, 2}
    # every layer has attention and MLP tensors, and exactly two residual-stream writers (weights)
    for i in range(3):
        layer = [r for r in roles.values() if r.layer == i]
        assert {"attention", "mlp", "norm"} <= {r.module for r in layer}
    writers = sorted(n for n, r in roles.items() if r.block_output and r.layer == 0 and n.endswith("weight"))
    assert len(writers) == 2, writers
    # tied families have no separate head tensor in the checkpoint
    assert arch.tied_embeddings == ("head" not in kinds)
    if family in ("gemma", "gpt2", "qwen2"):
        assert arch.tied_embeddings


def test_lazy_reads_match_transformers(tiny_llamas):
    from transformers import AutoModelForCausalLM

    ck = open_checkpoint(tiny_llamas["a"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llamas["a"], dtype=torch.float32)
    sd = model.state_dict()
    assert set(ck.names()) == set(sd)
    for name in ck.names():
        assert ck.info(name).shape == tuple(sd[name].shape)
        assert torch.equal(ck.get(name), sd[name])
    assert ck.num_params == sum(p.numel() for p in model.parameters())


def test_sharded_folder_reads_like_single_file(tiny_llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llamas["b"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="4KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded, single = open_checkpoint(tmp_path / "sharded"), open_checkpoint(tiny_llamas["b"])
    assert len({i.shard for i in sharded.tensors.values()}) > 2
    assert set(sharded.names()) == set(single.names())
    for name in single.names():
        assert torch.equal(sharded.get(name), single.get(name))


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle.*safetensors only"):
        open_checkpoint(folder)
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        open_checkpoint(folder / "pytorch_model.bin")


def test_missing_things_are_named(tmp_path, tiny_llamas):
    with pytest.raises(CheckpointError, match="no such model folder"):
        open_checkpoint(tmp_path / "nope")
    folder = tmp_path / "noconfig"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_checkpoint(folder)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llamas["base"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        open_checkpoint(broken)


def test_incompatible_models_report_every_mismatch(tmp_path, tiny_llamas):
    other = save_tiny(tmp_path / "gpt2", "gpt2")
    # a llama whose one tensor has the wrong shape and one tensor is missing
    odd = tmp_path / "odd"
    shutil.copytree(tiny_llamas["a"], odd)
    ck = open_checkpoint(odd)
    tensors = {n: ck.get(n).clone() for n in ck.names()}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 16)
    del tensors["model.layers.2.input_layernorm.weight"]
    ck.close()
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})

    base = open_checkpoint(tiny_llamas["base"])
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible({"base": base, "odd": open_checkpoint(odd), "gpt2": open_checkpoint(other)})
    problems = e.value.problems
    text = "\n".join(problems)
    assert "model.layers.0.mlp.up_proj.weight" in text and "[8, 16]" in text
    assert "model.layers.2.input_layernorm.weight" in text
    assert any(p.startswith("gpt2") and "lacks" in p for p in problems)
    assert len(problems) >= 4
    check_compatible({"base": base, "a": open_checkpoint(tiny_llamas["a"])})  # fine-tunes are compatible


def test_a_config_without_a_layer_count_and_a_broken_tokenizer_are_clear_errors(zoo_dir, tmp_path):
    import json
    import shutil

    from evomerge.checkpoints import CheckpointError, open_checkpoint
    from evomerge.checkpoints.compat import tokenizer_vocab
    from evomerge.checkpoints.hf import load_tokenizer

    model = tmp_path / "m"
    shutil.copytree(zoo_dir / "llama" / "arith", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"}))
    with pytest.raises(CheckpointError, match=r"m/config.json: config.json has no layer count"):
        open_checkpoint(model)
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"m/tokenizer.json: not valid JSON"):
        tokenizer_vocab(model)
    with pytest.raises(CheckpointError, match=r"m/tokenizer.json: not valid JSON"):
        load_tokenizer(model)
