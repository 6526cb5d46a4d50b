"""docker-compose.yml, run: see tests/cluster/bed.py for the hosts and what is substituted."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.cluster.bed import VENV_BIN, Cluster, env_for_client
from tests.cluster.netns import wait_for


def test_a_host_without_a_raylet_cannot_drive_ray(cluster: Cluster):
    """The hosts are isolated: a plain ray.init from a host that runs no Ray node fails as
    Ray 2.60 fails in a container without a raylet (it would find another namespace's raylet
    through /tmp/ray or the process table if the hosts shared them)."""
    env = {**cluster.service_env("client", "dispatcher"),
           "RAY_gcs_server_request_timeout_seconds": "5"}  # fail in 5 s, not 60
    result = cluster["client"].exec(
        [str(VENV_BIN / "python"), "-c", "import ray; ray.init(address='ray-head:6379')"],
        env, check=False, timeout=120)
    assert result.returncode != 0
    assert "No node info found" in result.stdout + result.stderr, result.stderr[-2000:]


def test_each_host_has_its_own_tmp(cluster: Cluster):
    """A file one host writes in /tmp is not in another host's /tmp, nor in this machine's (a
    supervisor's stale-scratch cleanup on one host cannot delete another host's live scratch)."""
    probe = f"/tmp/msc-probe-{time.monotonic_ns()}"
    env = cluster.service_env("ray-worker-1")
    cluster["ray-worker-1"].exec(["sh", "-c", f"echo worker-1 > {probe}"], env)
    assert cluster["ray-worker-1"].exec(["cat", probe], env).stdout == "worker-1\n"
    for host in ("ray-worker-2", "dispatcher-1", "ray-head"):
        result = cluster[host].exec(["test", "-e", probe], cluster.service_env(host), check=False)
        assert result.returncode == 1, host
    assert not Path(probe).exists()


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


SINE = {"name": "cluster-sine", "algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
        "iterations": 40, "meta_batch_size": 8, "checkpoint_every": 10, "log_every": 10,
        "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]},
        "resources": {"workers": 1, "cpus_per_worker": 0.5}, "seed": 3}
CONV4 = {"name": "cluster-conv4", "algorithm": {"name": "anil", "inner_lr": 0.5},
         "task_family": {"name": "glyphs", "ways": 5, "support_shots": 1, "query_shots": 2,
                         "image_size": 28, "num_characters": 100},
         "model": {"name": "conv4", "filters": 8}, "meta_batch_size": 4, "iterations": 6,
         "checkpoint_every": 3, "log_every": 3,
         "evaluation": {"every": 0, "tasks": 10, "inner_steps": [1]},
         "resources": {"workers": 2, "cpus_per_worker": 0.5}, "seed": 0}
NODE_IPS_CODE = """
import json, ray
ray.init(address="ray-head:6379", log_to_driver=False)
print(json.dumps({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}))
"""


def node_ips(cluster: Cluster) -> dict[str, str]:
    """Every Ray node id (alive or dead) → its host's address."""
    return cluster.ray_python("dispatcher-2", NODE_IPS_CODE)


def placement_of(job: dict) -> dict:
    """Where the job's driver and inner-loop workers ran, as the dispatcher records it."""
    placement = (job.get("progress") or {}).get("placement")
    assert placement, f"job {job['id']} has no recorded placement: {json.dumps(job)[:1000]}"
    return placement


def stored_object(cluster: Cluster, job_id: str, name: str = "meta_init.safetensors") -> bytes | None:
    """The object that the job's manifest names for ``name``, read straight from the store
    (workers/object_store: ``<job>/checkpoint/manifest.json`` names each file's attempt and
    version); None when there is no manifest or it names no such file."""
    prefix = f"artifacts/{job_id}"

    def read(s3) -> bytes | None:  # noqa: ANN001
        try:
            manifest = json.loads(s3.get_object(
                Bucket="metaserve", Key=f"{prefix}/checkpoint/manifest.json")["Body"].read())
        except s3.exceptions.NoSuchKey:
            return None
        for entry in [*(manifest.get("checkpoint") or []), *manifest.get("artifacts", [])]:
            if entry["name"] == name:
                key = f"{prefix}/attempt-{entry['attempt']}/{entry['version']}/{name}"
                return s3.get_object(Bucket="metaserve", Key=key)["Body"].read()
        return None

    return cluster.s3(read)


