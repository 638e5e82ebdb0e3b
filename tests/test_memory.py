"""Real-size workers: placements and dtypes of the resident sources, streaming merged tensors, the memory plan.

The plan's arithmetic is checked against what the Materialiser and the engine's module really allocate; every
placement against today's float32 layout (bit-identical) and the disk merge; header-only checkpoints of
Mistral-7B, Llama-3-8B and Llama-3-70B (sparse files: no disk) against the placements README states.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.memory import GiB, Machine, PlanError, Workload, plan_worker
from evomerge.merge.engine import merge_to_dict
from evomerge.merge.materialise import Materialiser
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.sparsify import magnitude, rank_window_mask
from evomerge.zoo.shapes import SHAPES, llama_config, write_header_only, write_random_family

REPO = Path(__file__).resolve().parent.parent
METHODS = [
    ("ties", {"weight": 0.6, "density": 0.4}, {}),
    ("ties", {"weight": 0.6, "density": 0.4}, {"stable_ties": True}),
    ("dare_ties", {"weight": 0.5, "density": 0.5}, {}),
    ("breadcrumbs", {"weight": 0.5, "density": 0.8}, {"gamma": 0.05}),
    ("task_arithmetic", {"weight": 0.7}, {}),
    ("linear", {"weight": 0.3}, {}),
]


def recipe_for(paths, method, params, extra, dtype="float32"):
    return parse_recipe({"merge_method": method, "base_model": str(paths["base"]), "dtype": dtype, "seed": 3,
                         "parameters": dict(extra),
                         "models": [{"model": str(paths[k]), "parameters": dict(params)} for k in paths if k != "base"]})


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    """A bf16 Llama family (base + 3) of about 0.6M parameters: bf16 task vectors tie at thresholds, as real ones do."""
    cfg = llama_config(64, 2, intermediate=128, heads=2, kv_heads=1, vocab=512)
    return write_random_family(tmp_path_factory.mktemp("bf16"), cfg, experts=3, seed=2)


def merged(mat: Materialiser, recipe) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in mat.iter_merged(recipe)}


@pytest.mark.parametrize("method,params,extra", METHODS)
def test_every_placement_gives_todays_tensors(tiny_llamas, method, params, extra):
    """float32 checkpoints: every placement with float32 sources is today's layout bit for bit; native sources
    are too for task-vector methods, and equal the disk merge bit for bit for every method."""
    paths = {k: tiny_llamas[k] for k in ("base", "a", "b", "c")}
    recipe = recipe_for(paths, method, params, extra)
    today = merged(Materialiser(paths, "base", sources_dtype="float32"), recipe)
    disk_merge = merge_to_dict(recipe)
    for placement in ("device", "host", "disk"):
        for sdtype in ("float32", "native"):
            got = merged(Materialiser(paths, "base", sources=placement, sources_dtype=sdtype), recipe)
            same_as = today if (sdtype == "float32" and placement != "disk") or method != "linear" else disk_merge
            for name, t in same_as.items():
                assert torch.equal(got[name], t), f"{placement}/{sdtype}: {name}"
    native = merged(Materialiser(paths, "base"), recipe)
    for name, t in disk_merge.items():
        assert torch.equal(native[name], t), name


@pytest.mark.parametrize("method,params,extra", METHODS)
def test_bf16_sources_native_against_float32(bf16_family, method, params, extra):
    """bf16 checkpoints: native sources (half the memory) give today's float32-layout tensors bit for bit for
    task-vector methods (the float32 delta of two bf16 values is the same either way); for linear, within one
    float32 rounding of the float32 layout's anchor + delta (2**-23 relative)."""
    recipe = recipe_for(bf16_family, method, params, extra, dtype="bfloat16")
    f32 = merged(Materialiser(bf16_family, "base", sources_dtype="float32"), recipe)
    nat = Materialiser(bf16_family, "base")
    assert nat.resident_bytes == sum(ck.num_bytes for ck in nat.checkpoints.values())  # bf16 as on disk
    got = merged(nat, recipe)
    for name, t in f32.items():
        if method == "linear":
            torch.testing.assert_close(got[name], t, rtol=2**-22, atol=1e-9, msg=name)
        else:
            assert torch.equal(got[name], t), name


