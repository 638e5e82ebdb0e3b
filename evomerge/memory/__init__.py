"""Memory plans: what one worker of a search holds, part by part, where it can hold it, and how fast a candidate
is materialised there, computed from config files and safetensors headers alone (no tensor is read).

`plan_worker(models, workload, machine)` is the arithmetic; `evomerge plan JOB.yaml` prints it, and `evomerge run`
and `submit` run it before any worker starts, refusing a job that fits no placement with the part, the shortfall
and what to change. The scorer builds its `Materialiser` with the plan's choices (where the sources live, rank
caches on or off, how much of each GPU the scoring engine may take).
"""

from evomerge.memory.plan import (
    GiB,
    Machine,
    MemoryPlan,
    ModelShape,
    Option,
    Part,
    PlanError,
    Workload,
    parse_size,
    plan_worker,
    read_shape,
)

__all__ = ["GiB", "Machine", "MemoryPlan", "ModelShape", "Option", "Part", "PlanError", "Workload", "parse_size",
           "plan_worker", "read_shape"]