def test_jobs_run_on_the_worker_nodes_and_artifacts_on_the_store(cluster: Cluster):
    sine, conv4 = cluster.submit(SINE), cluster.submit(CONV4)
    for job in (sine, conv4):
        final = cluster.wait_job(job["id"])
        assert final["status"] == "succeeded", summary(final)
    ips = node_ips(cluster)
    worker_ips = {cluster.ip("ray-worker-1"), cluster.ip("ray-worker-2")}
    for job, count in ((sine, 1), (conv4, 2)):
        placement = placement_of(cluster.job(job["id"]))
        assert len(placement["workers"]) == count, placement
        for placed in [placement["driver"], *placement["workers"]]:
            assert ips[placed["node"]] in worker_ips, (placed, ips)
    # The artifact the API serves is the object in the store, byte for byte.
    for job in (sine, conv4):
        served = cluster.artifact(job["id"])
        stored = stored_object(cluster, job["id"])
        assert served == stored and len(served) > 0
    # A second client, on its own host, fetches it with the CLI.
    out = "/tmp/fetched"  # the client container's private /tmp
    result = cluster["client"].exec(
        ["sh", "-c", f"metaserve fetch {sine['id']} --out {out} && sha256sum {out}/*.safetensors"],
        env_for_client(cluster), timeout=120)
    import hashlib
    assert hashlib.sha256(cluster.artifact(sine["id"])).hexdigest() in result.stdout, result.stdout


PLUGIN_JOB = {"name": "cluster-plugin", "algorithm": {"name": "maml", "inner_lr": 0.1},
              "task_family": {"name": "oscillator"}, "model": {"name": "resmlp", "width": 32},
              "iterations": 30, "meta_batch_size": 8, "checkpoint_every": 10, "log_every": 10,
              "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]},
              "resources": {"workers": 2, "cpus_per_worker": 0.5}, "seed": 4}
EXAMPLE_PLUGIN = "metaserve-example-plugin"


def test_a_plugin_job_runs_on_worker_hosts_that_import_the_plugin(cluster: Cluster):
    """The example plugin is on the image (here: the virtualenv every host runs, which
    `make install` gives the plugin as a deployer's image build would, docs/PLUGINS.md): the
    API lists and validates it, and the job's driver and inner-loop workers, on the worker
    hosts, import it to sample its tasks and build its network."""
    families = {entry["name"]: entry for entry in cluster.http("GET", "/v1/task-families").json()}
    networks = {entry["name"]: entry for entry in cluster.http("GET", "/v1/networks").json()}
    assert (families["oscillator"]["package"], networks["resmlp"]["package"]) == (
        EXAMPLE_PLUGIN, EXAMPLE_PLUGIN), "install the example plugin (make install)"
    job = cluster.submit(PLUGIN_JOB)
    final = cluster.wait_job(job["id"])
    assert final["status"] == "succeeded", summary(final)
    ips = node_ips(cluster)
    placement = placement_of(final)
    assert len(placement["workers"]) == 2, placement
    worker_ips = {cluster.ip("ray-worker-1"), cluster.ip("ray-worker-2")}
    for placed in [placement["driver"], *placement["workers"]]:
        assert ips[placed["node"]] in worker_ips, (placed, ips)
    document = json.loads(cluster.artifact(job["id"], "meta_init.json"))
    assert [(used["name"], used["package"]) for used in document["plugins"]] == [
        ("oscillator", EXAMPLE_PLUGIN), ("resmlp", EXAMPLE_PLUGIN)]
    assert document["architecture"]["name"] == "resmlp"
    # A Ray worker on each worker host loads the plugin itself (not only the API's process).
    code = """
import json, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address="ray-head:6379", log_to_driver=False)

@ray.remote(num_cpus=0.1)
def loaded():
    from metaserve.workers.spec import PLUGINS
    return sorted(PLUGINS.task_families), sorted(PLUGINS.models)

hosts = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()
         if n["Alive"] and n["NodeManagerAddress"] in %r}
print(json.dumps({ip: ray.get(loaded.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
    node, soft=False)).remote(), timeout=120) for node, ip in hosts.items()}))
""" % sorted(worker_ips)
    assert cluster.ray_python("dispatcher-1", code) == {
        ip: [["oscillator"], ["resmlp"]] for ip in worker_ips}