def test_stable_ties_is_a_stable_sort_window():
    """stable_ties: the kept entries are exactly a stable sort's window (ties by index), in O(n)."""
    torch.manual_seed(0)
    for n in (1000, 300_000):
        x = ((torch.randn(n) * 0.02).bfloat16().float() - (torch.randn(n) * 0.02).bfloat16().float()).abs()
        assert x.unique().numel() < 0.9 * n  # bf16 deltas tie a lot
        for lo, hi, order in ((int(0.7 * n), n, "descending"), (int(0.2 * n), int(0.9 * n), "ascending")):
            mask = rank_window_mask(x, lo, hi, order, stable=True)
            ranked = torch.sort(x, descending=order == "descending", stable=True).indices
            want = torch.zeros(n, dtype=torch.bool)
            want[ranked[n - hi:n - lo] if order == "descending" else ranked[lo:hi]] = True
            assert torch.equal(mask, want)
    d = torch.randn(5000).bfloat16().float()
    kept = magnitude(d, 0.3, stable_ties=True)
    assert int(torch.count_nonzero(kept)) == int(0.3 * 5000)


def test_stable_ties_leaves_mergekit_yaml_with_a_note(tiny_llamas):
    from evomerge.merge.api import to_mergekit

    paths = {k: tiny_llamas[k] for k in ("base", "a", "b")}
    text, notes = to_mergekit(recipe_for(paths, "ties", {"weight": 0.5, "density": 0.5}, {"stable_ties": True}))
    assert "stable_ties" not in text and "parameters" not in yaml.safe_load(text)
    assert any("stable_ties" in n and "mergekit" in n for n in notes)


