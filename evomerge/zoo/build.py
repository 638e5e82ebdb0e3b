"""Build the tiny model zoo: a base and skill experts per family, as offline Hugging Face folders.

Layout of `out_dir`:
    <family>/base, <family>/<skill>   model folders (config, safetensors, tokenizer, generation config)
    data/<task>/{train,fitness,test}.jsonl
    manifest.json                      cache key, settings, seeds, accuracies, build seconds

Why it is built this way: the base learns generic string tasks plus a small share of arithmetic and cipher,
then (llama) a short second stage on the same mix with more arithmetic, so it masters the cipher and has a
partial grip on arithmetic (test: arith 0.29, cipher 1.0, mix 0.64); each expert is a full fine-tune on one
skill and forgets the others (the arithmetic expert: arith 0.94, cipher 0.40, mix 0.66), so no parent solves
the `mix` target. Because the base already half-knows arithmetic, the arithmetic task vector can be scaled
down without losing arithmetic, and a simple task-arithmetic merge (arith 0.7, cipher 0.25) keeps both
skills: mix 0.81 on test, about 15 points over the best parent. Without the second stage (base arith 0.03)
every merge was a switch: one skill or the other.

The `depth` family (8 layers, zoo/depth.py) is built for data-flow paths instead: stochastic depth makes its
layers share one residual format, and a reader's first layers feed the arithmetic expert's layers.

Deterministic (seeded, one thread per process, deterministic algorithms), cached twice over (a manifest that
lists every wanted model with its current per-model key returns at once; a model folder whose per-model key
matches is reused), and built by two spawn workers, bases first (measured: 530 s on 2 busy cores; a per-model
rebuild only retrains what changed). `families=` builds some families only; the manifest keeps listing the
other families' current models, so partial builds never hide or drop what is there.

Prebuilt models: the repository commits the llama and qwen2 model folders in `zoo/` (`PREBUILT`; the depth
family's files are over 5 MB, more than the project tracks, so it is trained everywhere), and a build copies a
model from there instead of training it when the committed folder's job key is the one the current code and
settings give it. Why: training is deterministic on one machine but chaotic across CPU kinds (the same seeds on an
Intel Xeon, whose MKL and ATen take AVX-512 paths, gave an arithmetic expert at 20% instead of >= 90%), so a zoo
trained elsewhere is not the zoo the tests and the demo were calibrated on. A changed setting or training code gives
new keys, and those models are trained again (and should be committed again: `make zoo-prebuilt`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from evomerge.config import suggest
from evomerge.errors import UserError
from evomerge.zoo.depth import DepthTrain, depth_family_settings
from evomerge.zoo.tasks import ALL_TASKS, EVAL_TASKS, TaskSpec
from evomerge.zoo.train import ModelSpec, TrainSpec

ZOO_VERSION = "2"  # bump when the zoo's meaning changes; the source hash below catches code edits too


def _checkout_zoo() -> Path | None:
    """The committed zoo of the evomerge checkout this module runs from; None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root / "zoo" if (root / "pyproject.toml").is_file() and (root / "zoo").is_dir() else None


# Model folders committed with the code (see the module docstring); build_zoo's default `prebuilt`.
PREBUILT: Path | None = _checkout_zoo()
# the families whose models are committed in PREBUILT (`make zoo-prebuilt`'s PREBUILT_FAMILIES); depth's files
# are over 5 MB each, more than the project tracks
COMMITTED_FAMILIES = ("llama", "qwen2")

# Pretraining mix of the base: mostly generic string tasks, a little of each skill (a partial grip).
_SKILL_SHARE = {"arith": 0.15, "cipher": 0.10, "composed": 0.02}
_REST = 1 - sum(_SKILL_SHARE.values())
BASE_MIX = {"copy": _REST * 0.65, "reverse_short": _REST * 0.35, **_SKILL_SHARE}
# Second base stage (llama): the same mix scaled by 0.7 plus 0.3 arithmetic (arith 0.405 in all).
_STAGE2_ARITH = 0.3
BASE_MIX2 = {k: v * (1 - _STAGE2_ARITH) + (_STAGE2_ARITH if k == "arith" else 0.0) for k, v in BASE_MIX.items()}


class ZooFamilyError(UserError, ValueError):
    """`--families` names a family the zoo does not have."""


