"""Model references people really have: Hub ids (a Hub cache built here, resolved by huggingface_hub offline, a
pinned revision, a missing one) and `MODEL+ADAPTER` with peft LoRA adapters made from zoo models (equal to peft's
own merge_and_unload; a merge of two adapters equal to the same merge of their merged models; mismatched and
pickle-only adapters refused; a short search over adapters)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.checkpoints import CheckpointError, open_checkpoint
from evomerge.checkpoints.lora import AdaptedCheckpoint
from evomerge.checkpoints.refs import reference_of, resolve_model_ref
from evomerge.merge.api import load_recipe
from evomerge.merge.engine import merge_to_dict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "evomerge-cache"))


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    """A peft LoRA adapter on `base` with random (nonzero) B factors and saved-whole modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]) | config
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True, "target_modules": ["q_proj", "k_proj", "o_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    {"r": 6, "lora_alpha": 3, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}},
], ids=["plain", "rslora-embedding-saved-head", "patterns"])
def test_model_plus_adapter_equals_peft_merge_and_unload(tmp_path, zoo_dir, config):
    base = zoo_dir / "llama" / "base"
    adapter = make_adapter(base, tmp_path / "ad", seed=1, **config)
    folder = resolve_model_ref(f"{base}+{adapter}")
    ck = open_checkpoint(folder)
    assert isinstance(ck, AdaptedCheckpoint) and not list(folder.glob("*.safetensors"))  # no weights copied
    expected, plain = peft_merged(base, adapter), open_checkpoint(base)
    changed = 0
    for name in ck.names():
        got = ck.get(name)
        assert got.dtype == plain.info(name).dtype and torch.allclose(got, expected[name], atol=1e-6, rtol=0), name
        changed += not torch.equal(got, plain.get(name))
    assert changed >= 4 * 2  # the adapter really changes the targeted tensors of every layer
    assert reference_of(folder) == f"{base.resolve()}+{adapter.resolve()}"  # how mergekit names it
    assert resolve_model_ref(f"{base}+{adapter}") == folder  # made once


def test_a_merge_of_two_adapters_equals_the_same_merge_of_their_merged_models(tmp_path, zoo_dir):
    from transformers import AutoModelForCausalLM

    base = zoo_dir / "llama" / "base"
    merged = {}
    for i in (1, 2):
        adapter = make_adapter(base, tmp_path / f"ad{i}", seed=i)
        model = AutoModelForCausalLM.from_pretrained(base)
        model.load_state_dict(peft_merged(base, adapter))
        model.save_pretrained(tmp_path / f"merged{i}")
        merged[i] = (f"{base}+{adapter}", tmp_path / f"merged{i}")

    def ties(a: str, b: str) -> dict[str, torch.Tensor]:
        recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
                  "models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                             {"model": b, "parameters": {"weight": 0.4, "density": 0.7}}]}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return merge_to_dict(load_recipe(path))

    via_adapters = ties(merged[1][0], merged[2][0])
    via_folders = ties(str(merged[1][1]), str(merged[2][1]))
    assert via_adapters.keys() == via_folders.keys()
    for name in via_adapters:  # the same inputs up to float32 rounding of W + BA; TIES thresholds may not flip
        assert torch.allclose(via_adapters[name], via_folders[name], atol=1e-6, rtol=0), name


def test_an_adapter_that_does_not_fit_the_model_lists_the_mismatches(tmp_path, zoo_dir):
    adapter = make_adapter(zoo_dir / "qwen2" / "base", tmp_path / "qwen-ad", seed=3)
    with pytest.raises(CheckpointError) as e:
        resolve_model_ref(f"{zoo_dir / 'llama' / 'base'}+{adapter}")
    msg = str(e.value)
    assert "does not fit the model" in msg and "mismatch(es)" in msg and "it was trained on" in msg, msg
    assert "the base has" in msg or "is not in the base" in msg


def test_pickle_only_dora_and_half_adapters_are_refused(tmp_path, zoo_dir):
    base = zoo_dir / "llama" / "base"
    adapter = make_adapter(base, tmp_path / "ad", seed=4)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(adapter_model.bin\).*save_file"):
        resolve_model_ref(f"{base}+{pickled}")
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora: DoRA adapters"):
        resolve_model_ref(f"{base}+{dora}")
    with pytest.raises(CheckpointError, match="no LoRA adapter folder with an adapter_config.json"):
        resolve_model_ref(f"{base}+{tmp_path / 'nowhere'}")


# ---------------------------------------------------------------- the Hub cache


