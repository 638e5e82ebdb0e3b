"""A multi-node Ray cluster on this one machine, every listener on 127.0.0.1, driven over stdin/stdout.

Run as a process of its own (`python tests/ray_nodes.py`), so that the Ray it starts sees only the environment
given to it: token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(Ray's "single machine" switch: node addresses default to loopback and every listener binds 127.0.0.1). Nodes are
started with Ray's own multi-node test utility (`ray.cluster_utils.Cluster`), each a raylet of its own with its
own workers; `ray start --address` cannot do this on loopback (with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it
refuses to join a head; with =1 it rewrites 127.0.0.1 to the machine's address and binds every interface).

Protocol: one JSON object per line on stdout. First {"dashboard": url, "gcs": address, "nodes": [id, ...]} once
the head (1 CPU, with the Jobs API) and one more node (1 CPU) are up. Then, for each line read on stdin:
`kill` -> the newest non-head node's processes are killed without grace (its raylet and its workers):
{"killed": id}; `add` -> a new 1-CPU node: {"added": id}; `quit` (or end of input) -> everything is shut down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from ray.cluster_utils import Cluster

    dashboard_port, temp = int(sys.argv[1]), Path(sys.argv[2])
    made = iter(range(1, 1000))
    (temp / "ray").mkdir(exist_ok=True)  # where Ray notes the cluster's address (RAY_TMPDIR/ray)

    def node_dir() -> str:  # a temp dir (session dir) per node, as on separate machines: a node's runtime-env
        path = temp / f"n{next(made)}"  # agent cleans up working dirs in its own, which another node's driver uses
        path.mkdir()
        return str(path)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "node_ip_address": "127.0.0.1", "temp_dir": node_dir()})
    nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=node_dir())]
    say({"dashboard": f"http://127.0.0.1:{dashboard_port}", "gcs": cluster.address,
         "nodes": [cluster.head_node.node_id] + [n.node_id for n in nodes]})
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "kill":
                node = nodes.pop()
                cluster.remove_node(node, allow_graceful=False)
                say({"killed": node.node_id})
            elif command == "add":
                nodes.append(cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=node_dir()))
                say({"added": nodes[-1].node_id})
            elif command == "quit":
                break
            else:
                say({"error": f"unknown command {command!r}"})
    finally:
        cluster.shutdown()


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


if __name__ == "__main__":
    main()