@dataclass(frozen=True)
class FamilySpec:
    model: ModelSpec
    base: TrainSpec
    experts: dict  # skill -> TrainSpec (a full fine-tune of the base on that skill)
    base2: TrainSpec | None = None  # optional second base stage, trained right after `base`
    # depth family only (zoo/depth.py): role ("base" or a skill) -> how it trains beyond its TrainSpec. Its
    # experts need not be skill experts (depth/reader scores 0 alone: it is a path's first layers).
    depth: dict | None = None

    @property
    def skills(self) -> tuple[str, ...]:
        return tuple(self.experts)


def _expert(skill: str, steps: int, lr: float, batch_size: int, seed: int) -> TrainSpec:
    return TrainSpec(steps=steps, lr=lr, batch_size=batch_size, warmup=30, weight_decay=0.0, seed=seed, task_weights={skill: 1.0})


def default_families() -> dict[str, FamilySpec]:
    base = TrainSpec(steps=1500, lr=1.5e-3, batch_size=32, warmup=50, weight_decay=0.01, seed=1, task_weights=BASE_MIX)
    base2 = TrainSpec(steps=300, lr=6e-4, batch_size=64, warmup=30, weight_decay=0.01, seed=5, task_weights=BASE_MIX2)
    experts = {
        "arith": _expert("arith", 600, 6e-4, 64, 10),
        "cipher": _expert("cipher", 400, 6e-4, 32, 11),
        "reverse": _expert("reverse", 600, 1e-3, 32, 12),
    }
    return {
        "llama": FamilySpec(ModelSpec(family="llama"), base, experts, base2),
        # qwen2's arithmetic "clicks" later than llama's with these seeds: give it more steps.
        "qwen2": FamilySpec(
            ModelSpec(family="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
            base,
            {"arith": _expert("arith", 1600, 6e-4, 64, 10), "cipher": experts["cipher"]},  # no second base stage
        ),
        # 8 layers trained with stochastic depth, so data-flow paths across its models work (zoo/depth.py).
        "depth": _depth_family(),
    }


def _depth_family() -> FamilySpec:
    train, depth = depth_family_settings()
    return FamilySpec(ModelSpec(family="llama", num_hidden_layers=8), train["base"],
                      {r: t for r, t in train.items() if r != "base"}, depth=depth)


def select_families(spec: "ZooSpec", families: list[str] | tuple[str, ...] | str | None) -> "ZooSpec":
    """The zoo spec restricted to `families` (names, or one comma-separated string); None: every family."""
    if families is None:
        return spec
    names = [f.strip() for f in families.split(",")] if isinstance(families, str) else list(families)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in spec.families]
    known = ", ".join(spec.families)
    if unknown:
        raise ZooFamilyError(f"--families: unknown zoo family {unknown[0]!r}.{suggest(unknown[0], spec.families, list_known=False)} "
                             f"Families: {known}.")
    if not names:
        raise ZooFamilyError(f"--families: no family named; give some of: {known} (or leave it out: every family)")
    return ZooSpec(tasks=spec.tasks, families={n: spec.families[n] for n in spec.families if n in names},
                   init_seed=spec.init_seed)


@dataclass(frozen=True)
class ZooSpec:
    tasks: TaskSpec = field(default_factory=TaskSpec)
    families: dict = field(default_factory=default_families)
    init_seed: int = 0

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks.to_dict(),
            "families": {
                k: {
                    "model": v.model.to_dict(),
                    "base": v.base.to_dict(),
                    **({"base2": v.base2.to_dict()} if v.base2 is not None else {}),
                    "experts": {s: t.to_dict() for s, t in v.experts.items()},
                    **({"depth": {r: d.to_dict() for r, d in v.depth.items()}} if v.depth else {}),
                }
                for k, v in self.families.items()
            },
            "init_seed": self.init_seed,
            "base_mix_note": "reverse_short = reverse train items with answers of at most 4 characters",
        }


def _code_hash() -> str:
    h = hashlib.sha256()
    for name in ("tasks.py", "tokenizer.py", "train.py"):  # build.py's settings enter the key as data
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def _depth_code_hash() -> str:
    """zoo/depth.py's hash: it keys the depth family's models only, so editing it rebuilds nothing else."""
    from evomerge.zoo.depth import code_hash_bytes

    return hashlib.sha256(code_hash_bytes()).hexdigest()[:16]