def hub_cache(root: Path, repo: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """The layout huggingface_hub keeps (blobs, refs, snapshots of links), as a download would leave it."""
    store = root / "hub" / ("models--" + repo.replace("/", "--"))
    snap = store / "snapshots" / commit
    snap.mkdir(parents=True)
    (store / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            blob = store / "blobs" / f"{commit[:8]}-{f.name}"
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (store / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (store / "refs" / ref).write_text(commit)


def run_offline(hf_home: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_ids_resolve_through_the_cache_offline_pinned_and_missing(tmp_path, zoo_dir):
    home = tmp_path / "hf"
    old, new = "a" * 40, "b" * 40
    hub_cache(home, "zoo/llama-arith", zoo_dir / "llama" / "arith", old, refs=("v1",))
    hub_cache(home, "zoo/llama-arith", zoo_dir / "llama" / "cipher", new, refs=("main",))
    code = ("from evomerge.checkpoints.refs import resolve_model_ref as r; import sys\n"
            "for ref in sys.argv[1:]:\n"
            "    try: print(ref, '->', r(ref))\n"
            "    except Exception as e: print(ref, '!', type(e).__name__, e)\n")
    refs = ["zoo/llama-arith", "zoo/llama-arith@v1", f"zoo/llama-arith@{old}", "zoo/llama-arith@v2", "zoo/nope"]
    out = run_offline(home, code.replace("sys.argv[1:]", repr(refs)))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    snapshots = home / "hub" / "models--zoo--llama-arith" / "snapshots"
    assert lines["zoo/llama-arith"] == f"-> {snapshots / new}"  # main
    assert lines["zoo/llama-arith@v1"] == f"-> {snapshots / old}"  # a tag, pinned
    assert lines[f"zoo/llama-arith@{old}"] == f"-> {snapshots / old}"  # a commit
    for missing in ("zoo/llama-arith@v2", "zoo/nope"):
        said = lines[missing]
        assert said.startswith("! CheckpointError") and "not in the Hugging Face cache" in said, said
        assert "HF_HUB_OFFLINE=1" in said and f"hf download {missing.split('@')[0]}" in said, said
    # the snapshot's files are links into the cache's blobs: a model's own files, readable as such
    ck = open_checkpoint(snapshots / old)
    assert torch.equal(ck.get("model.embed_tokens.weight"),
                       open_checkpoint(zoo_dir / "llama" / "arith").get("model.embed_tokens.weight"))


def test_a_recipe_naming_hub_ids_merges_what_the_same_local_folders_merge(tmp_path, zoo_dir):
    home = tmp_path / "hf"
    for i, name in enumerate(("base", "arith", "cipher")):
        hub_cache(home, f"zoo/llama-{name}", zoo_dir / "llama" / name, f"{i}" * 40)
    recipe = {"merge_method": "task_arithmetic", "base_model": "zoo/llama-base",
              "models": [{"model": "zoo/llama-arith", "parameters": {"weight": 0.7}},
                         {"model": f"zoo/llama-cipher@{'2' * 40}", "parameters": {"weight": 0.5}}]}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "EVOMERGE_CACHE": str(tmp_path / "c")}
    run = subprocess.run([sys.executable, "-m", "evomerge.service.cli", "merge", str(tmp_path / "hub.yaml"), "-o",
                          str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    local = {**recipe, "base_model": str(zoo_dir / "llama/base"),
             "models": [{"model": str(zoo_dir / "llama/arith"), "parameters": {"weight": 0.7}},
                        {"model": str(zoo_dir / "llama/cipher"), "parameters": {"weight": 0.5}}]}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    expected = merge_to_dict(load_recipe(tmp_path / "local.yaml"))
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k].to(got[k].dtype)) for k in got)
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # copied from the snapshot's links into the cache
    missing = {**recipe, "base_model": "zoo/llama-other"}
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    run = subprocess.run([sys.executable, "-m", "evomerge.service.cli", "merge", str(tmp_path / "missing.yaml"), "-o",
                          str(tmp_path / "out2")], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "base_model" in last and "'zoo/llama-other': not in the Hugging Face cache" in last, last
    assert "hf download zoo/llama-other" in last and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_a_short_search_over_adapters_runs_and_exports_them_as_mergekit_names_them(tmp_path, zoo_dir):
    from evomerge.search.jobs import run_job
    from evomerge.search.loop import Progress
    from evomerge.store import Store

    base = zoo_dir / "llama" / "base"
    adapters = {name: make_adapter(base, tmp_path / name, seed=i) for i, name in enumerate(("ad1", "ad2"), 5)}
    spec = yaml.safe_load((REPO / "search_spaces/jobs/zoo_mix.yaml").read_text())
    spec["models"] = {"base": str(base), "sources": {k: f"{base}+{v}" for k, v in adapters.items()}}
    spec["objectives"]["include"] = [str(REPO / "fitness")]
    for o in spec["objectives"]["objectives"]:
        o["limit"] = 20
    spec.pop("report", None)
    spec.update(search_space="sakana_ps", store=str(tmp_path / "store.sqlite"))
    spec["driver"].update(population=4, budget={"evaluations": 8})
    spec.setdefault("runtime", {}).update(kind="local", workers=1)
    spec["runtime"].pop("irt", None)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    store = Store(tmp_path / "store.sqlite", readonly=True)
    rows = store.candidates(spec["name"])
    assert sum(r.status == "done" for r in rows) >= 8, [(r.status, r.reason) for r in rows]
    from evomerge.service.cli import main

    assert main(["export", str(tmp_path / "store.sqlite"), "--knee", "--format", "mergekit", "-o",
                 str(tmp_path / "knee.yaml")]) == 0
    exported = (tmp_path / "knee.yaml").read_text()
    assert f"{base.resolve()}+{adapters['ad1'].resolve()}" in exported  # mergekit's MODEL+ADAPTER, not our cache folder


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_worker_keeps_adapters_as_their_factors_and_merges_what_the_folders_merge(tmp_path, zoo_dir, method):
    """Adapters over the worker's own base stay resident as their low-rank factors (the base's tensors shared, no
    dense copy); candidates equal the merge of the adapted folders read from disk, bit for bit, for every placement."""
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe

    base = zoo_dir / "llama" / "base"
    folders = {"base": base}
    for i in (1, 2):
        folders[f"ad{i}"] = resolve_model_ref(f"{base}+{make_adapter(base, tmp_path / f'ad{i}', seed=10 + i)}")
    params = {"weight": 0.5, "density": 0.6} if method == "ties" else {"weight": 0.5}
    recipe = parse_recipe({"merge_method": method, "base_model": str(base),
                           "models": [{"model": str(folders[k]), "parameters": params} for k in ("ad1", "ad2")]})
    expected = merge_to_dict(recipe)
    worker = Materialiser(folders, "base")
    base_bytes = open_checkpoint(base).num_bytes
    factor_bytes = sum(open_checkpoint(folders[k]).adapter.num_bytes for k in ("ad1", "ad2"))
    assert set(worker.lora) == {"ad1", "ad2"} and worker.resident_bytes < base_bytes + 1.05 * factor_bytes
    assert worker.resident_bytes < 1.5 * base_bytes  # three dense models would be 3x
    for placement in ("device", "host", "disk"):
        got = dict(Materialiser(folders, "base", sources=placement).iter_merged(recipe))
        assert got.keys() == expected.keys()
        for name, t in expected.items():
            assert torch.equal(got[name], t), (placement, name)


def test_a_model_plus_adapter_loads_as_one_model_for_eval(tmp_path, zoo_dir):
    """`evomerge eval MODEL+ADAPTER` and the report's parents load through checkpoints.hf.load_model: the module's
    weights are peft's merge_and_unload, and the adapter's files are not held open afterwards."""
    from evomerge.checkpoints.hf import load_model

    base = zoo_dir / "llama" / "base"
    adapter = make_adapter(base, tmp_path / "ad", seed=21, target_modules=["q_proj", "lm_head"])
    model = load_model(resolve_model_ref(f"{base}+{adapter}"))
    expected = peft_merged(base, adapter)
    got = model.state_dict()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in expected)
    assert not torch.equal(got["lm_head.weight"], open_checkpoint(base).get("lm_head.weight"))


def test_a_hub_repo_with_only_pickle_weights_is_refused(tmp_path, zoo_dir):
    home, folder = tmp_path / "hf", tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(zoo_dir / "llama" / "base" / "config.json", folder)
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    hub_cache(home, "zoo/pickled", folder, "c" * 40)
    code = ("from evomerge.checkpoints.refs import resolve_model_ref\n"
            "try: resolve_model_ref('zoo/pickled')\n"
            "except Exception as e: print(type(e).__name__, e)\n")
    out = run_offline(home, code)
    assert out.returncode == 0 and out.stdout.startswith("CheckpointError 'zoo/pickled'"), out.stdout + out.stderr
    assert "has no safetensors weights" in out.stdout and "refuses pickle" in out.stdout
