"""`evomerge run` and `evomerge resume` as library calls: check, build the runtime, search, report.

Order matters for "a job that cannot start never spends compute": the spec is checked whole, then the runtime
is built (models resident, tasks loaded: their errors surface here), and only then is the job recorded and the
first candidate evaluated.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from evomerge.config import changed_settings
from evomerge.errors import InternalError
from evomerge.search.confirm import confirm_front
from evomerge.search.loop import Progress, Search
from evomerge.search.report import build_report, front_table, runtime_summary, write_report
from evomerge.runtime.base import Runtime, ScorerFactory
from evomerge.runtime.local import LocalRuntime
from evomerge.search.spec import JobSpec, JobSpecError, load_job
from evomerge.store import Store, StoreError
from evomerge.store.lock import WriterLock

if TYPE_CHECKING:
    from evomerge.memory import MemoryPlan
    from evomerge.runtime.scheduler import RayRuntime


@dataclass
class JobResult:
    name: str
    store: Path
    report: dict[str, Any]
    json_path: Path
    html_path: Path
    confirmed: list[int] = field(default_factory=list)  # IRT: front members scored in full after the search


def scorer_factory(spec: JobSpec) -> ScorerFactory:
    """What every worker builds its scorers with: `runtime.scorer`'s factory (else the default scorer) with the
    spec bound, so a runtime calls it with the split alone and never sees the job (the spec is plain data and
    pickles to Ray actors)."""
    from evomerge.scoring import default_scorer, load_factory

    factory = load_factory(spec.runtime.scorer) if spec.runtime.scorer else default_scorer
    return partial(factory, spec)


def local_runtime(spec: JobSpec) -> LocalRuntime:
    return LocalRuntime(scorer_factory(spec), threads=spec.runtime.threads)


def ray_runtime(spec: JobSpec, address: str | None = None, **options: Any) -> "RayRuntime":
    """A Ray runtime sized by `spec.runtime`; `options` go to `RayRuntime` (cluster, workers, start_timeout)."""
    from evomerge.runtime.scheduler import RayRuntime

    rt = spec.runtime
    kw = {"workers": rt.workers, "threads": rt.threads, "gpus": rt.gpus, "max_retries": rt.max_retries,
          "candidate_timeout": rt.candidate_timeout, **options}
    return RayRuntime(scorer_factory(spec), address=address, **kw)


def memory_plan(spec: JobSpec, address: str | None = None, gpu_memory: Any = None, host_memory: Any = None,
                measure: bool = True) -> "MemoryPlan":
    """The memory plan of one worker of this job (`evomerge plan`): the job's models (headers only), the methods and
    paths its space can produce, its engine and batch, on this machine or the sizes given (`gpu_memory`,
    `host_memory`: bytes or '80GiB'; default the job's runtime.gpu_memory / host_memory, then what is here)."""
    import math

    from evomerge.fitness.evaluator import resolve_backend
    from evomerge.memory import GiB, Machine, Workload, parse_size, plan_worker
    from evomerge.merge import fused
    from evomerge.runtime.cluster import address_from
    from evomerge.spaces.presets import build_space, space_demands

    rt = spec.runtime
    space = build_space(spec.search_space, spec.models, spec.base)
    methods, path_layers, path_sources = space_demands(space)
    ps = getattr(space, "ps", space)  # a hybrid's parameter-space half
    stable_ties = bool((getattr(ps, "parameters", None) or {}).get("stable_ties", False))
    gpu = parse_size(gpu_memory, "--gpu-memory") if gpu_memory is not None else (
        int(rt.gpu_memory * GiB) if rt.gpu_memory else None)
    host = parse_size(host_memory, "--host-memory") if host_memory is not None else (
        int(rt.host_memory * GiB) if rt.host_memory else None)
    private = address_from(address) is None  # a private Ray starts every worker on this machine
    machine = Machine.detect(rt.device, gpu_memory=gpu, host_memory=host, gpus=max(1, math.ceil(rt.gpus)),
                             workers_per_host=rt.workers if private and rt.kind != "local" else 1,
                             measure=measure)
    backend = resolve_backend(rt.backend)
    workload = Workload(backend=backend, engine_dtype=rt.dtype, sources_dtype=rt.sources_dtype,
                        batch_size=rt.batch_size, max_length=rt.max_length, methods=methods,
                        path_layers=path_layers, path_sources=path_sources, fused=fused.available(),
                        stable_ties=stable_ties, threads=max(1, int(rt.threads)))
    models = [spec.models[spec.base], *(p for k, p in spec.models.items() if k != spec.base)]
    return plan_worker(models, workload, machine, sources=rt.sources, rank_cache=rt.rank_cache)


def planned(spec: JobSpec, address: str | None = None, say: Any = None) -> JobSpec:
    """The spec the workers are built from: the memory plan run (a job that fits no placement is refused here,
    before any worker starts) and its choices written into `runtime` (sources, rank caches, the engine's memory).
    A job with its own `runtime.scorer` is handed on as it is: its memory is the plug-in's business."""
    if spec.runtime.scorer:
        return spec
    from evomerge.memory import GiB

    plan = memory_plan(spec, address, measure=False).require_fit(spec.source)  # bandwidths only time candidates
    chosen, rt = plan.chosen, spec.runtime
    if say is not None:
        say(f"memory plan: sources on {chosen.placement} ({rt.sources_dtype}), rank caches "
            f"{'on' if chosen.rank_cache else 'off'}; a worker needs {chosen.total('device') / GiB:.1f} of "
            f"{chosen.device_capacity / GiB:.1f} GiB on its device (`evomerge plan` prints every part)")
    engine = rt.engine_memory or (plan.engine_memory / GiB if plan.machine.device == "cuda" else None)
    return replace(spec, runtime=replace(rt, sources=chosen.placement, rank_cache=chosen.rank_cache,
                                         engine_memory=engine))


def check_plan_for_cluster(spec: JobSpec) -> None:
    """`evomerge submit`: the memory plan against the sizes the job states for the cluster's workers
    (`runtime.gpu_memory` per GPU for a CUDA job, `runtime.host_memory`), refusing a job that cannot fit before it
    is sent. Sizes the job does not state are the cluster's to check: its `evomerge run` plans again there."""
    rt = spec.runtime
    if rt.scorer or (rt.device.startswith("cuda") and rt.gpu_memory is None) or (
            not rt.device.startswith("cuda") and rt.host_memory is None):
        return
    if rt.host_memory is None:  # unstated: not checked here (a size no host has, in GiB like the field)
        spec = replace(spec, runtime=replace(rt, host_memory=float(1 << 30)))
    memory_plan(spec, address="cluster", measure=False).require_fit(spec.source)


def make_runtime(spec: JobSpec, address: str | None = None) -> Runtime:
    """`runtime.kind`: `local` evaluates in this process; `ray` runs `runtime.workers` Ray actors (joining
    `address`, else RAY_ADDRESS, else a private loopback Ray); `auto` (the default) is `ray` when there is more
    than one worker or a cluster to join, else `local`. The address is where a job runs, not what it searches,
    so it is not part of the stored spec: a resumed job may run elsewhere."""
    from evomerge.runtime.cluster import address_from

    address = address_from(address)
    kind = spec.runtime.kind
    if kind == "auto":
        kind = "ray" if spec.runtime.workers > 1 or address else "local"
    if kind == "local":
        if spec.runtime.candidate_timeout is not None:
            print("note: runtime.candidate_timeout is enforced on Ray workers only: the in-process runtime cannot stop "
                  "a candidate that hangs (use runtime.kind: ray)", file=sys.stderr)
        return local_runtime(spec)
    return ray_runtime(spec, address)


def run_job(path: str | Path, out: TextIO | None = None, progress: Progress | None = None,
            address: str | None = None) -> JobResult:
    spec = load_job(path)
    check_backend_here(spec, address)
    progress = progress or Progress()
    fresh = _create_new(Path(spec.store))  # this run made the file (atomically): it may remove it if refused
    try:
        store = Store(spec.store)
    except BaseException:  # refused as a store (a network filesystem, say): the empty file made here goes again
        if fresh and Path(spec.store).stat().st_size == 0 and Path(spec.store).stat().st_ino == fresh:
            Path(spec.store).unlink()
        raise
    try:
        with WriterLock(store, spec.name):  # one writer per job: a second `run` of it waits for no one
            if store.job(spec.name) is not None:
                raise StoreError(f"{spec.store}: a job named '{spec.name}' exists already; `evomerge resume {path}` "
                                 "continues it, or give the new job another name")
            runtime = make_runtime(planned(spec, address, progress.line), address)
            try:
                store.create_job(spec.name, spec.to_dict(), spec.driver.seed, objectives=objective_table(runtime),
                                 spec_yaml=spec.to_yaml())
                spec = JobSpec.from_dict(store.job(spec.name)["spec"])  # run from the stored spec, as resume does
                return _search_and_report(spec, store, runtime, out, progress)
            finally:
                runtime.close()
    except BaseException:
        if fresh:
            _remove_if_unused(store, Path(spec.store), fresh)
        raise
    finally:
        store.close()


def check_backend_here(spec: JobSpec, address: str | None) -> None:
    """Workers started on this machine (in-process, or a private Ray) need the scoring backend installed here; a
    cluster's workers (an address) bring their own. Checked before the store is touched (`plan` and `submit` plan
    for other machines and do not check)."""
    import importlib.util

    from evomerge.runtime.cluster import address_from
    from evomerge.search.spec import VLLM_MISSING, JobSpecError

    if spec.runtime.backend == "vllm" and address_from(address) is None and importlib.util.find_spec("vllm") is None:
        raise JobSpecError(f"{spec.source}: runtime.backend: {VLLM_MISSING}")


def _create_new(path: Path) -> int:
    """Create `path` as an empty file when nothing is there (O_EXCL: of two runs started together only one does);
    its inode when this call created it, else 0. A store a run created and left without a job when refused (a
    metric typo found while building the scorer) is removed again; one another process made is never touched."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as Store does
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return 0
    except OSError:
        return 0
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _remove_if_unused(store: Store, path: Path, inode: int) -> None:
    """Remove a store this run created when it holds no job and no writer (checked under SQLite's write lock, so
    no other run can record one meanwhile); anything else, or any doubt, leaves it as it is."""
    try:
        if path.stat().st_ino != inode:
            return
        store.db.execute("BEGIN IMMEDIATE")
        try:
            if store.jobs() or store.db.execute("SELECT COUNT(*) FROM writers").fetchone()[0]:
                return
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        finally:
            store.db.execute("ROLLBACK")
    except Exception:  # noqa: BLE001 - the error being raised is the one the user must see
        pass


def objective_table(runtime: Runtime) -> list[tuple[str, str]]:
    """The job's objectives with their directions as the runtime resolved them (a task's `higher_is_better`
    when the spec gives none): what export and the dashboard read, instead of guessing from losses."""
    return [(o.name, o.direction) for o in runtime.objectives.objectives]


def find_job(target: str | Path, name: str | None = None, readonly: bool = False) -> tuple[Store, JobSpec]:
    """A job from its spec file (its store and name) or from a store file (`name` needed if it holds several).
    `readonly`: the store opened read-only (export, reports), so it is never changed, not even upgraded."""
    store, stored, _ = _find_job(target, name, readonly)
    return store, stored


def _find_job(target: str | Path, name: str | None, readonly: bool) -> tuple[Store, JobSpec, JobSpec | None]:
    """`find_job`, and the spec file as it reads now (None when `target` is a store)."""
    p = Path(target)
    given = None
    if p.suffix in (".yaml", ".yml"):
        given = load_job(p)
        store_path, name = given.store, name or given.name
    else:
        store_path = p
    if not Path(store_path).is_file():
        raise StoreError(f"{store_path}: no store there (has the job been started? `evomerge run JOB.yaml` starts it)")
    if Path(store_path).stat().st_size == 0:  # opened for writing, SQLite would make it a store: leave it as it is
        raise StoreError(f"{store_path}: an empty file, not an evomerge store; give the store `evomerge run` wrote")
    store = Store(store_path, readonly=readonly)
    names = store.jobs()
    if name is None:
        if len(names) != 1:
            store.close()
            raise StoreError(f"{store_path}: holds {len(names)} jobs ({', '.join(names) or 'none'}); name one with --job")
        name = names[0]
    job = store.job(name)
    if job is None:
        store.close()
        raise StoreError(f"{store_path}: no job named '{name}' (jobs: {', '.join(names) or 'none'})")
    return store, JobSpec.from_dict(job["spec"]), given


def spec_changes(given: JobSpec, stored: JobSpec) -> list[str]:
    """The settings (by path) where a job file now differs from the job as its store keeps it."""
    return changed_settings(given.to_dict(), stored.to_dict())


def resume_job(target: str | Path, name: str | None = None, out: TextIO | None = None,
               progress: Progress | None = None, address: str | None = None) -> JobResult:
    store, spec, given = _find_job(target, name, readonly=False)
    try:
        check_backend_here(spec, address)
    except BaseException:
        store.close()
        raise
    progress = progress or Progress()
    try:
        with WriterLock(store, spec.name) as lock:  # refused while another process writes this job
            say = progress.line
            if lock.note:
                say(f"note: {lock.note}")
            if given is not None:
                changed = spec_changes(given, spec)
                if changed:
                    say(f"note: {target} differs from the job as stored ({', '.join(changed)}); resume continues "
                        "the stored job as it was started: to search with the new settings, give the job another "
                        "name and `evomerge run` it")
            if Path(spec.store).absolute().resolve() != store.path.absolute().resolve():  # a moved or copied store
                say(f"note: the store was written at {spec.store}; its reports now go beside it, to "
                    f"{store.path.absolute().parent}, never to the old place")
                spec = replace(spec, store=store.path.absolute(), report=store.path.absolute().parent)
            runtime = make_runtime(planned(spec, address, say), address)
            try:
                if store.objectives(spec.name) is None:  # a job stored before schema 3
                    store.set_objectives(spec.name, objective_table(runtime))
                return _search_and_report(spec, store, runtime, out, progress)
            finally:
                runtime.close()
    finally:
        store.close()


def _search_and_report(spec: JobSpec, store: Store, runtime: Runtime, out: TextIO | None,
                       progress: Progress) -> JobResult:
    out = out or sys.stdout
    search = Search(spec, store, runtime, progress)
    with progress.active():  # one live display through the search, the confirmation and the report's scoring
        state = search.run()
        measured = runtime_summary(spec, runtime)  # the search's own window, before the report scores anything
        try:
            if search.recorder.irt:
                progress.phase("confirming the front's picks")
            # IRT: the front's estimated picks scored in full (else a no-op)
            confirmed = confirm_front(search.recorder, state.generation)
            progress.phase(f"scoring the front and the parents on the {spec.report_split} split")
            report = build_report(search.ctx, runtime=measured)
        except InternalError as e:  # a bug while confirming or scoring the report split: the job says so, resumable
            store.set_status(spec.name, "stopped", str(e))
            raise
        progress.phase("done")
    if measured is not None:
        out.write(f"runtime: {measured['summary']}\n")
    json_path, html_path = write_report(report, Path(spec.report))
    store.set_status(spec.name, "done")
    out.write(f"\nPareto front of job '{spec.name}' ({len(report['front'])} recipes), beside the parents:\n")
    out.write(front_table(report) + "\n")
    out.write(f"\nreport: {html_path.resolve()}\n        {json_path.resolve()}\n")
    return JobResult(spec.name, spec.store, report, json_path, html_path, confirmed)


__all__ = ["JobResult", "JobSpecError", "find_job", "resume_job", "run_job"]