def test_streaming_holds_one_merged_tensor_at_a_time(zoo_dir):
    """iter_merged into the engine: at most two merged tensors are alive at once (no staging copy), and the
    module ends up with what apply() writes."""
    from evomerge.checkpoints.hf import load_tokenizer
    from evomerge.fitness.hf import HFBackend

    paths = {k: zoo_dir / "llama" / k for k in ("base", "arith", "cipher", "reverse")}
    mat = Materialiser(paths, "base")
    recipe = recipe_for(paths, "ties", {"weight": 0.5, "density": 0.5}, {})
    backend = HFBackend(mat.build_module(), load_tokenizer(paths["base"]), batch_size=4)
    alive: list[weakref.ref] = []
    peak = 0

    def watched():
        nonlocal peak
        for name, t in mat.iter_merged(recipe):
            gc.collect()
            alive[:] = [r for r in alive if r() is not None]
            alive.append(weakref.ref(t))
            peak = max(peak, len(alive))
            yield name, t
            del t

    backend.load(watched())
    assert peak <= 2, f"{peak} merged tensors alive at once"
    n_tensors = len(mat.checkpoints["base"].names())
    assert n_tensors > 10
    expected = mat.build_module()
    mat.apply(recipe, expected)
    for (name, a), b in zip(backend.module.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_non_finite_streamed_candidate_fails_after_its_push(zoo_dir):
    """The engine receives every tensor of a streamed candidate, then the candidate fails naming the tensor."""
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import CandidateFailed, parse_objectives

    paths = {k: zoo_dir / "llama" / k for k in ("base", "arith")}
    mat = Materialiser(paths, "base")
    module = mat.build_module()
    objs = parse_objectives({"objectives": [{"builtin": "params", "direction": "minimise"}]})
    ev = Evaluator(objs, paths["base"], module=module, backend="hf")
    names = mat.checkpoints["base"].names()

    def pairs():
        for i, n in enumerate(names):
            t = mat.checkpoints["arith"].get(n).float().clone()
            if i == 1:
                t[0] = float("nan")
            yield n, t

    with pytest.raises(CandidateFailed, match=names[1]):
        ev.evaluate(pairs())
    assert torch.equal(module.state_dict()[names[-1]], mat.checkpoints["arith"].get(names[-1]).float())


# ---------------------------------------------------------------- the plan's arithmetic against allocation


def cpu_machine(memory=16 * GiB) -> Machine:
    return Machine(device="cpu", host_memory=memory, bandwidth={"device": 20e9, "h2d_pinned": 20e9, "disk": 3e9},
                   measured=())


def part(option, name) -> int:
    return next(p.bytes for p in option.parts if p.name == name)


@pytest.mark.parametrize("sdtype", ["native", "float32"])
def test_plan_counts_what_the_worker_allocates(bf16_family, sdtype):
    models = [bf16_family[k] for k in ("base", "e1", "e2", "e3")]
    plan = plan_worker(models, Workload(engine_dtype="bfloat16", sources_dtype=sdtype, methods=("ties",),
                                        batch_size=2, max_length=16), cpu_machine(), sources="device")
    opt = plan.chosen
    assert opt is not None and opt.placement == "device" and opt.rank_cache
    mat = Materialiser(bf16_family, "base", sources_dtype=sdtype)
    assert mat.resident_bytes == part(opt, "sources")
    module = mat.build_module(torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in module.parameters()) == part(opt, "engine weights")
    for k in range(2):  # rank caches: built by the first TIES candidate, what the plan budgets (orders included)
        mat.apply(recipe_for(bf16_family, "ties", {"weight": 0.5, "density": 0.3 + 0.2 * k}, {}, "bfloat16"), module)
    cached = sum(r.nbytes for r in mat.ranks.values())
    assert 0.5 * part(opt, "rank caches") <= cached <= part(opt, "rank caches"), (cached, part(opt, "rank caches"))


def test_plan_of_the_one_pass_cpu_merge(bf16_family):
    """A CPU worker's TIES with stable ties goes through merge.fused: no rank caches, a small transient and the
    sketches, which the plan budgets at least as large as the worker builds them; in mergekit's tie order on bf16
    sources the plan keeps the torch path's budget and says how to get the fast one."""
    from evomerge.merge import fused

    models = [bf16_family[k] for k in ("base", "e1", "e2", "e3")]
    load = dict(engine_dtype="bfloat16", methods=("ties",), batch_size=2, max_length=16, fused=True)
    fast = plan_worker(models, Workload(**load, stable_ties=True), cpu_machine(), sources="device").chosen
    slow = plan_worker(models, Workload(**load, stable_ties=False), cpu_machine(), sources="device")
    assert not fast.rank_cache and slow.chosen.rank_cache
    assert "one-pass" in next(p.note for p in fast.parts if p.name == "candidate transient")
    assert any("stable_ties: true" in n for n in slow.notes)
    if fused.library() is None:
        return
    mat = Materialiser(bf16_family, "base")
    module = mat.build_module(torch.bfloat16)
    mat.apply(recipe_for(bf16_family, "ties", {"weight": 0.5, "density": 0.4}, {"stable_ties": True}, "bfloat16"), module)
    built = sum(sk.nbytes for sk in mat.sketches.values() if sk is not None)
    assert len(mat.sketches) == 3 * len(mat.checkpoints["base"].names()) and not mat.ranks
    assert 0 < built <= part(fast, "threshold sketches")


def test_plan_refuses_with_part_shortfall_and_fix(bf16_family):
    models = [bf16_family[k] for k in ("base", "e1", "e2", "e3")]
    need = plan_worker(models, Workload(methods=("ties",), batch_size=2, max_length=16), cpu_machine(), "device")
    total = need.chosen.total("device")
    tight = plan_worker(models, Workload(methods=("ties",), batch_size=2, max_length=16),
                        cpu_machine(total - 1), "device")
    assert tight.chosen is None or not tight.chosen.rank_cache  # rank caches go first
    none = plan_worker(models, Workload(methods=("ties",), batch_size=64, max_length=4096), cpu_machine(GiB), "auto")
    assert none.chosen is None
    msg = none.refusal("job.yaml")
    assert msg.startswith("job.yaml: runtime:") and "short by" in msg and "batch_size" in msg


# ---------------------------------------------------------------- real shapes from header-only checkpoints


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for name, experts in (("mistral-7b", 2), ("llama-3-8b", 3), ("llama-3-70b", 2)):
        out[name] = [write_header_only(root / name / m, SHAPES[name]) for m in ["base"] + [f"e{i}" for i in range(experts)]]
    return out


def gpu(n=1, gb=80, host=512) -> Machine:
    return Machine(device="cuda", gpu_memory=gb * GiB, gpus=n, host_memory=host * GiB,
                   bandwidth={"device": 3.35e12, "h2d_pinned": 50e9, "disk": 3e9})


VLLM = Workload(backend="vllm", methods=("ties",), batch_size=64, max_length=2048)


def test_plan_names_an_unknown_family_and_mixed_dtypes(tmp_path):
    cfg = dict(SHAPES["mistral-7b"], model_type="mystery", architectures=["MysteryForCausalLM"])
    a = write_header_only(tmp_path / "a", cfg)
    b = write_header_only(tmp_path / "b", cfg, dtype=torch.float16)
    plan = plan_worker([a, b], VLLM, gpu())
    assert any("mystery" in n and "not a family" in n for n in plan.notes)
    assert any("bfloat16, float16" in n and "float32" in n for n in plan.notes)
    no_heads = {k: v for k, v in cfg.items() if k != "num_attention_heads"}
    c = write_header_only(tmp_path / "c", dict(no_heads, num_attention_heads=32))
    (c / "config.json").write_text(__import__("json").dumps(no_heads))
    with pytest.raises(PlanError, match=r"c/config.json: model_type 'mystery' gives no hidden_size and num_attention_heads"):
        plan_worker([c], VLLM, gpu())


def test_header_only_checkpoints_cost_no_disk(shapes):
    folder = shapes["llama-3-70b"][0]
    size = sum(f.stat().st_size for f in folder.iterdir())
    used = sum(f.stat().st_blocks * 512 for f in folder.iterdir())
    assert size > 130e9 and used < 50e6


def test_real_shapes_plan_as_readme_says(shapes):
    p7 = plan_worker(shapes["mistral-7b"], VLLM, gpu())
    assert p7.shapes[0].params == pytest.approx(7.24e9, rel=0.01)
    assert p7.chosen is not None and p7.chosen.placement == "device"  # 7B + 2 experts with the engine on one 80 GB GPU
    assert part(p7.chosen, "sources") == 3 * p7.shapes[0].bytes
    p8 = plan_worker(shapes["llama-3-8b"], VLLM, gpu())
    assert p8.chosen is not None and p8.chosen.placement == "host"
    p70 = plan_worker(shapes["llama-3-70b"], VLLM, gpu(8))
    assert p70.chosen is not None and p70.chosen.placement == "host"
    assert part(p70.chosen, "engine weights") == pytest.approx(70.55e9 * 2 / 8, rel=0.01)
    one = plan_worker(shapes["llama-3-70b"], VLLM, gpu(1))
    assert one.chosen is None
    assert "runtime.gpus: 4" in one.refusal() or "runtime.gpus: 8" in one.refusal()


def mistral_job(shapes, tmp_path, **runtime) -> Path:
    models = shapes["mistral-7b"]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "m7", "models": {"base": str(models[0]), "sources": {f"e{i}": str(p) for i, p in enumerate(models[1:])}},
        "search_space": "sakana_ps",
        "objectives": {"include": [str(REPO / "fitness")], "objectives": [{"task": "zoo_mix", "metric": "exact_match",
                                                                          "direction": "maximise"}]},
        "driver": {"budget": {"evaluations": 8}},
        "runtime": {"device": "cuda", "backend": "vllm", "max_length": 2048, **runtime},
        "store": str(tmp_path / "s.sqlite")}))
    return job