def test_a_custom_resource_stands_in_for_gpus(cluster: Cluster):
    """METASERVE_GPU_RESOURCE=gpu_slot: a job asking for one GPU per worker runs on the only
    node with a gpu_slot (ray-worker-2)."""
    spec = {**SINE, "name": "cluster-gpu-slot", "iterations": 10,
            "resources": {"workers": 1, "cpus_per_worker": 0.5, "gpus_per_worker": 1}}
    job = cluster.submit(spec)
    final = cluster.wait_job(job["id"])
    assert final["status"] == "succeeded", summary(final)
    ips = node_ips(cluster)
    for placed in placement_of(final)["workers"]:
        assert ips[placed["node"]] == cluster.ip("ray-worker-2"), placed


# ---------------------------------------------------------------------------------- faults
#
# One job spec for the faults; an undisturbed run of it gives the reference bits. Two inner-
# loop workers, so both worker hosts have work; checkpoints every 10 iterations.
FAULT = {"name": "cluster-fault", "algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
         "iterations": 300, "meta_batch_size": 8, "checkpoint_every": 10, "log_every": 10,
         "evaluation": {"every": 0, "tasks": 20, "inner_steps": [1]},
         "resources": {"workers": 2, "cpus_per_worker": 0.5}, "seed": 11}
KILL_AT = 40  # iterations done (past a checkpoint) when the fault is injected


@pytest.fixture(scope="module")
def reference_run(cluster: Cluster) -> tuple[str, bytes]:
    """The id and meta_init.safetensors of an undisturbed run of FAULT."""
    started = time.monotonic()
    job = cluster.submit(FAULT)
    final = cluster.wait_job(job["id"], timeout=300)
    assert final["status"] == "succeeded" and final["attempt"] == 1, summary(final)
    print(f"\nundisturbed FAULT run: {time.monotonic() - started:.1f} s")
    served = cluster.artifact(job["id"])
    assert served == stored_object(cluster, job["id"])
    return job["id"], served


@pytest.fixture(scope="module")
def reference(reference_run: tuple[str, bytes]) -> bytes:
    """meta_init.safetensors of an undisturbed run of FAULT."""
    return reference_run[1]


def test_killing_a_worker_host_mid_job_gives_the_same_bits(cluster: Cluster, reference: bytes):
    job = cluster.submit(FAULT)
    running = cluster.wait_progress(job["id"], 1)
    host = host_of(cluster, placement_of(running)["workers"][0]["node"])
    cluster.wait_progress(job["id"], KILL_AT)
    cluster[host].kill()  # SIGKILL every process of the host at once
    assert_mid_job(cluster, job["id"])
    time.sleep(3)
    cluster.start_ray_worker(host)  # restart: unless-stopped
    final = cluster.wait_job(job["id"], timeout=300)
    assert final["status"] == "succeeded", summary(final)
    assert cluster.artifact(job["id"]) == reference
    cluster.wait_nodes(5, "the restarted worker back", host)


def test_killing_the_dispatcher_holding_a_job_resumes_it_elsewhere(cluster: Cluster,
                                                                   reference: bytes):
    job = cluster.submit(FAULT)
    cluster.wait_progress(job["id"], KILL_AT)
    owner = cluster.lease_owner(job["id"])
    holder = owner.split(":", 1)[0]
    assert holder in ("dispatcher-1", "dispatcher-2"), owner
    cluster[holder].kill()
    assert_mid_job(cluster, job["id"])
    try:
        final = cluster.wait_job(job["id"], timeout=300)
        assert final["status"] == "succeeded", summary(final)
        # A lost dispatcher is an interruption, not the job's failure: attempt stays 1.
        assert final["attempt"] == 1, summary(final)
        assert cluster.job_column(job["id"], "interruptions") == "1"
        assert cluster.artifact(job["id"]) == reference
    finally:
        cluster.start_service(holder)  # restart: unless-stopped
    cluster.wait_nodes(5, "the restarted dispatcher back", holder)


