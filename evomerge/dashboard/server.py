"""The dashboard's HTTP server: standard library only (`http.server.ThreadingHTTPServer`), read-only, local.

Why the standard library: the server answers a handful of GET routes for one person's browser; a web framework
would add a dependency and nothing the page needs.

Routes (GET and HEAD only; every other method is refused with 405):
- `/` the page; `/static/NAME` its files (a fixed list read at start: no path from a request reaches the
  filesystem) and `/static/plotly.min.js` from the installed plotly package (no CDN);
- `/api/jobs`, `/api/poll` (what the page polls every 2 s while a job runs);
- `/api/job?name=J[&since=CURSOR]`: the job view; with the `cursor` of an earlier answer, only what changed since;
- `/api/candidates?job=J&offset=&limit=&sort=&status=&origin=&gen_min=&gen_max=&min.OBJ=&max.OBJ=`: one page of
  the candidates table, filtered and sorted here;
- `/api/candidate?job=J&id=N`; `/api/diff?a=J:N&b=J:N` (two candidates' recipes compared);
  `/api/fronts?job=A&job=B` (several jobs' fronts, for one plot).
Each API request opens its own read-only connection: SQLite's WAL mode lets the search write meanwhile. What a
request decoded stays in the server's cache (`cache.py`) for the next one; nothing is ever written to the store.

Security: the listener binds 127.0.0.1 unless told otherwise, and then checks the Host header (a web page cannot
reach it through DNS rebinding). On any other address a token is required (`--token`, or
EVOMERGE_DASHBOARD_TOKEN, else one is generated and printed); it is checked on every request, given once as
`?token=` (then kept in an HttpOnly cookie), or as `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import hmac
import http.cookies
import importlib.resources
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from evomerge.dashboard import data
from evomerge.dashboard.cache import Cache
from evomerge.store import Store, StoreError
from evomerge.errors import UserError

TOKEN_ENV = "EVOMERGE_DASHBOARD_TOKEN"
COOKIE = "evomerge_dashboard_token"
STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# Plotly injects its own <style> elements and sets inline styles: styles need 'unsafe-inline'; scripts do not.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
ID = re.compile(r"[0-9]{1,18}")  # a candidate id: ASCII digits only (no superscripts), and it fits SQLite's int64


class DashboardError(UserError, ValueError):
    """The dashboard cannot start as asked (address, token, store): says what to do."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


MIN_TOKEN = 16  # characters: a token guessable in an afternoon protects nothing


def read_token_file(path: str | Path) -> str:
    """A token kept in a file (its first line): out of the process list, unlike `--token`."""
    p = Path(path).expanduser()
    try:
        text = p.read_text().strip().splitlines()
    except OSError as e:
        raise DashboardError(f"--token-file {p}: cannot read it ({e.strerror}); give a file holding the token") from None
    if not text or not text[0].strip():
        raise DashboardError(f"--token-file {p}: the file is empty; write the token on its first line")
    return text[0].strip()


def resolve_token(host: str, token: str | None, env: dict[str, str] | None = None) -> tuple[str | None, bool]:
    """The token to require, and whether it was generated here (so the caller prints it). Loopback: the given
    token if any, else none. Any other address: the given one, the environment's, or a fresh one."""
    env = os.environ if env is None else env
    token = token or env.get(TOKEN_ENV) or None
    if token is not None and len(token) < MIN_TOKEN:
        raise DashboardError(f"the dashboard token is shorter than {MIN_TOKEN} characters; give a longer one "
                             f"({TOKEN_ENV} or --token-file), or leave it out to have one generated")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise DashboardError("the dashboard token may hold only letters, digits and . _ ~ - (it travels in URLs and "
                             "a cookie); choose another --token, or leave it out to have one generated")
    if token or is_loopback(host):
        return token, False
    return secrets.token_urlsafe(24), True


def find_store(store: str | Path | None, root: Path | None = None) -> Path:
    """`--store` as given, or the one store under ./out (the example jobs write there)."""
    if store is not None:
        return Path(store)
    root = root or Path.cwd()
    found = sorted(p for p in (root / "out").glob("**/*.sqlite") if p.is_file()) if (root / "out").is_dir() else []
    if len(found) == 1:
        return found[0].relative_to(root) if found[0].is_relative_to(root) else found[0]
    where = ", ".join(str(p) for p in found[:8]) or "none"
    raise DashboardError(f"give the store to show with --store PATH (found {len(found)} stores under "
                         f"{root / 'out'}: {where})")