def cache_key(spec: ZooSpec) -> str:
    """The key of a whole (possibly partial) zoo; the manifest records it, `is_built` checks per-model keys."""
    blob = {"zoo_version": ZOO_VERSION, "code": _code_hash(), "spec": spec.to_dict()}
    if any(fs.depth for fs in spec.families.values()):
        blob["depth_code"] = _depth_code_hash()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def job_key(spec: ZooSpec, fam: str, role: str) -> str:
    """Per-model cache key: its own settings, its parent's key, the task data and the training code."""
    fs: FamilySpec = spec.families[fam]
    tspec = fs.base if role == "base" else fs.experts[role]
    blob = {
        "zoo_version": ZOO_VERSION,
        "code": _code_hash(),
        "tasks": spec.tasks.to_dict(),
        "model": fs.model.to_dict(),
        "train": tspec.to_dict(),
        "init_seed": spec.init_seed,
        "parent": None if role == "base" else job_key(spec, fam, "base"),
    }
    if role == "base" and fs.base2 is not None:
        blob["train2"] = fs.base2.to_dict()
    if fs.depth:  # only the depth family's keys hold these, so llama/qwen2 keys are what they always were
        blob["depth"] = fs.depth[role].to_dict()
        blob["depth_code"] = _depth_code_hash()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def model_names(spec: ZooSpec) -> list[str]:
    return [f"{fam}/{role}" for fam, fs in spec.families.items() for role in ("base",) + fs.skills]


def _train_data(task_spec: TaskSpec) -> tuple[dict, dict]:
    from evomerge.zoo.tasks import generate_all

    data = generate_all(task_spec)
    train = {t: d["train"] for t, d in data.items()}
    train["reverse_short"] = [it for it in train["reverse"] if len(it["answer"]) <= 4]
    return data, train


def _run_job(job: dict) -> dict:
    """Worker: train one model (base from scratch, expert from its saved base), save it, score it."""
    import torch  # noqa: F401  (imported in the worker: spawn starts clean)

    from transformers.utils import logging as hf_logging

    from evomerge.zoo import train as ztrain

    hf_logging.disable_progress_bar()
    ztrain.set_deterministic(1)
    t0 = time.time()
    task_spec = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["tasks"].items()})
    data, train = _train_data(task_spec)
    model_spec = ModelSpec(**job["model"])
    tspec = TrainSpec(**job["train"])
    if job["parent"] is None:
        model = ztrain.make_model(model_spec, job["init_seed"])
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(job["parent"], dtype=torch.float32, attn_implementation="eager")
    if job.get("depth"):
        from evomerge.zoo.depth import train_depth

        stats = train_depth(model, train, tspec, DepthTrain.from_dict(job["depth"]), task_spec)
    else:
        stats = ztrain.train_model(model, train, tspec)
    if job.get("train2"):
        stats2 = ztrain.train_model(model, train, TrainSpec(**job["train2"]))
        stats = {"seconds": round(stats["seconds"] + stats2["seconds"], 1), "final_loss": stats2["final_loss"],
                 "stage1_final_loss": stats["final_loss"]}
    acc = {split: {t: ztrain.score(model, data[t][split]) for t in EVAL_TASKS} for split in ("fitness", "test")}
    result = {"name": job["name"], "train": stats, "accuracy": acc, "seconds": round(time.time() - t0, 1),
              "built_on": built_on()}
    meta = {"parent": job["parent_name"], "model": job["model"], "train_spec": job["train"], "job_key": job["job_key"], **result}
    if job.get("train2"):
        meta["train_spec2"] = job["train2"]
    if job.get("depth"):
        meta["depth_spec"] = job["depth"]
    _write_folder(Path(job["out"]), lambda tmp: ztrain.save_model(model, tmp, meta))
    return result