def test_an_object_store_restart_mid_job_never_corrupts_the_artifact(cluster: Cluster,
                                                                      reference: bytes):
    """The store goes away mid-job and comes back (with its data, like MinIO on its volume):
    the job rides it out, or its attempt fails with a readable error and a retry resumes it
    from the last checkpoint; either way the artifact is the undisturbed run's, bit for bit."""
    job = cluster.submit(FAULT)
    cluster.wait_progress(job["id"], KILL_AT)
    cluster["artifacts"].kill()
    assert_mid_job(cluster, job["id"])
    time.sleep(8)
    cluster.start_artifacts(replay=True)
    final = cluster.wait_job(job["id"], timeout=300)
    # Never a corrupt artifact: whatever is stored is the undisturbed run's.
    stored = stored_object(cluster, job["id"])
    if stored is not None:
        assert stored == reference
    if final["status"] == "failed":  # a readable error, one line naming the store
        assert "\n" not in final["error"] and "artifact store" in final["error"], summary(final)
    print(f"\nobject store restart: {final['status']}, attempt {final['attempt']}: "
          f"{final.get('error') or final.get('message') or ''}")
    assert final["status"] == "succeeded", summary(final)
    assert cluster.artifact(job["id"]) == reference
    assert stored_object(cluster, job["id"]) == reference


OTHER = {"dispatcher-1": "dispatcher-2", "dispatcher-2": "dispatcher-1"}
TIMED = re.compile(r"per_second|seconds|_s$")
# (e)'s pause: past the 10 s lease, short of Ray's death sentence for a silent node (the GCS
# health check: 5 failures of a 10 s probe every 3 s, about a minute): a paused process, not
# a lost node. (A node the GCS declared dead is another fault: its raylet exits.)
PAUSE_MAX_S = 40
# who holds a transaction open (a paused holder mid-write keeps its job's row locked until the
# server ends its idle transaction: the dispatcher's engine_timeouts)
TRANSACTIONS = ("select string_agg(concat_ws(' ', pid, client_addr, state, wait_event, "
                "round(extract(epoch from now() - xact_start)), left(query, 80)), E'\n') "
                "from pg_stat_activity where xact_start is not null and pid <> pg_backend_pid()")
REFUSED = re.compile(r"attempt fenced: (\d+) of its writes were refused")


POSTGRES_DOWN_S = 40  # four of the bed's 10 s leases


def test_postgres_stopped_past_the_lease_costs_no_attempt(cluster: Cluster,
                                                          reference_run: tuple[str, bytes]):
    """(b) PostgreSQL stopped mid-job (a fast shutdown) for 40 s, longer than the lease, and
    restarted on its data: the dispatchers and the API ride it out (the writer retries, the
    lease is renewed or reclaimed once it is back); the job ends on attempt 1 with the
    undisturbed run's bits and metrics, and both dispatchers stay up and healthy."""
    job = cluster.submit(FAULT)
    running = cluster.wait_progress(job["id"], KILL_AT)
    assert running["progress"]["iteration"] < FAULT["iterations"], summary(running)
    cluster.stop_postgres()
    stopped = time.monotonic()
    try:
        time.sleep(POSTGRES_DOWN_S)
    finally:
        cluster.start_postgres(restart=True)  # restart: unless-stopped
    down_for = time.monotonic() - stopped
    final = cluster.wait_job(job["id"], timeout=300)
    assert final["status"] == "succeeded" and final["attempt"] == 1, summary(final)
    interruptions = cluster.job_column(job["id"], "interruptions")
    print(f"\nPostgreSQL down {down_for:.1f} s (job at iteration "
          f"{running['progress']['iteration']} when stopped): attempt 1, {interruptions} "
          f"interruption(s)")
    assert_served_as_undisturbed(cluster, job["id"], reference_run)
    for host in OTHER:
        assert cluster[host].container_alive(), cluster.topology.tails(host)
        wait_for(f"{host}'s health check to pass", lambda: cluster.healthcheck(host)[0] == 0,
                 timeout=60, interval=2, on_timeout=lambda: str(cluster.healthcheck(host)))


