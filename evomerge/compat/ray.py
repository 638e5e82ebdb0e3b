"""Ray's import-time settings, changed after `import ray` (private Ray 2.x names).

Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` into `ray._private.ray_constants.ENABLE_RAY_CLUSTER` and its token
authentication settings into a C++ cache (`ray._raylet.Config`, `AuthenticationTokenLoader`) when it is
imported. A private Ray started later in the same process (after a test or a library imported ray) must make
Ray see the values set in the environment since: that is what these two functions do, each returning the
function that undoes it. Both are no-ops when Ray is not imported yet (it will read the environment then), and
when the installed Ray predates the setting (older Rays have no such switch or no token authentication).
"""

from __future__ import annotations

import sys
from typing import Callable


def _noop() -> None:
    pass


def set_loopback_only() -> Callable[[], None]:
    """Ray's "single machine" switch (listeners on 127.0.0.1 only), for a Ray imported before it was set."""
    if "ray" not in sys.modules:
        return _noop
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # Ray < 2.x switch: nothing read at import to update
        return _noop
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        ray_constants.ENABLE_RAY_CLUSTER = previous

    return restore


def reload_auth_settings() -> Callable[[], None]:
    """Make an imported Ray read its authentication settings (RAY_AUTH_MODE, RAY_AUTH_TOKEN...) again, as Ray's own
    `ray.init` path does; the returned function reloads them once more (after the caller restored the variables)."""
    if "ray" not in sys.modules:
        return _noop
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication caches nothing to reload
        return _noop

    def reload() -> None:
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    reload()
    return reload
