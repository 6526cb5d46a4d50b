"""docker-compose.yml, run: see tests/cluster/bed.py for the hosts and what is substituted."""

from __future__ import annotations

import json

from tests.cluster.bed import VENV_BIN, Cluster


def test_a_host_without_a_raylet_cannot_drive_ray(cluster: Cluster):
    """The hosts are isolated: a plain ray.init from a host that runs no Ray node fails as
    Ray 2.60 fails in a container without a raylet (it would find another namespace's raylet
    through /tmp/ray or the process table if the hosts shared them)."""
    env = cluster.service_env("client", "dispatcher")
    result = cluster["client"].exec(
        [str(VENV_BIN / "python"), "-c", "import ray; ray.init(address='ray-head:6379')"],
        env, check=False, timeout=120)
    assert result.returncode != 0
    assert "No node info found" in result.stdout + result.stderr, result.stderr[-2000:]


def test_dispatcher_nodes_take_no_work(cluster: Cluster):
    """Each dispatcher runs a Ray node with no CPU, GPU or memory: an actor asking for memory
    (as a job's supervisor does) is placed on a worker node, never on a dispatcher or the head."""
    code = """
import json, ray
ray.init(address="ray-head:6379", log_to_driver=False)
here = ray.get_runtime_context().get_node_id()
nodes = {n["NodeID"]: {"resources": n["Resources"], "ip": n["NodeManagerAddress"]}
         for n in ray.nodes() if n["Alive"]}

@ray.remote(num_cpus=0, memory=200 * 1024 * 1024)
class Probe:
    def node(self):
        return ray.get_runtime_context().get_node_id()

placed = [ray.get(Probe.remote().node.remote(), timeout=60) for _ in range(3)]
print(json.dumps({"here": here, "nodes": nodes, "placed": placed}))
"""
    found = cluster.ray_python("dispatcher-1", code)
    by_ip = {node["ip"]: node["resources"] for node in found["nodes"].values()}
    for host in ("dispatcher-1", "dispatcher-2", "ray-head"):
        resources = by_ip[cluster.ip(host)]
        assert not {"CPU", "GPU", "memory"} & resources.keys(), (host, resources)
    workers = {cluster.ip("ray-worker-1"), cluster.ip("ray-worker-2")}
    for node_id in found["placed"]:
        assert found["nodes"][node_id]["ip"] in workers, json.dumps(found)
