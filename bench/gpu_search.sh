#!/usr/bin/env bash
# The demo's search on one CUDA GPU, in-process (no Ray): its TIES space, IRT-reduced fitness, then the
# best merge for zoo_mix exported on the GPU and scored on the test split. Needs a built zoo (.cache/zoo) and a
# CUDA torch with evomerge's dependencies importable (PYTHONPATH=. works from a checkout).
#   bash bench/gpu_search.sh [OUT]        (default OUT: /tmp/gpu)
set -euo pipefail
out=${1:-/tmp/gpu}
mkdir -p "$out"
python3 - "$out" <<'PY'
import sys
from pathlib import Path

import yaml

from evomerge.service.demo import demo_spec

out = Path(sys.argv[1]).absolute()
spec = demo_spec(Path(".cache/zoo").absolute(), out, 1, 72)
spec["runtime"].update(kind="local", device="cuda", batch_size=256)
spec["name"] = "gpu-demo"
(out / "job.yaml").write_text(yaml.safe_dump(spec))
PY
python3 -m evomerge.service.cli run "$out/job.yaml"
python3 -m evomerge.service.cli export "$out/job.yaml" --best zoo_mix --format model -o "$out/best" --device cuda -q --force
python3 -m evomerge.service.cli eval "$out/best" --objectives fitness/objectives.yaml --split test