def test_sigterm_to_the_dispatcher_holding_a_job_hands_it_back(cluster: Cluster,
                                                                reference_run: tuple[str, bytes]):
    """(a) ``docker compose stop dispatcher``: SIGTERM to the container's main process. It
    drains (stops claiming, stops its running job and hands it back) and exits within its
    grace; the other dispatcher resumes the job from its last checkpoint: one interruption,
    attempt 1, the undisturbed run's bits and metrics."""
    job = cluster.submit(FAULT)
    cluster.wait_progress(job["id"], KILL_AT)
    holder = holder_of(cluster, job["id"])
    container = cluster[holder].container
    assert container is not None and container.init_pid is not None
    # docker compose stop waits stop_grace_period, then SIGKILLs
    grace = float(cluster.compose["services"]["dispatcher"]["stop_grace_period"].rstrip("s"))
    signalled = time.monotonic()
    os.kill(container.init_pid, signal.SIGTERM)
    try:
        wait_for(f"{holder} to drain and exit", lambda: not container.alive(),
                 timeout=grace, interval=0.5, on_timeout=lambda: cluster.topology.tails(holder))
        drained_in = time.monotonic() - signalled
        assert "draining" in container.log.read_text(errors="replace"), container.tail()
        assert_mid_job(cluster, job["id"])
        final = cluster.wait_job(job["id"], timeout=300)
        assert final["status"] == "succeeded" and final["attempt"] == 1, summary(final)
        assert cluster.job_column(job["id"], "interruptions") == "1"
        handed_back = query(cluster, f"select count(*) from job_logs where job_id = "
                                     f"'{job['id']}' and message like '%handed back%'")
        assert handed_back == "1", handed_back  # a drain, not a lapsed lease
        starts = query(cluster, f"select string_agg(message, '|' order by seq) from job_logs "
                                f"where job_id = '{job['id']}' and message like 'attempt 1 started%'")
        assert f"(dispatcher {OTHER[holder]}:" in starts.split("|")[-1], starts  # resumed elsewhere
        assert_served_as_undisturbed(cluster, job["id"], reference_run)
    finally:
        cluster.start_service(holder)  # restart: unless-stopped
    print(f"\nSIGTERM to {holder}: drained and exited in {drained_in:.1f} s (compose waits "
          f"{grace:.0f} s)")
    cluster.wait_nodes(5, "the restarted dispatcher back", holder)


def test_a_dispatcher_paused_past_its_lease_writes_nothing_that_is_served(
        cluster: Cluster, reference_run: tuple[str, bytes]):
    """(e) Every process of the host of the dispatcher holding a job is paused (SIGSTOP) until
    the other dispatcher has taken the job over (the lease lapsed) and run it on past where the
    paused one left it (at most PAUSE_MAX_S), then resumed (SIGCONT): the paused attempt's writes are refused
    (counted in its log), and the job ends on attempt 1 (one interruption) with the
    undisturbed run's bits and metrics, served and stored."""
    job = cluster.submit(FAULT)
    cluster.wait_progress(job["id"], KILL_AT)
    holder = holder_of(cluster, job["id"])
    other = OTHER[holder]
    container = cluster[holder].container
    assert container is not None
    paused = time.monotonic()
    cluster[holder].signal(signal.SIGSTOP)
    try:
        taken = wait_for(f"{other} to take the job over", lambda: cluster.lease_owner(
            job["id"]).startswith(f"{other}:") and time.monotonic() - paused,
            timeout=PAUSE_MAX_S, interval=1, on_timeout=lambda: "\n".join((
                json.dumps(cluster.job(job["id"]))[:2000], query(cluster, TRANSACTIONS),
                cluster.topology.tails(other))))
        at = (cluster.job(job["id"]).get("progress") or {}).get("iteration", 0)
        try:  # and, if it gets there in time, runs the job on (its workers placed)
            wait_for("the new attempt to run on", lambda: (cluster.job(job["id"]).get(
                "progress") or {}).get("iteration", 0) > at,
                timeout=max(1.0, PAUSE_MAX_S - (time.monotonic() - paused)), interval=1)
        except TimeoutError:
            pass
    finally:
        cluster[holder].signal(signal.SIGCONT)
    paused_for = time.monotonic() - paused
    final = cluster.wait_job(job["id"], timeout=300)
    assert final["status"] == "succeeded" and final["attempt"] == 1, summary(final)
    assert cluster.job_column(job["id"], "interruptions") == "1"
    assert_served_as_undisturbed(cluster, job["id"], reference_run)
    refused = wait_for(f"{holder}'s stale attempt to find its writes refused", lambda: sum(
        int(count) for count in REFUSED.findall(container.log.read_text(errors="replace"))),
        timeout=60, interval=1, on_timeout=lambda: container.tail(60))
    print(f"\n{holder} paused {paused_for:.1f} s ({other} took the job over after "
          f"{taken:.1f} s, at iteration {at}): {refused} writes of the stale attempt refused")
    assert container.alive(), container.tail(60)  # resumed, it goes on (its job handed over)
    cluster.wait_nodes(5, "every dispatcher still there", holder, other)
    wait_for(f"{holder}'s health check to pass", lambda: cluster.healthcheck(holder)[0] == 0,
             timeout=60, interval=2, on_timeout=lambda: str(cluster.healthcheck(holder)))


