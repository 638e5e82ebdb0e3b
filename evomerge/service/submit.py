"""Jobs on a Ray cluster: `evomerge submit / jobs / status / logs / stop`, through the Ray Jobs API.

A submitted job runs `python -m evomerge.service.cli run job.yaml` on the cluster's head, in a working directory
that Ray uploads with the job: it holds only the spec, rewritten so that every relative path (models, objectives,
search space file, store, report) is absolute as resolved on the submitting machine. Those paths must therefore be
readable (models, objectives) and writable (store, report) at the same place on the cluster: a shared filesystem,
or the same layout baked into the container image (see deploy/README.md). Model weights never travel with the job.

Authentication (Ray 2.60 checks a bearer token on every Jobs API call when the head runs with RAY_AUTH_MODE=token,
its default for new clusters): we look for the token where Ray itself does, in this order, and send it in the
`Authorization` header ourselves, so the client works whatever RAY_AUTH_MODE says in this shell:
RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. `ray get-auth-token` on the head
prints it. A head without authentication simply ignores the header.

Ids and names are checked against a safe pattern before anything is sent, and the address must be a plain
http(s)://HOST[:PORT]: nothing user-typed becomes part of a URL path unchecked.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from evomerge.compat import quiet
from evomerge.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # what `ray job` reads too
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # Ray submission ids and evomerge job names
_ADDRESS = re.compile(r"^(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:[0-9]{1,5})?/?$")
PROBE_TIMEOUT = (5.0, 15.0)  # connect, read (seconds): an unreachable head fails in seconds, not minutes
SPEC_NAME = "job.yaml"  # the spec's name inside the uploaded working directory
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ServiceError(UserError, RuntimeError):
    """The Ray head cannot be reached or used as asked: says why and what to do."""


# ---------------------------------------------------------------- checks


def check_id(value: str, what: str = "job id") -> str:
    """A Ray job id (submission id) or an evomerge job name: letters, digits, '.', '_', '-', at most 100."""
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise ServiceError(f"{what} {value!r} is not valid: use letters, digits, '.', '_' and '-' (at most 100, "
                           "starting with a letter or digit)")
    return value


def check_address(address: str | None) -> str:
    """`http(s)://HOST[:PORT]` of the head's dashboard (Jobs API), trailing slash removed."""
    address = (address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS).strip()
    m = _ADDRESS.match(address)
    if not m or (m.group(3) and not 0 < int(m.group(3)[1:]) < 65536):
        raise ServiceError(f"--address {address!r}: give the head's Jobs API address as http://HOST:PORT "
                           f"(the dashboard port, 8265 by default), e.g. {DEFAULT_ADDRESS}")
    return address.rstrip("/")


PLAIN_HTTP_ENV = "EVOMERGE_ALLOW_PLAIN_HTTP_TOKEN"  # "1": send the token over http to another host all the same


def check_token_transport(address: str) -> None:
    """A bearer token over plain http can be read by anyone on the path: only to this machine, over https, or when
    told (a network the user trusts)."""
    from urllib.parse import urlsplit

    from evomerge.dashboard.server import is_loopback

    parts = urlsplit(address)
    if parts.scheme == "http" and not is_loopback(parts.hostname or "") and os.environ.get(PLAIN_HTTP_ENV) != "1":
        raise ServiceError(f"refusing to send the Ray token over plain http to {parts.hostname}: anyone on the way "
                           "can read it. Use https://, or an SSH tunnel to the head (`ssh -L 8265:127.0.0.1:8265 "
                           f"HEAD`, then --address {DEFAULT_ADDRESS}), or set {PLAIN_HTTP_ENV}=1 on a network you trust")


