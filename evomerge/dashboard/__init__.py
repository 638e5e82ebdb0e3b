"""`evomerge dashboard`: a read-only web view of a store (jobs, fronts, candidates), updated live while a job runs.

`data.py` turns store rows into the JSON the page draws; `server.py` serves it with the standard library's
HTTP server, plus the page's own files and Plotly's JS from the installed plotly package (no CDN).
"""

from evomerge.dashboard.server import DashboardError, make_server, serve

__all__ = ["DashboardError", "make_server", "serve"]
