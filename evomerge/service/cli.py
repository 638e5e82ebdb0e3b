"""The `evomerge` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from evomerge.compat.quiet import quiet_third_party
from evomerge.errors import InternalError, Terminated, UserError
from evomerge.merge.export import DEFAULT_SHARD_BYTES, parse_size
from evomerge.service.submit import ServiceError

ADDRESS_HELP = ("Ray cluster to run the workers on (host:port of its head, or 'auto'); default: RAY_ADDRESS if set, "
                "else a private Ray on 127.0.0.1 when the job has more than one worker (runtime.kind: auto)")
RAY_JOBS_COMMANDS = ("submit", "jobs", "status", "logs", "stop")  # quieted: Ray's job SDK logs every upload


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.api import load_recipe, write_recipe

    recipe = load_recipe(args.recipe)
    start = time.perf_counter()
    notes: list[str] = []
    out = write_recipe(recipe, Path(args.output), force=args.force, max_shard_bytes=parse_size(args.shard_size),
                       device=args.device, progress=not args.quiet, inputs=[args.recipe], notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evomerge.fitness.evaluator import default_backend

    hf = (default_backend() if args.backend == "auto" else args.backend) == "hf"
    with quiet_third_party(bars=hf):  # not vLLM's bars: its offline runner divides by the bar's time
        return _score_and_print(args)


def _score_and_print(args: argparse.Namespace) -> int:
    import json

    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import CandidateFailed, load_objectives

    from evomerge.checkpoints.refs import resolve_model_ref

    folder = resolve_model_ref(args.model)  # a folder, a Hub id[@revision] or MODEL+ADAPTER, before any work
    objectives = load_objectives(args.objectives, split=args.split)
    start = time.perf_counter()
    evaluator = Evaluator(objectives, folder, backend=args.backend, batch_size=args.batch_size)
    try:
        result = evaluator.evaluate()
    except CandidateFailed as e:
        print(f"candidate failed: {e.reason}", file=sys.stderr)
        return 1
    finally:
        evaluator.close()
    if args.json:
        out = {"model": str(args.model), "backend": evaluator.backend_name, "split": evaluator.objectives.split,
               "objectives": {o.name: {"kind": o.kind, "task": o.task, "metric": evaluator.suite.refs[o.name].metric if o.name in evaluator.suite.refs else None,
                                       "direction": o.direction, "value": result.values[o.name]}
                              for o in evaluator.objectives.objectives},
               **result.to_dict(with_items=True)}
        print(json.dumps(out, indent=1))
        return 0
    width = max(len(n) for n in result.values)
    for o in evaluator.objectives.objectives:
        items = result.items.get(o.name)
        count = f"  ({len(items)} items)" if items else ""
        print(f"{o.name:<{width}}  {result.values[o.name]:.6g}  [{o.direction}]{count}")
    print(f"scored in {result.seconds:.2f} s ({evaluator.backend_name} backend, split {evaluator.objectives.split}; "
          f"{time.perf_counter() - start:.1f} s with setup)")
    return 0


@contextlib.contextmanager
def search_env() -> Iterator[None]:
    """Around a search in the foreground: third-party output quieted, SIGTERM interrupts like Ctrl-C (the job stays
    resumable). Both are undone on exit, so a caller in a longer-lived process (the demo, tests calling `main`)
    keeps its own SIGTERM handler and progress bars afterwards."""
    def interrupt(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
    try:
        with quiet_third_party():
            yield
    finally:
        if main_thread:  # None: a handler not installed from Python; the default is the closest one can restore
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def cmd_run(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import run_job

    try:
        with search_env():
            run_job(args.job, address=args.address)
    except KeyboardInterrupt:
        print(f"interrupted: the job is resumable with `evomerge resume {args.job}`", file=sys.stderr)
        return 130
    return 0


def cmd_import_evolve(args: argparse.Namespace) -> int:
    from evomerge.search.evolve_import import convert_evolve, write_job

    out = Path(args.output)
    imported = convert_evolve(args.config, pareto=args.pareto, name=args.name, store=args.store, include=args.include,
                              split=args.split, report_split=args.report_split, budget=args.budget,
                              population=args.population, output_dir=out.resolve().parent)
    write_job(imported, out, args.config, force=args.force)
    for note in imported.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}: run it with `evomerge run {out}`")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from evomerge.search.jobs import memory_plan
    from evomerge.search.spec import load_job

    spec = load_job(args.job)
    rt = spec.runtime
    if args.gpus_per_worker is not None:
        spec = replace(spec, runtime=replace(rt, gpus=float(args.gpus_per_worker)))
    if args.gpu_memory is not None and not rt.device.startswith("cuda"):
        spec = replace(spec, runtime=replace(spec.runtime, device="cuda"))  # planning for a GPU from anywhere
    if args.sources:
        spec = replace(spec, runtime=replace(spec.runtime, sources=args.sources))
    plan = memory_plan(spec, args.address, gpu_memory=args.gpu_memory, host_memory=args.host_memory)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan.render(str(args.job)))
    plan.require_fit(str(args.job))  # printed above; refused (exit 2) when nothing fits
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import resume_job

    try:
        with search_env():
            resume_job(args.job, args.name, address=args.address)
    except KeyboardInterrupt:
        print(f"interrupted: the job is resumable with `evomerge resume {args.job}" + (f" --job {args.name}" if args.name else "") + "`", file=sys.stderr)
        return 130
    return 0


def _port(text: str) -> int:
    """A TCP port for argparse: 0-65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {value}")
    return value