def test_cli_plan_prints_parts_and_refuses(shapes, tmp_path):
    job = mistral_job(shapes, tmp_path)
    cli = [sys.executable, "-m", "evomerge", "plan", str(job), "--host-memory", "512GiB"]
    ok = subprocess.run(cli + ["--gpu-memory", "80GiB"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "-> sources: device fits" in ok.stdout and "engine weights" in ok.stdout and "KV cache" in ok.stdout
    bad = subprocess.run(cli + ["--gpu-memory", "24GiB"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "short by" in bad.stderr


def test_submit_refuses_a_job_that_cannot_fit_the_stated_gpus(shapes, tmp_path):
    from evomerge.service.submit import portable_spec

    with pytest.raises(PlanError, match="short by"):
        portable_spec(mistral_job(shapes, tmp_path, gpu_memory=24, host_memory=64))
    with pytest.raises(PlanError, match="on the host"):  # a stated host memory is checked too
        portable_spec(mistral_job(shapes, tmp_path, gpu_memory=80, host_memory=0.25))
    assert portable_spec(mistral_job(shapes, tmp_path, gpu_memory=80, host_memory=512))["runtime"]["sources"] == "auto"
    portable_spec(mistral_job(shapes, tmp_path))  # sizes not stated: the cluster's run plans


def test_run_refuses_a_job_that_fits_nowhere_before_any_worker(zoo_dir, tmp_path):
    from evomerge.search.jobs import run_job
    from evomerge.store import Store

    llama = zoo_dir / "llama"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "tiny", "models": {"base": str(llama / "base"), "sources": {"arith": str(llama / "arith")}},
        "search_space": "sakana_ps",
        "objectives": {"include": [str(REPO / "fitness")], "objectives": [{"task": "zoo_mix", "metric": "exact_match",
                                                                          "direction": "maximise", "limit": 4}]},
        "driver": {"algorithm": "random", "population": 2, "budget": {"evaluations": 2}},
        "runtime": {"host_memory": 0.05}, "store": str(tmp_path / "s.sqlite")}))
    with pytest.raises(PlanError, match=r"job.yaml: runtime: the worker does not fit.*short by"):
        run_job(job)
    store = Store(tmp_path / "s.sqlite")
    assert store.job("tiny") is None
    store.close()


def test_multi_process_hand_off_writes_bounded_shards(zoo_dir, tmp_path, monkeypatch):
    """A multi-process vLLM engine gets the candidate as safetensors shards of at most SHM_SHARD_BYTES (one in
    memory at a time), with the index its loader reads; what it reads back is the candidate."""
    from evomerge.checkpoints import open_checkpoint
    from evomerge.fitness import vllm_backend

    paths = {k: zoo_dir / "llama" / k for k in ("base", "arith")}
    mat = Materialiser(paths, "base")
    recipe = recipe_for(paths, "task_arithmetic", {"weight": 0.5}, {})
    monkeypatch.setattr(vllm_backend, "SHM_SHARD_BYTES", 200_000)
    (tmp_path / "model-00000.safetensors").write_bytes(b"stale")  # the previous candidate's, replaced
    vllm_backend.VLLMBackend._write_shards(tmp_path, mat.iter_merged(recipe))
    (tmp_path / "config.json").write_text((paths["base"] / "config.json").read_text())
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 5 and all(s.stat().st_size < 200_000 + 70_000 for s in shards)
    back = open_checkpoint(tmp_path)
    for name, t in mat.iter_merged(recipe):
        assert torch.equal(back.get(name), t), name


def test_path_sources_share_the_resident_tensors(zoo_dir):
    """A data-flow path reads a folder source's layers from the worker's resident tensors (no module of its own
    loaded), and scores what a path over separately loaded modules scores."""
    import numpy as np

    from evomerge.fitness.objectives import parse_objectives
    from evomerge.merge.dataflow import DataflowRecipe, Hop
    from evomerge.merge.pathmodel import build_path_model, load_source_modules
    from evomerge.scoring import RecipeScorer

    llama = zoo_dir / "llama"
    paths = {k: llama / k for k in ("base", "arith", "cipher")}
    mat = Materialiser(paths, "base")
    objs = parse_objectives({"include": [str(REPO / "fitness")], "objectives": [
        {"task": "zoo_mix", "metric": "exact_match", "direction": "maximise", "limit": 20}]})
    scorer = RecipeScorer(objs, mat, backend="hf", batch_size=16)
    recipe = DataflowRecipe(path=(Hop("base", 0), Hop("arith", 1), Hop("arith", 2), Hop("base", 3)),
                            sources={"base": llama / "base", "arith": llama / "arith"}, embed="base", head="base")
    module = scorer._source_module("arith", recipe.sources["arith"])
    resident = {t.data_ptr() for t in mat.tensors["arith"].values()}
    assert all(p.data_ptr() in resident for p in module.parameters())
    got = scorer.evaluate(recipe)
    loaded = build_path_model(recipe, load_source_modules(recipe))
    want = scorer.evaluator.evaluate(loaded)
    assert got.items == want.items and np.isclose(got.values["zoo_mix"], want.values["zoo_mix"])
