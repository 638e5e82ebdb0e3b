"""Where the Ray workers run: a private Ray started for this process, or an existing cluster joined by address.

Private mode (no address): Ray is started inside this process's session, bound to 127.0.0.1, with no dashboard
unless asked, and shut down by `close()`. Everything Ray reads at import time is set before `import ray`:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes GCS, raylet and workers listen on 127.0.0.1 only (Ray's own
  "single machine" switch; without it they listen on every interface);
- authentication is token mode, deliberately: a random token made for this process is kept in its environment
  (`RAY_AUTH_TOKEN`, inherited by the Ray processes it starts) and never written to `~/.ray`. Other users of the
  machine cannot drive the cluster, and nothing is left behind. A token you set yourself
  (`RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH`, or `RAY_AUTH_MODE`) is respected.

Cluster mode (`--address`, or `RAY_ADDRESS`): nothing is changed in the environment; the cluster's own
authentication applies (for a token cluster: `RAY_AUTH_MODE=token` and its token, as `ray` commands need).

If Ray is already initialised in this process (a test fixture, a service), it is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

from evomerge.compat import ray as compat_ray


def address_from(cli_address: str | None = None) -> str | None:
    """The cluster to join: the command line's `--address`, else `RAY_ADDRESS`, else None (private Ray)."""
    return cli_address or os.environ.get("RAY_ADDRESS") or None


_SET_BY_US: list[str] = []  # the environment variables a private Ray set, removed again when it closes


def _private_environment() -> None:
    """Loopback-only listeners and a per-process token; must run before `import ray` for the first one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:  # imported earlier: Ray read the switch then, so set what it read too
        compat_ray.set_loopback_only()
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        _SET_BY_US[:] = ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN"]
        if "ray" in sys.modules:  # Ray cached its auth settings at import: make it read them again, as it does itself
            compat_ray.reload_auth_settings()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private run reports nothing anywhere


@dataclass
class Cluster:
    """A connection to Ray; `owned` when this process opened it: `close()` then disconnects (and stops a private Ray)."""

    address: str
    owned: bool
    private: bool

    def resources(self) -> dict[str, float]:
        import ray

        return dict(ray.cluster_resources())

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False
            if self.private:  # its token must not leak into a later connection from this process
                for name in _SET_BY_US:
                    os.environ.pop(name, None)
                _SET_BY_US.clear()


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> Cluster:
    """Join `address` ("host:port", "ray://host:port" or "auto"), or start a private loopback Ray with `num_cpus`
    CPU slots (default: the machine's cores) when `address` is None."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a Ray this process runs already: as it is
        import ray

        return Cluster(ray.get_runtime_context().gcs_address, owned=False, private=address is None)
    if address is None:
        _private_environment()
    import ray

    if ray.is_initialized():
        return Cluster(ray.get_runtime_context().gcs_address, owned=False, private=address is None)
    quiet = {"log_to_driver": True, "logging_level": "WARNING"}
    with _keep_sigterm_handler():
        if address is None:
            ctx = ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **quiet)
            return Cluster(ctx.address_info["gcs_address"], owned=True, private=True)
        ray.init(address=address, **quiet)
        return Cluster(address, owned=True, private=False)


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Ray's core worker installs its own C++ SIGTERM handler when it starts (it logs and re-raises, killing the
    driver on the spot): the process's Python handler (the CLI's, which stops a search as resumable) is put back,
    so `evomerge stop`, a Ray job stop or a pod shutdown ends the job `interrupted`, not dead and `running`."""
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        yield
    finally:
        if main_thread and callable(before):
            signal.signal(signal.SIGTERM, before)