def cmd_dashboard(args: argparse.Namespace) -> int:
    from evomerge.dashboard import serve
    from evomerge.dashboard.server import DashboardError, read_token_file

    if args.token and args.token_file:
        raise DashboardError("give the token once: --token-file or --token (or EVOMERGE_DASHBOARD_TOKEN)")
    if args.token:
        print("warning: --token is visible to every user of this machine (the process list); prefer "
              "EVOMERGE_DASHBOARD_TOKEN or --token-file", file=sys.stderr)
    token = read_token_file(args.token_file) if args.token_file else args.token
    try:
        serve(args.store, host=args.host, port=args.port, token=token, quiet=not args.verbose)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from evomerge.service.submit import submit

    if any("=" not in kv for kv in args.env or []):
        raise ServiceError("--env takes NAME=VALUE")
    env = dict(kv.split("=", 1) for kv in args.env) if args.env else None
    job_id, jobs = submit(args.job, args.address, job_id=args.id, check=not args.no_check, env=env)
    print(job_id)
    print(f"submitted to {jobs.address}; follow it with `evomerge logs {job_id} --follow --address {jobs.address}`",
          file=sys.stderr)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from evomerge.service.submit import Jobs, format_jobs

    listed = Jobs(args.address).list(everything=args.all)
    print(format_jobs(listed) if listed else "no evomerge jobs on this head" + ("" if args.all else " (--all lists every Ray job)"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from evomerge.service.submit import Jobs, format_status

    print(format_status(Jobs(args.address).info(args.job_id)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from evomerge.service.submit import Jobs

    jobs = Jobs(args.address)
    if not args.follow:
        sys.stdout.write(jobs.logs(args.job_id))
        return 0
    for chunk in jobs.follow(args.job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from evomerge.service.submit import TERMINAL, Jobs

    info = Jobs(args.address).stop(args.job_id, wait=args.wait)
    done = info.status in TERMINAL
    print(f"{info.id}: {info.status}" + ("" if done else " (stop requested; Ray sends SIGTERM, then SIGKILL)"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.service.export import export

    path, selected, notes = export(args.job, args.output, fmt=args.format, name=args.name, candidate=args.candidate,
                                   best=args.best, knee=args.knee, force=args.force,
                                   max_shard_bytes=parse_size(args.shard_size), device=args.device,
                                   progress=not args.quiet)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {path}: candidate {selected.row.id} ({selected.why}) as {args.format}")
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import PREBUILT, build_zoo

    if args.prebuilt and not Path(args.prebuilt).is_dir():
        raise UserError(f"--prebuilt: {args.prebuilt} is not a folder; give the folder of committed zoo models "
                        "(<family>/<role>/ folders) or leave it out")
    prebuilt = None if args.no_prebuilt else Path(args.prebuilt) if args.prebuilt else PREBUILT
    manifest = build_zoo(Path(args.dir), force=args.force, progress=not args.quiet, families=args.families,
                         workers=args.workers, prebuilt=prebuilt)
    print(f"zoo ready in {args.dir} ({len(manifest.get('models', {}))} models)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Search for merge recipes that combine fine-tunes of one base model into better models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "merge",
        help="merge models as a recipe says and write a Hugging Face checkpoint",
        description="Merge models as a recipe says and write a checkpoint that transformers and vLLM load with no "
        "custom code: sharded safetensors, config, tokenizer and a model card holding the recipe. A recipe is "
        "either mergekit-format (merge_method: linear, task_arithmetic, ties, dare_ties, dare_linear, della, "
        "breadcrumbs, slerp, ...) or a data-flow path (`dataflow:` with hops of model, layer and scale; scales "
        "are folded into the weights). The folder is written under a temporary name and renamed when complete.",
    )
    p.add_argument("recipe", help="recipe YAML (relative model paths resolve against its folder, then the working directory)")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--shard-size", default=f"{DEFAULT_SHARD_BYTES // 1024**3}GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda[:N]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    e = sub.add_parser(
        "eval",
        help="score a checkpoint on the objectives of a YAML file",
        description="Score a checkpoint on objectives declared in YAML: lm-eval tasks (registered names, or "
        "task YAMLs in the file's `include` folders) with a metric and a direction, and built-ins "
        "(perplexity, params, layers, latency). Prints one value per objective; --json adds per-item results.",
    )
    e.add_argument("model", help="a model folder (Hugging Face format, safetensors), a Hub id (org/name, "
                   "org/name@revision: from the Hugging Face cache, downloaded when allowed) or MODEL+ADAPTER "
                   "(a peft LoRA adapter applied to MODEL)")
    e.add_argument("--objectives", required=True, help="objectives YAML (see fitness/objectives.yaml)")
    e.add_argument("--split", default=None, help="split to score for every task objective (default: the file's, normally 'fitness'; 'test' for reports)")
    e.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"], help="auto: vLLM on a GPU machine where installed, else transformers")
    e.add_argument("--batch-size", type=int, default=64, help="transformers backend batch size (default 64)")
    e.add_argument("--json", action="store_true", help="print JSON with per-item results")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "run",
        help="run a merge-recipe search described by a job spec",
        description="Run an evolutionary search for merge recipes: the job spec names the models, the search space "
        "(search_spaces/), the objectives, the driver (random, cmaes, nsga2, nsga3, smsemoa) with its budget and seed, "
        "the runtime and the store. Every candidate goes into the store (SQLite), a checkpoint after every generation. "
        "Ends with the Pareto front scored on the test split beside the parents, and an HTML + JSON report.",
    )
    r.add_argument("job", help="job spec YAML (example: search_spaces/jobs/zoo_mix.yaml)")
    r.add_argument("--address", default=None, help=ADDRESS_HELP)
    r.set_defaults(func=cmd_run)

    ie = sub.add_parser(
        "import-evolve",
        help="turn a mergekit-evolve config into an evomerge job spec",
        description="Turn a mergekit-evolve config (genome: models, merge_method, base_model, layer_granularity, "
        "normalize, allow_negative_weights, smooth, filters; tasks with weight and metric) into the equivalent job "
        "spec: a parameter-space search with one layer group per layer_granularity layers, the filters as modules "
        "(plus '*' for the other tensors), the method and its normalize, weights in [0, 1] (or [-1, 1] with "
        "allow_negative_weights). The weighted task sum becomes one `sum` objective searched with cmaes, as "
        "mergekit-evolve does; --pareto makes each task its own objective, searched with nsga2. Every difference "
        "is printed as a note and kept as a comment in the job file (smooth, bf16 merging, unbounded genes, ...); "
        "unknown keys, a missing model or a method not searched here (slerp) are refused. The job is checked as "
        "`evomerge run` checks it before it is written. Example: evomerge import-evolve evolve.yml -o job.yaml "
        "--include fitness/ && evomerge run job.yaml",
    )
    ie.add_argument("config", help="the mergekit-evolve YAML (model paths resolve against its folder, then the working directory)")
    ie.add_argument("-o", "--output", required=True, help="the job spec YAML to write")
    ie.add_argument("--pareto", action="store_true", help="one objective per task (nsga2) instead of their weighted sum (cmaes)")
    ie.add_argument("--include", action="append", default=[], metavar="DIR",
                    help="a folder of lm-eval task YAMLs (mergekit-evolve's --task-search-path); repeatable")
    ie.add_argument("--split", default="fitness", help="the split the search scores (default: fitness)")
    ie.add_argument("--report-split", default="test", help="the held-out split the final report scores (default: test)")
    ie.add_argument("--budget", type=int, default=100, help="evaluations (mergekit-evolve's --max-fevals; default 100)")
    ie.add_argument("--population", type=int, default=None, help="candidates per generation (default 8; 12 with --pareto)")
    ie.add_argument("--name", default=None, help="the job's name (default: the config file's name)")
    ie.add_argument("--store", default=None, help="the SQLite store (default: OUTPUT's folder/out/NAME/store.sqlite)")
    ie.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    ie.set_defaults(func=cmd_import_evolve)

    pl = sub.add_parser(
        "plan",
        help="print a job's memory plan per worker: what it holds where, which placements fit, which one runs",
        description="Print the memory plan of one worker of a job, from config files and safetensors headers only (no "
        "weights are read, so a 70B job plans in a second): the bytes of each part (the resident sources, rank "
        "caches, the scoring engine's weights, KV cache and activations for runtime.batch_size x runtime.max_length "
        "tokens, the per-candidate transient, the runtime itself), for each placement of the sources (device: on "
        "the GPU; host: CPU memory, streamed to the GPU tensor by tensor; disk: memory-mapped checkpoints), which "
        "fit, which one `evomerge run` picks (runtime.sources: auto takes the fastest that fits) and the least "
        "time a candidate's materialisation can take there. `evomerge run` and `submit` run this same plan before "
        "any worker starts and refuse a job that fits nowhere, naming the part, the shortfall and what to change. "
        "Exit status 2 when nothing fits. Plan for a machine you are not on with --gpu-memory/--host-memory.",
    )
    pl.add_argument("job", help="job spec YAML")
    pl.add_argument("--gpu-memory", default=None, help="memory of each GPU, e.g. 80GiB (implies runtime.device cuda; "
                    "default: runtime.gpu_memory, else what the GPU here reports)")
    pl.add_argument("--host-memory", default=None, help="host memory a worker may use, e.g. 512GiB (default: "
                    "runtime.host_memory, else this machine's available memory)")
    pl.add_argument("--gpus-per-worker", type=int, default=None, help="GPUs per worker (vLLM tensor parallel; "
                    "default runtime.gpus)")
    pl.add_argument("--sources", default=None, choices=["auto", "device", "host", "disk"],
                    help="plan with this placement instead of runtime.sources")
    pl.add_argument("--address", default=None, help="the Ray cluster the job will run on (workers then do not share "
                    "this host's memory)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser(
        "resume",
        help="continue a job from its last checkpoint (after a crash, kill or Ctrl-C)",
        description="Continue a job from its last checkpoint. A resumed job ends with the same candidates and values "
        "as one never interrupted (for evaluation budgets). JOB is the job spec YAML or the store file.",
    )
    s.add_argument("job", help="the job spec YAML, or the store file")
    s.add_argument("--job", dest="name", default=None, help="job name, when the store holds several")
    s.add_argument("--address", default=None, help=ADDRESS_HELP)
    s.set_defaults(func=cmd_resume)

    d = sub.add_parser(
        "dashboard",
        help="a read-only web page of a store's jobs, fronts and candidates, live while a job runs",
        description="Serve a read-only web page of a store: the jobs with their progress and budget, each job's "
        "Pareto front and progress curves, and per candidate its recipe, per-layer weights and densities (or its "
        "layer path), scores beside the parents, lineage and export command. Plotly is served from the installed "
        "package (no CDN). Listens on 127.0.0.1 unless --host says otherwise; on any other address every request "
        "needs a token of 16 characters or more (EVOMERGE_DASHBOARD_TOKEN, --token-file, or one generated and "
        "printed; --token works too but shows in the process list).",
    )
    d.add_argument("--store", default=None, help="the store file (SQLite) of a job (default: the one store under ./out)")
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    d.add_argument("--token-file", default=None, help="a file whose first line is the token every request must "
                   "carry (required off 127.0.0.1; default: EVOMERGE_DASHBOARD_TOKEN, else generated)")
    d.add_argument("--token", default=None, help="the token itself (visible in the process list: prefer "
                   "--token-file or EVOMERGE_DASHBOARD_TOKEN)")
    d.add_argument("-v", "--verbose", action="store_true", help="log every request")
    d.set_defaults(func=cmd_dashboard)

    addr_help = ("the Ray head's Jobs API, http://HOST:PORT (its dashboard port); default: RAY_API_SERVER_ADDRESS, "
                 "else http://127.0.0.1:8265. A head with token authentication gets the token from RAY_AUTH_TOKEN, "
                 "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    j = sub.add_parser(
        "submit",
        help="submit a job spec to a Ray cluster (Ray Jobs API); prints the job id",
        description="Submit a search to a Ray cluster through the Ray Jobs API. The spec travels with the job (in "
        "its uploaded working directory) with every relative path made absolute as resolved here, so model folders, "
        "objectives and the store's folder must be at those paths on the cluster (shared storage or the same image "
        "layout). The spec is checked here first, as `evomerge run` checks it (--no-check when the models exist only "
        "on the cluster). The cluster runs `python -m evomerge.service.cli run job.yaml` with evomerge installed.",
    )
    j.add_argument("job", help="job spec YAML")
    j.add_argument("--address", default=None, help=addr_help)
    j.add_argument("--id", default=None, help="Ray job id to use (default: evomerge-NAME-RANDOM)")
    j.add_argument("--no-check", action="store_true", help="check only the spec's structure here (models on the cluster)")
    j.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment variable for the job (repeatable)")
    j.set_defaults(func=cmd_submit)

    ls = sub.add_parser("jobs", help="list the jobs submitted to a Ray cluster",
                        description="List the evomerge jobs on a Ray head: id, status, job name, start, duration.")
    ls.add_argument("--address", default=None, help=addr_help)
    ls.add_argument("--all", action="store_true", help="every Ray job, not only evomerge's")
    ls.set_defaults(func=cmd_jobs)

    for command, func, text in (("status", cmd_status, "show a submitted job's state"),
                                ("logs", cmd_logs, "print a submitted job's output"),
                                ("stop", cmd_stop, "stop a submitted job (its store stays resumable)")):
        c = sub.add_parser(command, help=text, description=text[0].upper() + text[1:] + " (a Ray job id, from "
                           "`evomerge submit` or `evomerge jobs`).")
        c.add_argument("job_id", help="Ray job id")
        c.add_argument("--address", default=None, help=addr_help)
        if command == "logs":
            c.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
        if command == "stop":
            c.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for the end")
        c.set_defaults(func=func)

    x = sub.add_parser(
        "export",
        help="write one candidate of a job as a recipe, a mergekit config or a merged model",
        description="Export one candidate of a job's store: --candidate ID, --best OBJECTIVE (best evaluated "
        "candidate by that objective, its direction respected) or --knee (the front's knee: the candidate closest "
        "to the ideal point once every objective's losses are scaled to [0, 1] over the front). --format recipe: "
        "evomerge recipe YAML; mergekit: a config `mergekit-yaml` accepts (when mergekit can express the recipe, "
        "else the reason); model: a merged checkpoint with a model card (objectives on the fitness and test "
        "splits, recipe, lineage). Written under a temporary name beside OUT and renamed; OUT is never replaced "
        "without --force, and a symbolic link as OUT is refused.",
    )
    x.add_argument("job", help="the job spec YAML, or the store file")
    x.add_argument("--job", dest="name", default=None, help="job name, when the store holds several")
    pick = x.add_mutually_exclusive_group(required=True)
    pick.add_argument("--candidate", type=int, default=None, metavar="ID", help="candidate id")
    pick.add_argument("--best", default=None, metavar="OBJECTIVE",
                      help="the best evaluated candidate by this objective (an IRT estimate counts at the worse end "
                           "of its 2-sd interval)")
    pick.add_argument("--knee", action="store_true",
                      help="the knee of the Pareto front (IRT estimates counted the same way)")
    x.add_argument("--format", default="recipe", choices=["recipe", "mergekit", "model"], help="what to write (default recipe)")
    x.add_argument("-o", "--output", required=True, help="file (recipe, mergekit) or folder (model) to write")
    x.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    x.add_argument("--shard-size", default=f"{DEFAULT_SHARD_BYTES // 1024**3}GB", help="model: largest shard (default 2GB)")
    x.add_argument("--device", default="cpu", help="model: where to compute (cpu or cuda[:N])")
    x.add_argument("-q", "--quiet", action="store_true", help="model: no progress bar")
    x.set_defaults(func=cmd_export)

    zoo = sub.add_parser("zoo", help="the tiny demo model zoo").add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    b = zoo.add_parser(
        "build",
        help="build the tiny model zoo: copy the committed models, train what is missing (cached)",
        description="Build the tiny model zoo: Llama- and Qwen2-style base models and experts fine-tuned on synthetic "
        "skills, an 8-layer `depth` family built for data-flow paths, plus the task data they are tested on. Each "
        "model is copied from the checkout's committed zoo/ when it was built from exactly the current settings and "
        "training code (its job key matches), and trained deterministically on CPU otherwise. Training is "
        "deterministic on one machine, not across CPU kinds: --no-prebuilt trains a zoo of this machine's own, which "
        "may not meet the zoo's design (README, 'The tiny model zoo').",
    )
    b.add_argument("dir", nargs="?", default=".cache/zoo", help="output folder (default .cache/zoo)")
    b.add_argument("--force", action="store_true",
                   help="retrain every model, even if the output folder or the committed zoo holds it")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--prebuilt", default=None, metavar="DIR",
                   help="folder of prebuilt model folders to copy from (default: the checkout's zoo/ when there is one)")
    src.add_argument("--no-prebuilt", action="store_true", help="copy nothing: train every model the output folder lacks")
    b.add_argument("--families", default=None, metavar="NAMES",
                   help="comma-separated families to build, e.g. llama,depth (default: every family: llama, qwen2, "
                   "depth); models of other families already there stay and stay listed")
    b.add_argument("--workers", type=int, default=2, help="training processes (default 2; 1 trains one model at a time)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_zoo_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with quiet_third_party(bars=False) if args.command in RAY_JOBS_COMMANDS else contextlib.nullcontext():
            return args.func(args)
    except UserError as e:  # bad input: its message names the file, field and fix; a traceback would bury it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InternalError as e:  # a bug: the message carries the failing frames; the job is stopped, resumable
        print(f"internal error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
