"""Where candidates are evaluated: the interface (`base`), in process (`local`), and on Ray (worker actors, an
as-completed scheduler with fault handling, the cluster connection).

A runtime is built from a `ScorerFactory` and knows nothing of jobs or the search;
`evomerge.search.jobs.make_runtime` picks one (see `RuntimeSpec.kind`). Ray and torch are imported only when a
runtime is built, so `import evomerge` stays light.
"""

from evomerge.runtime.base import Outcome, OutcomeStream, Runtime, Scorer, ScorerFactory, run_one
from evomerge.runtime.cluster import Cluster, address_from, connect
from evomerge.runtime.local import LocalRuntime
from evomerge.runtime.scheduler import RayRuntime, WorkerStartError
from evomerge.runtime.stats import RuntimeStats

__all__ = ["Cluster", "LocalRuntime", "Outcome", "OutcomeStream", "RayRuntime", "Runtime", "RuntimeStats", "Scorer",
           "ScorerFactory", "WorkerStartError", "address_from", "connect", "run_one"]