def check_store(path: Path) -> None:
    """Open the store once before listening: a missing file or one that is not ours fails here, clearly."""
    if not path.exists():
        raise DashboardError(f"{path}: no such store; give the store file of a job (its `store:` field) with --store, "
                             "or start a job first with `evomerge run JOB.yaml`")
    if path.is_dir():
        raise DashboardError(f"{path}: is a folder; give the store file inside it (e.g. {path}/store.sqlite)")
    Store(path, readonly=True).close()  # StoreError: not an evomerge store, newer schema, ...


def _plotly_js() -> Path:
    try:
        path = Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))
    except ModuleNotFoundError:
        raise DashboardError("plotly is not installed; `pip install plotly` (it is one of evomerge's "
                             "dependencies)") from None
    if not path.is_file():
        raise DashboardError(f"{path}: missing from the installed plotly package; reinstall plotly")
    return path


class DashboardServer(ThreadingHTTPServer):
    """Holds what every request needs: the store path, the token, the fixed list of files it may serve."""

    daemon_threads = True

    def __init__(self, store: Path, host: str, port: int, token: str | None = None, quiet: bool = True):
        self.store_path = store
        self.host = host
        self.token = token
        self.quiet = quiet
        self.check_host = token is None and is_loopback(host)
        self.files: dict[str, Path] = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}
        self.files["plotly.min.js"] = _plotly_js()
        self.cache = Cache(str(store))
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), Handler)

    def warm(self) -> threading.Thread:
        """Decode every job's candidates once, in the background: the page's first answer is then a warm one
        (a 10,000-candidate job takes about a second to summarise)."""
        def run() -> None:
            try:
                store = Store(self.store_path, readonly=True)
            except StoreError:
                return
            try:
                for name in store.jobs():
                    data.job_detail(store, name, self.cache)
            except Exception:  # noqa: BLE001 - warming is an optimisation: a request reports what is wrong
                pass
            finally:
                store.close()

        t = threading.Thread(target=run, name="dashboard-warm", daemon=True)
        t.start()
        return t

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"