def _write_folder(out: Path, write) -> None:
    """`write(tmp)` fills a temporary folder beside `out`, which then replaces `out`: an interrupted training or
    copy leaves nothing that looks built."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _copy_prebuilt(job: dict, prebuilt: Path, say) -> dict | None:
    """Copy `job`'s model from the prebuilt folder when it was built from exactly this job; else None (train it).

    Written through `_write_folder`, like a trained model.
    """
    src = Path(prebuilt) / job["name"]
    if not src.is_dir():
        return None
    result = _cached_result({**job, "out": str(src)})
    if result is None:
        say(f"{job['name']}: the prebuilt model in {src} is not this job's (its job key differs: settings or training "
            "code changed), training it instead; commit the new one with `make zoo-prebuilt`")
        return None
    _write_folder(Path(job["out"]), lambda tmp: shutil.copytree(src, tmp))
    return result


def built_on() -> dict:
    """The machine that trained a model: what decides which CPU kernels (and so which zoo) its training got."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _cached_result(job: dict) -> dict | None:
    """A model folder built earlier from exactly this job (same settings, parent, code) is reused as is."""
    try:
        meta = json.loads((Path(job["out"]) / "zoo_model.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("job_key") != job["job_key"] or not (Path(job["out"]) / "model.safetensors").exists():
        return None
    return {k: meta[k] for k in ("name", "train", "accuracy", "seconds", "built_on") if k in meta}


def load_manifest(out_dir: Path) -> dict | None:
    p = Path(out_dir) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _job_keys(spec: ZooSpec) -> dict[str, str]:
    return {f"{fam}/{role}": job_key(spec, fam, role) for fam, fs in spec.families.items() for role in ("base",) + fs.skills}


def is_built(out_dir: Path, spec: ZooSpec | None = None, families=None) -> bool:
    """Every model of `spec` (restricted to `families`) is in the manifest with its current job key, and on disk.

    Per-model, not per-zoo: a manifest written by a partial build (`--families llama`) lists only what it built
    (and what it kept), so a later full build sees the missing families and builds them (reusing the rest).
    """
    spec = select_families(spec or ZooSpec(), families)
    man = load_manifest(out_dir)
    if not man or man.get("zoo_version") != ZOO_VERSION:
        return False
    models = man.get("models", {})
    return all(n in models and _entry_key(Path(out_dir), n, models[n]) == k
               and (Path(out_dir) / n / "model.safetensors").exists() for n, k in _job_keys(spec).items())


def _entry_key(out_dir: Path, name: str, entry: dict) -> str | None:
    """A manifest entry's job key; manifests written before entries listed it: the model folder's own record."""
    if "job_key" in entry:
        return entry["job_key"]
    try:
        return json.loads((out_dir / name / "zoo_model.json").read_text()).get("job_key")
    except (OSError, ValueError):
        return None


def build_zoo(out_dir: Path, force: bool = False, progress: bool = True, spec: ZooSpec | None = None, workers: int = 2,
              families=None, prebuilt: Path | None = PREBUILT) -> dict:
    """Build (or reuse) the zoo in `out_dir`, every family or only `families`; returns the manifest.

    The manifest lists the models built now plus those of other families that an earlier build left there and
    whose job keys still hold (so `--families depth` adds the depth models to a full zoo's manifest).
    `prebuilt`: a folder of model folders (default: the checkout's committed `zoo/`) to copy a model from when its
    job key matches, instead of training it; None trains every model not already in `out_dir`. `force` retrains
    every model, ignoring both.
    """
    full = spec or ZooSpec()
    spec = select_families(full, families)
    out_dir = Path(out_dir)
    key = cache_key(spec)
    if not force and is_built(out_dir, spec):
        return load_manifest(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per folder: a second caller waits, then finds it built
        if not force and is_built(out_dir, spec):
            return load_manifest(out_dir)
        return _build(out_dir, spec, key, progress, workers, force, full, None if force else prebuilt)


def _build(out_dir: Path, spec: ZooSpec, key: str, progress: bool, workers: int, force: bool, full: ZooSpec,
           prebuilt: Path | None) -> dict:
    t0 = time.time()

    def say(msg: str) -> None:
        if progress:
            print(f"[zoo {time.time() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    kept = _kept_models(out_dir, spec, full)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    from evomerge.zoo.tasks import write_data

    data, _ = _train_data(spec.tasks)
    write_data(out_dir / "data", data, tasks=ALL_TASKS)
    how = f"copied from {prebuilt} where current, else trained" if prebuilt is not None else "trained"
    say(f"data written to {out_dir / 'data'}; {len(model_names(spec))} models to build ({how}; "
        f"{workers} training workers; models already in {out_dir} with current keys are kept)")

    def job(fam: str, role: str) -> dict:
        fs: FamilySpec = spec.families[fam]
        if role == "base":
            tspec, parent = fs.base, None
        else:
            tspec, parent = fs.experts[role], "base"
        train2 = fs.base2.to_dict() if role == "base" and fs.base2 is not None else None
        return {
            "job_key": job_key(spec, fam, role),
            "name": f"{fam}/{role}",
            "tasks": spec.tasks.to_dict(),
            "model": fs.model.to_dict(),
            "train": tspec.to_dict(),
            "train2": train2,
            "init_seed": spec.init_seed,
            "parent": str(out_dir / fam / parent) if parent else None,
            "parent_name": f"{fam}/{parent}" if parent else None,
            "out": str(out_dir / fam / role),
            "key": key,
            **({"depth": fs.depth[role].to_dict()} if fs.depth else {}),
        }

    # Bases first (one per family, in parallel), then experts in family order (the first family has priority).
    ready = [job(fam, "base") for fam in spec.families]
    results: dict[str, dict] = {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        running: dict = {}

        def finish(r: dict, how: str = "trained") -> None:
            results[r["name"]] = {**r, "source": how}
            test = " ".join(f"{t} {a:.2f}" for t, a in r["accuracy"]["test"].items())
            done = {"trained": f"trained in {r['seconds']:.0f}s", "cached": "cached",
                    "prebuilt": f"copied from {prebuilt}"}[how]
            say(f"{r['name']} {done} (test: {test})")
            fam, role = r["name"].split("/")
            if role == "base":
                ready.extend(job(fam, s) for s in spec.families[fam].skills)
                order = list(spec.families)
                ready.sort(key=lambda x: order.index(x["name"].split("/")[0]))

        while ready or running:
            while ready and len(running) < workers:
                j = ready.pop(0)
                if not force and (r := _cached_result(j)) is not None:
                    finish(r, "cached")
                    continue
                if prebuilt is not None and (r := _copy_prebuilt(j, prebuilt, say)) is not None:
                    finish(r, "prebuilt")
                    continue
                running[pool.submit(_run_job, j)] = j
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                running.pop(fut)
                finish(fut.result())

    import tokenizers
    import torch
    import transformers

    models = {
        n: {"path": n, "parent": (n.split("/")[0] + "/base") if not n.endswith("/base") else None,
            "job_key": job_key(spec, *n.split("/")), **results[n]}
        for n in model_names(spec)
    }
    # What the manifest describes: the families built now and those whose models it keeps (all current in `full`).
    kept_families = {f for f in full.families if f not in spec.families
                     and all(n in kept for n in model_names(select_families(full, [f])))}  # whole families only
    listed = select_families(full, [f for f in full.families if f in spec.families or f in kept_families])
    manifest = {
        "cache_key": cache_key(listed),
        "families": list(listed.families),
        "zoo_version": ZOO_VERSION,
        "code_hash": _code_hash(),
        "settings": listed.to_dict(),
        "seeds": {
            "tasks": listed.tasks.seed,
            "init": listed.init_seed,
            **{f"{fam}/base": fs.base.seed for fam, fs in listed.families.items()},
            **{f"{fam}/{s}": t.seed for fam, fs in listed.families.items() for s, t in fs.experts.items()},
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "models": {n: {**kept, **models}[n] for n in model_names(listed)},
        "build_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"zoo built in {manifest['build_seconds']:.0f}s -> {out_dir}")
    return manifest


def _kept_models(out_dir: Path, spec: ZooSpec, full: ZooSpec) -> dict:
    """Manifest entries of models outside `spec` that an earlier build made and that are still current.

    Current: the model folder's own record (`zoo_model.json`) has the job key `full` (the zoo `spec` is a part of)
    gives that model now, and the folder holds the model. Read from the folders, not the old manifest: a build
    interrupted after removing the manifest must not make the next partial build forget the other families.
    """
    entries = (load_manifest(out_dir) or {}).get("models", {})
    kept = {}
    for name, key in _job_keys(full).items():
        if name.split("/")[0] in spec.families:
            continue
        result = _cached_result({"out": str(out_dir / name), "job_key": key})
        if result is None:
            continue
        entry = entries.get(name) or {
            "path": name, "parent": None if name.endswith("/base") else name.split("/")[0] + "/base", **result}
        kept[name] = {**entry, "job_key": key}
    return kept