"""How a dispatcher should reach Ray, measured on the namespace test bed (docs/DEPLOY.md):

(a) join as a resource-less node (``ray start --address=ray-head:6379 --num-cpus=0
    --num-gpus=0 --memory=0``), then ``ray.init(address="ray-head:6379")``;
(b) Ray Client, ``ray.init("ray://ray-head:10001")``.

Each repetition runs in a fresh container on a host of its own (no Ray state left from the
previous one), with token authentication on, and reports the time to connect and the median
and 95th percentile of a trivial actor method call to an actor on a worker node.

    .venv/bin/python -m tests.cluster.measure_connect [repetitions]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from tests.cluster.bed import VENV_BIN, Cluster

PROBE = r"""
import json, subprocess, sys, time
mode = sys.argv[1]
import ray
t0 = time.perf_counter()
if mode == "node":
    from metaserve.service.ray_cluster import node_join_command
    subprocess.run(node_join_command("ray-head:6379"), check=True, capture_output=True)
    t_node = time.perf_counter() - t0
    ray.init(address="ray-head:6379", log_to_driver=False)
else:
    t_node = 0.0
    ray.init(address="ray://ray-head:10001", log_to_driver=False)
t_connect = time.perf_counter() - t0

@ray.remote(num_cpus=0.01)
class Echo:
    def ping(self, x):
        return x

actor = Echo.remote()
ray.get(actor.ping.remote(0), timeout=120)
calls = []
for i in range(200):
    t = time.perf_counter()
    ray.get(actor.ping.remote(i))
    calls.append((time.perf_counter() - t) * 1000)
calls.sort()
print(json.dumps({"node_s": t_node, "connect_s": t_connect,
                  "call_ms_median": calls[len(calls) // 2],
                  "call_ms_p95": calls[int(len(calls) * 0.95)]}))
"""


def main(repetitions: int = 3) -> None:
    cluster = Cluster()
    try:
        cluster.topology.open()
        cluster.start_ray_head()
        cluster.start_ray_worker("ray-worker-1")
        cluster.wait_nodes(2, "head and one worker", "ray-worker-1")
        results: dict[str, list[dict]] = {"node": [], "client": []}
        hosts = {"node": "dispatcher-1", "client": "dispatcher-2"}
        for _ in range(repetitions):
            for mode, host in hosts.items():
                result = cluster[host].exec([str(VENV_BIN / "python"), "-c", PROBE, mode],
                                            cluster.service_env(host), timeout=300)
                results[mode].append(json.loads(result.stdout.strip().splitlines()[-1]))
                cluster[host].kill()  # the next repetition starts on a fresh host
                time.sleep(1)
        for mode, runs in results.items():
            print(f"{mode:6s} " + "  ".join(
                f"{key}={statistics.median(run[key] for run in runs):.3f}"
                f" [{', '.join(f'{run[key]:.3f}' for run in runs)}]" for key in runs[0]))
        print(json.dumps(results))
    finally:
        cluster.down()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