class Handler(BaseHTTPRequestHandler):
    """GET routes; every write method answers 405 (the dashboard never changes a store)."""

    server: DashboardServer
    server_version = "evomerge-dashboard"
    sys_version = ""
    timeout = 20  # seconds a client may stall mid-request before its socket (and thread) is let go

    # ------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:  # never log a token that came in the URL
            super().log_message(format, *(re.sub(r"token=[^&\s]*", "token=***", a) if isinstance(a, str) else a
                                          for a in args))

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = data.encode(obj) if isinstance(obj, dict) else json.dumps(obj, allow_nan=False, default=str).encode()
        self._send(status, body, "application/json", {"Cache-Control": "no-store"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _refuse_write(self) -> None:
        self._send(405, b"read-only: the dashboard answers GET and HEAD only\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD", "Connection": "close"})
        self.close_connection = True

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_write  # noqa: N815

    # ------------------------------------------------------------ checks

    def _host_ok(self) -> bool:
        """On loopback without a token, only requests addressed to this machine (defeats DNS rebinding)."""
        if not self.server.check_host:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOCAL_HOSTS or is_loopback(name)

    def _token_from_request(self, query: dict[str, list[str]]) -> tuple[str | None, bool]:
        """(token offered, whether it came in the URL: then the page sets a cookie and drops it from the URL)."""
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            return auth[len("Bearer "):].strip(), False
        if "token" in query:
            return query["token"][0], True
        cookie = http.cookies.SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie") or "")
        except http.cookies.CookieError:
            return None, False
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

    # ------------------------------------------------------------ routes

    def do_HEAD(self) -> None:  # noqa: N802 - the base class's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._host_ok():
            self._send(403, b"forbidden: unexpected Host header\n", "text/plain; charset=utf-8")
            return
        set_cookie = {}
        if self.server.token is not None:
            offered, in_url = self._token_from_request(query)
            if offered is None or not hmac.compare_digest(offered.encode(), self.server.token.encode()):
                self._send(401, b"token required: open the URL `evomerge dashboard` printed (it ends in ?token=...)\n",
                           "text/plain; charset=utf-8", {"WWW-Authenticate": "Bearer"})
                return
            if in_url:
                set_cookie = {"Set-Cookie": f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"}
        try:
            if url.path in ("/", "/index.html"):
                self._static("index.html", set_cookie)
            elif url.path.startswith("/static/"):
                self._static(url.path[len("/static/"):], set_cookie)
            elif url.path.startswith("/api/"):
                self._api(url.path[len("/api/"):], query)
            else:
                self._error(404, f"no such page: {url.path}")
        except StoreError as e:
            self._error(503, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _static(self, name: str, headers: dict[str, str]) -> None:
        path = self.server.files.get(name)  # only names listed at start: '../x', '%2e%2e/x', '/etc/x' are not
        if path is None:
            self._error(404, f"no such file: {name!r}")
            return
        cache = "no-cache" if path.suffix == ".html" else "max-age=300"
        self._send(200, path.read_bytes(), CONTENT_TYPES[path.suffix], {"Cache-Control": cache, **headers})

    def _api(self, route: str, query: dict[str, list[str]]) -> None:
        def arg(name: str) -> str | None:
            return query[name][0] if name in query else None

        store = Store(self.server.store_path, readonly=True)
        try:
            if route == "jobs":
                self._json(200, {"store": str(self.server.store_path), "jobs": data.jobs(store)})
            elif route == "poll":
                self._json(200, {"jobs": data.signature(store)})
            elif route == "job":
                name = arg("name")
                detail = None if name is None else data.job_detail(store, name, self.server.cache, arg("since"))
                if detail is None:
                    self._error(404, f"no job named {name!r} in {self.server.store_path}")
                else:
                    self._json(200, detail)
            elif route == "candidates":
                name = arg("job")
                try:
                    page = None if name is None else data.candidates_page(store, name, query, self.server.cache)
                except data.QueryError as e:
                    self._error(400, str(e))
                    return
                if page is None:
                    self._error(404, f"no job named {name!r} in {self.server.store_path}")
                else:
                    self._json(200, page)
            elif route == "candidate":
                job, cid = arg("job"), arg("id")
                if job is None or cid is None or not ID.fullmatch(cid):
                    self._error(400, "give ?job=NAME&id=NUMBER")
                    return
                detail = data.candidate_detail(store, job, int(cid), self.server.cache)
                if detail is None:
                    self._error(404, f"no candidate {cid} in job {job!r}")
                else:
                    self._json(200, detail)
            elif route == "diff":
                sides = [(arg(k) or "").rpartition(":") for k in ("a", "b")]
                if any(not job or not ID.fullmatch(cid) for job, _, cid in sides):
                    self._error(400, "give ?a=JOB:ID&b=JOB:ID (two candidates, of one job or two)")
                    return
                (ja, _, ia), (jb, _, ib) = sides
                diff = data.candidates_diff(store, ja, int(ia), jb, int(ib))
                if diff is None:
                    self._error(404, f"no candidate {ia} in job {ja!r} or no candidate {ib} in job {jb!r}")
                else:
                    self._json(200, diff)
            elif route == "fronts":
                names = query.get("job", [])
                if not 1 <= len(names) <= 8:
                    self._error(400, "give ?job=A&job=B (one to eight jobs of this store)")
                    return
                out = data.fronts(store, names, self.server.cache)
                if out is None:
                    self._error(404, f"no job named one of {names!r} in {self.server.store_path}")
                else:
                    self._json(200, out)
            else:
                self._error(404, f"no such API route: /api/{route}")
        finally:
            store.close()


def make_server(store: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                quiet: bool = True, env: dict[str, str] | None = None) -> tuple[DashboardServer, bool]:
    """Check the store and the address, then bind (port 0: any free port). Returns the server and whether its
    token was generated here."""
    path = find_store(store)
    check_store(path)
    token, generated = resolve_token(host, token, env)
    try:
        server = DashboardServer(path, host, port, token, quiet=quiet)
    except OSError as e:
        raise DashboardError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                             "(0 picks a free one)") from None
    return server, generated


def serve(store: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          out: TextIO | None = None, quiet: bool = True) -> None:
    """Run until Ctrl-C, printing the URL (with the token when there is one)."""
    out = out or sys.stdout
    server, generated = make_server(store, host, port, token, quiet=quiet)
    server.warm()
    url = server.url + (f"?token={server.token}" if server.token else "")
    if not is_loopback(host):
        out.write(f"note: listening on {host}, reachable from other machines; every request needs the token"
                  + (" (generated: set --token or EVOMERGE_DASHBOARD_TOKEN to choose one)" if generated else "") + "\n")
    out.write(f"dashboard of {server.store_path} (read-only): {url}\nCtrl-C stops it.\n")
    out.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
