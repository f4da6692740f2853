"""`python -m pipelines.cluster_check`: prove a Ray cluster runs our code before a long job does.

Runs one task per node that imports the project and reports the node's resources; exits 1 when
the cluster has fewer nodes or CPUs than `expect_nodes` / `expect_cpus`. With `RAY_ADDRESS` set it
is submitted through the Jobs API like every other job, so it also checks the runtime env.
`paths=[...]` reports, per node, which of those paths exist there: a local path a job is handed
must exist on every node that reads it (weights baked into the image), and a path of the machine
you submit from exists on none.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field

import ray

from lipforcing.config import ClusterConfig
from pipelines.jobs import run_job
from pipelines.ray_cluster import in_submitted_job, init_ray


@dataclass
class ClusterCheckConfig:
    profile: str = "tiny"
    expect_nodes: int = 1
    expect_cpus: float = 1.0
    paths: list[str] = field(default_factory=list)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@ray.remote(num_cpus=0)
def _node_report(paths: list[str]) -> dict:
    import lipforcing  # noqa: F401  (the project must import on every node)

    present = [path for path in paths if os.path.exists(path)]
    return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(), "present": present}


def check(config: ClusterCheckConfig) -> int:
    init_ray()
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    reports = ray.get(
        [
            _node_report.options(
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node_id=n["NodeID"], soft=False
                )
            ).remote(config.paths)
            for n in nodes
        ]
    )
    print(f"submitted job: {in_submitted_job()}")
    print(f"nodes alive: {len(nodes)}  cpus: {resources.get('CPU', 0)}  gpus: {resources.get('GPU', 0)}")
    for report in reports:
        seen = f"; present: {', '.join(report['present']) or 'none'} of {len(config.paths)} paths" if config.paths else ""
        print(f"  node {report['node_id'][:12]} on {report['host']}: imports ok{seen}")
    ok = len(nodes) >= config.expect_nodes and resources.get("CPU", 0) >= config.expect_cpus
    print("cluster check: " + ("ok" if ok else f"FAILED (expected >= {config.expect_nodes} nodes, >= {config.expect_cpus} CPUs)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_job("pipelines.cluster_check", ClusterCheckConfig, check))
