"""The Ray runtime: worker actors, an as-completed scheduler with fault handling, and the cluster connection.

`evomerge.search.jobs.make_runtime` picks it (see `RuntimeSpec.kind`). Ray itself is imported only when a
runtime is built, so `import evomerge` stays light.
"""

from evomerge.runtime.cluster import Cluster, address_from, connect
from evomerge.runtime.scheduler import RayRuntime, WorkerStartError
from evomerge.runtime.stats import RuntimeStats

__all__ = ["Cluster", "RayRuntime", "RuntimeStats", "WorkerStartError", "address_from", "connect"]