def test_a_partition_between_the_dispatcher_and_the_head_costs_nothing(
        cluster: Cluster, reference_run: tuple[str, bytes]):
    """(d) The network between the dispatcher holding a job and the Ray head is cut (both
    ways; the dispatcher still reaches the database and the worker hosts) until its health
    check says Ray stopped answering, then healed: the job finishes on its first attempt with
    the undisturbed run's bits, and the dispatcher's health check passes again."""
    job = cluster.submit(FAULT)
    cluster.wait_progress(job["id"], KILL_AT)
    holder = holder_of(cluster, job["id"])
    cut = time.monotonic()
    cluster.topology.partition(holder, "ray-head")
    try:
        assert_mid_job(cluster, job["id"])
        status, said = wait_for(  # the health check tells the truth: Ray does not answer
            f"{holder}'s health check to fail", lambda: (lambda r: r if r[0] else None)(
                cluster.healthcheck(holder)), timeout=60, interval=2)
        assert "Ray has not answered" in said, said
        during = (cluster.job(job["id"]).get("progress") or {}).get("iteration")
        cut_for = time.monotonic() - cut
    finally:
        cluster.topology.partition(holder, "ray-head", cut=False)
    print(f"\npartition {holder} <-> ray-head: {cut_for:.1f} s (job at iteration {during}); "
          f"{holder}: {said}")
    final = cluster.wait_job(job["id"], timeout=300)
    assert final["status"] == "succeeded" and final["attempt"] == 1, summary(final)
    assert cluster.job_column(job["id"], "interruptions") == "0"
    assert_served_as_undisturbed(cluster, job["id"], reference_run)
    assert cluster[holder].container_alive(), cluster.topology.tails(holder)
    wait_for(f"{holder}'s health check to pass again",
             lambda: cluster.healthcheck(holder)[0] == 0, timeout=60, interval=2,
             on_timeout=lambda: str(cluster.healthcheck(holder)))


def test_killing_the_ray_head_mid_job_costs_nothing(cluster: Cluster,
                                                    reference_run: tuple[str, bytes]):
    """(c) GCS fault tolerance: the Ray head host is killed mid-job (every process at once) and
    restarted; its state comes back from redis, the worker and dispatcher nodes wait for it
    (RAY_gcs_rpc_server_reconnect_timeout_s) instead of exiting, and the job finishes on its
    first attempt with the undisturbed run's bits. A worker host's health check asks its own
    raylet, so it passes while the head is gone."""
    job = cluster.submit(FAULT)
    cluster.wait_progress(job["id"], KILL_AT)
    cluster["ray-head"].kill()
    killed = time.monotonic()
    assert_mid_job(cluster, job["id"])
    for host in ("ray-worker-1", "ray-worker-2"):
        status, said = cluster.healthcheck(host)
        assert status == 0, (host, said)
    during = (cluster.job(job["id"]).get("progress") or {}).get("iteration")
    cluster.start_ray_head()  # restart: unless-stopped
    print(f"\nRay head down {time.monotonic() - killed:.1f} s (job at iteration {during} "
          f"while it was)")
    final = cluster.wait_job(job["id"], timeout=400)
    assert final["status"] == "succeeded" and final["attempt"] == 1, summary(final)
    assert_served_as_undisturbed(cluster, job["id"], reference_run)
    cluster.wait_nodes(5, "every node with the restarted head", "ray-worker-1", "ray-worker-2",
                       "dispatcher-1", "dispatcher-2")
    for host in ("dispatcher-1", "dispatcher-2"):
        assert cluster[host].container_alive(), cluster.topology.tails(host)
        wait_for(f"{host}'s health check to pass", lambda: cluster.healthcheck(host)[0] == 0,
                 timeout=60, interval=2, on_timeout=lambda: str(cluster.healthcheck(host)))