def find_token() -> tuple[str | None, str]:
    """(token, where it came from), looked up as Ray looks it up; (None, '') when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        text = p.read_text().strip() if p.is_file() else ""
        if not text:
            raise ServiceError(f"RAY_AUTH_TOKEN_PATH={path}: no token in that file; point it at the file holding the "
                               "head's token (`ray get-auth-token` on the head prints it)")
        return text, f"RAY_AUTH_TOKEN_PATH ({p})"
    p = Path.home() / ".ray" / "auth_token"
    if p.is_file() and p.read_text().strip():
        return p.read_text().strip(), str(p)
    return None, ""


# ---------------------------------------------------------------- the spec that travels with the job


def portable_spec(path: str | Path, check: bool = True) -> dict[str, Any]:
    """The job spec as a mapping whose paths are all absolute, so it means the same from any working directory:
    the parsed spec in its YAML form (`JobSpec.to_dict`), the form the store keeps.

    With `check`, the spec is loaded whole first (models, space, objectives, driver: the checks `evomerge run`
    makes): a job that cannot start is refused before it is sent. Without it (models only on the cluster), the
    structure, the values and the name are checked, not the files the spec names.
    """
    from evomerge.config import read_yaml
    from evomerge.search.spec import JobSpecError, parse_job

    data, p = read_yaml(path, JobSpecError, "job spec")
    if not isinstance(data, dict):
        raise JobSpecError(f"{path}: a job spec is a YAML mapping with name, models, search_space, objectives, driver, store")
    check_id(str(data.get("name", "")), f"{path}: name: job name")
    job = parse_job(data, source=str(path), base_dir=p.parent, check_paths=check)
    if check:  # the memory plan, against the worker sizes the job states (runtime.gpu_memory, host_memory)
        from evomerge.search.jobs import check_plan_for_cluster

        check_plan_for_cluster(job)
    return job.to_dict()


# ---------------------------------------------------------------- the client


@dataclass
class JobInfo:
    """What `evomerge jobs` and `evomerge status` show about one Ray job."""

    id: str
    status: str
    name: str | None  # the evomerge job name (None for jobs not submitted by evomerge)
    message: str
    entrypoint: str
    start: float | None  # seconds since the epoch
    end: float | None
    metadata: dict[str, str]
    exit_code: int | None = None

    @property
    def seconds(self) -> float | None:
        if self.start is None:
            return None
        return (self.end or time.time()) - self.start


class Jobs:
    """One Ray head's Jobs API, with errors a user can act on. Connecting checks reachability and the token."""

    def __init__(self, address: str | None = None):
        import requests

        self.address = check_address(address)
        token, self.token_source = find_token()
        if token:
            check_token_transport(self.address)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = requests.get(f"{self.address}/api/version", headers=self.headers, timeout=PROBE_TIMEOUT)
        except requests.exceptions.RequestException as e:
            raise ServiceError(f"cannot reach the Ray head at {self.address} ({type(e).__name__}): is it running and "
                               "is this its dashboard port? Start one with `ray start --head --dashboard-host=127.0.0.1`, "
                               "or give --address (default: $RAY_API_SERVER_ADDRESS, else "
                               f"{DEFAULT_ADDRESS})") from None
        self._check_auth(r.status_code)
        if r.status_code != 200:
            raise ServiceError(f"{self.address} answered {r.status_code} where a Ray head's Jobs API answers its "
                               "version: is this the head's dashboard port (8265 by default)?")
        try:
            version = r.json()
        except ValueError:
            raise ServiceError(f"{self.address} is not a Ray head's dashboard (its answer is not JSON)") from None
        if not isinstance(version, dict) or "ray_version" not in version:
            raise ServiceError(f"{self.address} is not a Ray head's dashboard (its /api/version names no Ray "
                               "version): is this the head's dashboard port (8265 by default)?")
        self.ray_version = str(version["ray_version"])
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(self.address, headers=dict(self.headers))

    def _check_auth(self, status: int) -> None:
        if status == 401:
            raise ServiceError(f"the Ray head at {self.address} requires a token: set RAY_AUTH_TOKEN, or "
                               "RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token "
                               "(`ray get-auth-token` on the head prints it)")
        if status == 403:
            raise ServiceError(f"the Ray head at {self.address} refused the token from {self.token_source}: it is not "
                               "this cluster's token (`ray get-auth-token` on the head prints the right one)")

    def _call(self, what: str, fn: Any, *args: Any, job: str | None = None, **kwargs: Any) -> Any:
        """Run a Jobs API call; translate Ray's errors (auth, missing job, lost connection) into ServiceError."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            self._check_auth(403 if "Forbidden" in str(e) else 401)
            raise
        except requests.exceptions.RequestException as e:
            raise ServiceError(f"lost the Ray head at {self.address} during {what} ({type(e).__name__})") from None
        except (RuntimeError, ValueError) as e:
            text = str(e)
            if job is not None and ("404" in text or "does not exist" in text):
                raise ServiceError(f"no job '{job}' on the Ray head at {self.address}; `evomerge jobs --address "
                                   f"{self.address}` lists the jobs there") from None
            raise ServiceError(f"{what} failed on the Ray head at {self.address}: {text}") from None

    # ------------------------------------------------------------ commands

    def submit(self, spec: dict[str, Any], source: Path, job_id: str, env: dict[str, str] | None = None) -> str:
        """Send a portable spec (see `portable_spec`) as job `job_id`; returns the Ray job id."""
        name = str(spec["name"])
        with tempfile.TemporaryDirectory(prefix="evomerge-job-") as tmp:
            (Path(tmp) / SPEC_NAME).write_text(f"# {name}: submitted from {source}; paths made absolute there\n"
                                               + yaml.safe_dump(spec, sort_keys=False))
            runtime_env: dict[str, Any] = {"working_dir": tmp, "env_vars": {**quiet.job_env(), **(env or {})}}
            metadata = {"evomerge_job": name, "evomerge_spec": str(source), "evomerge_store": str(spec.get("store", ""))}
            return self._call("submit", self.client.submit_job, entrypoint=f"python -m evomerge.service.cli run {SPEC_NAME}",
                              submission_id=job_id, runtime_env=runtime_env, metadata=metadata)

    def _info(self, details: Any) -> JobInfo:
        meta = dict(details.metadata or {})
        ms = lambda t: None if t in (None, 0) else t / 1000.0  # noqa: E731  (Ray reports milliseconds)
        return JobInfo(id=details.submission_id or details.job_id or "?", status=str(details.status.value),
                       name=meta.get("evomerge_job"), message=details.message or "", entrypoint=details.entrypoint or "",
                       start=ms(details.start_time), end=ms(details.end_time), metadata=meta,
                       exit_code=getattr(details, "driver_exit_code", None))

    def list(self, everything: bool = False) -> list[JobInfo]:
        """Jobs submitted by evomerge (every Ray job with `everything`), oldest first."""
        jobs = [self._info(d) for d in self._call("listing jobs", self.client.list_jobs)]
        jobs = [j for j in jobs if everything or j.name is not None]
        return sorted(jobs, key=lambda j: j.start or 0.0)

    def info(self, job_id: str) -> JobInfo:
        return self._info(self._call("status", self.client.get_job_info, check_id(job_id), job=job_id))

    def logs(self, job_id: str) -> str:
        return self._call("reading logs", self.client.get_job_logs, check_id(job_id), job=job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's log as it grows, until the job ends (the whole log first)."""
        import asyncio

        self.info(job_id)  # a missing job fails here, clearly
        agen = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    chunk = self._call("following logs", loop.run_until_complete, agen.__anext__(), job=job_id)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def stop(self, job_id: str, wait: float = 0.0) -> JobInfo:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace time); optionally wait for the end."""
        self._call("stop", self.client.stop_job, check_id(job_id), job=job_id)
        info = self.info(job_id)
        deadline = time.monotonic() + wait
        while info.status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            info = self.info(job_id)
        return info

    def wait(self, job_id: str, timeout: float) -> JobInfo:
        """Poll until the job ends or `timeout` seconds pass (the last state either way)."""
        deadline = time.monotonic() + timeout
        info = self.info(job_id)
        while info.status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            info = self.info(job_id)
        return info


def submit(spec_path: str | Path, address: str | None = None, job_id: str | None = None, check: bool = True,
           env: dict[str, str] | None = None) -> tuple[str, Jobs]:
    """`evomerge submit`: check the spec, the id and the variables, then connect and send. (job id, client)."""
    address = check_address(address)
    spec = portable_spec(spec_path, check=check)
    job_id = check_id(job_id) if job_id else f"evomerge-{spec['name']}-{uuid.uuid4().hex[:8]}"
    check_id(job_id)
    for key in env or {}:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ServiceError(f"--env {key!r}: not an environment variable name")
    jobs = Jobs(address)
    return jobs.submit(spec, Path(spec_path).resolve(), job_id, env), jobs


def format_jobs(jobs: list[JobInfo]) -> str:
    """A table: id, status, evomerge job name, start time, duration."""
    head = ["job id", "status", "name", "started", "duration"]
    rows = [[j.id, j.status, j.name or "-", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start)) if j.start else "-",
             f"{j.seconds:.0f} s" if j.seconds is not None else "-"] for j in jobs]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def format_status(info: JobInfo) -> str:
    lines = [f"job id:     {info.id}", f"status:     {info.status}"]
    if info.name:
        lines.append(f"name:       {info.name}")
    if info.metadata.get("evomerge_store"):
        lines.append(f"store:      {info.metadata['evomerge_store']} (on the cluster)")
    if info.start:
        lines.append(f"started:    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.start))}")
    if info.seconds is not None:
        lines.append(f"duration:   {info.seconds:.1f} s")
    if info.exit_code is not None:
        lines.append(f"exit code:  {info.exit_code}")
    if info.message:
        lines.append(f"message:    {info.message}")
    lines.append(f"entrypoint: {info.entrypoint}")
    return "\n".join(lines)