def holder_of(cluster: Cluster, job_id: str) -> str:
    """The host of the dispatcher holding the job's lease."""
    owner = cluster.lease_owner(job_id)
    holder = owner.split(":", 1)[0]
    assert holder in OTHER, owner
    return holder


def query(cluster: Cluster, sql: str) -> str:
    """One value read from the cluster's database (as text)."""
    database = cluster.compose["services"]["postgres"]["environment"]["POSTGRES_DB"]
    return cluster.psql(sql, database).strip()


def served_metrics(cluster: Cluster, job_id: str) -> dict[tuple[str, int], float | None]:
    """Every metric value the API serves for the job, by (name, step)."""
    values: dict[tuple[str, int], float | None] = {}
    params: dict[str, int] = {}
    for _ in range(100):
        page = cluster.http("GET", f"/v1/jobs/{job_id}/metrics", params=params)
        assert page.status_code == 200, page.text[:500]
        body = page.json()
        for point in body["data"]:
            values[(point["name"], point["step"])] = point["value"]
        if body.get("next_since_step") is None:
            return values
        params = {"since_step": body["next_since_step"]}
    raise AssertionError(f"job {job_id}: more than 100 pages of metrics")


def assert_served_as_undisturbed(cluster: Cluster, job_id: str,
                                 reference_run: tuple[str, bytes]) -> None:
    """The job's artifact, served and stored, and its metrics are the undisturbed run's: no
    write of an interrupted or stale attempt is served."""
    reference_id, reference = reference_run
    assert cluster.artifact(job_id) == reference
    assert stored_object(cluster, job_id) == reference
    served, undisturbed = served_metrics(cluster, job_id), served_metrics(cluster, reference_id)
    assert served.keys() == undisturbed.keys()
    timed = {key for key in served if TIMED.search(key[0])}  # wall-clock rates differ
    assert len(timed) < len(served) / 2, sorted(timed)
    assert {key: value for key, value in served.items() if key not in timed} == {
        key: value for key, value in undisturbed.items() if key not in timed}


def assert_mid_job(cluster: Cluster, job_id: str) -> None:
    """The fault hit a job still short of its last iteration (else the test proves nothing):
    running, or back in the queue when the fault took its driver."""
    job = cluster.job(job_id)
    done = (job.get("progress") or {}).get("iteration", 0)
    assert job["status"] in ("running", "queued") and done < FAULT["iterations"], summary(job)


def summary(job: dict) -> str:
    """What a failed assertion about a job should show."""
    return json.dumps({key: job.get(key) for key in ("id", "status", "attempt", "message", "error",
                                                    "progress")})[:3000]


def host_of(cluster: Cluster, node_id: str) -> str:
    ip = node_ips(cluster)[node_id]
    return next(name for name in ("ray-worker-1", "ray-worker-2") if cluster.ip(name) == ip)


def test_every_metaserve_healthcheck_passes_in_its_container(cluster: Cluster):
    """The compose file's health checks, run as docker would (inside each container). The
    substituted services (postgres, artifacts) are checked by the bed as it starts them."""
    for host in ("redis", "ray-head", "ray-worker-1", "ray-worker-2", "api", "dispatcher-1",
                 "dispatcher-2"):
        status, said = cluster.healthcheck(host)
        assert status == 0, (host, said[-2000:])
