"""The compose cluster on namespaces: one host per compose service (two Ray workers, two
dispatchers), plus a ``client`` host. Each host runs the command and environment
docker-compose.yml gives its service, with these substitutions and test-only additions:

- ``postgres`` runs this machine's PostgreSQL 15 binaries as a new private instance (initdb
  into a temporary directory, run as the ``postgres`` OS user), not the ``postgres:15`` image;
  its user, password and database are the ones the compose file gives the image.
- ``redis`` (the Ray head's external GCS store) runs this machine's Debian ``redis-server``
  with the compose service's command, not the ``redis`` image.
- ``artifacts`` runs moto's standalone S3 server instead of the MinIO image, and the
  ``artifacts-init`` one-shot (``mc mb``) is replaced by a boto3 ``create_bucket``. moto keeps
  objects in memory; its request recorder, written to the ``objects`` volume and replayed
  after a restart, stands in for MinIO's data directory, so a restarted store has its objects.
- Sizing for a 2-core machine: Ray workers get ``--num-cpus=1`` appended (a container would
  see its own CPU limit), one worker also ``--resources={"gpu_slot": 1}``, a stand-in for a
  GPU (``METASERVE_GPU_RESOURCE=gpu_slot``); ``RAY_memory_monitor_refresh_ms=0``.
- Dispatchers get a 10 s lease renewed every 2 s (``METASERVE_LEASE_S``/``_HEARTBEAT_S``)
  so the fault tests wait less for a dead dispatcher's lease to lapse.

Everything else, the ``.env`` secrets included (random per run), comes from the compose file.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.cluster import compose
from tests.cluster.netns import Container, Topology, run, wait_for

VENV_BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HOSTS = {"postgres": 10, "artifacts": 11, "redis": 12, "ray-head": 20, "ray-worker-1": 21,
         "ray-worker-2": 22, "api": 30, "dispatcher-1": 41, "dispatcher-2": 42, "client": 50}
ALIASES = {"ray-worker": "ray-worker-1", "dispatcher": "dispatcher-1"}
SERVICE_OF = {"ray-worker-1": "ray-worker", "ray-worker-2": "ray-worker",
              "dispatcher-1": "dispatcher", "dispatcher-2": "dispatcher"}
RAY_TEST_ENV = {"RAY_memory_monitor_refresh_ms": "0"}
DISPATCHER_TEST_ENV = {"METASERVE_LEASE_S": "10", "METASERVE_HEARTBEAT_S": "2"}
WORKER_EXTRA_ARGS = {"ray-worker-1": ["--num-cpus=1"],
                     "ray-worker-2": ["--num-cpus=1", '--resources={"gpu_slot": 1}']}
BUCKET = "metaserve"
STARTUP_TIMEOUT_S = 180


def missing_requirements() -> str | None:
    """Why the cluster test bed cannot run here (None: it can)."""
    from tests.cluster.netns import available

    reason = available()
    if reason:
        return reason
    if not (PG_BIN / "postgres").exists():
        return f"needs PostgreSQL 15 binaries in {PG_BIN}"
    try:
        run(["id", "postgres"])
    except subprocess.CalledProcessError:
        return "needs the postgres OS user"
    for module in ("moto", "boto3"):
        try:
            __import__(module)
        except ImportError:
            return f"needs {module} (pip install 'moto[server]' boto3)"
    return None


class Cluster:
    def __init__(self) -> None:
        self.topology = Topology(HOSTS, ALIASES)
        # The `.env` of the compose file: secrets made for this run.
        self.dotenv = {
            "RAY_AUTH_TOKEN": secrets.token_urlsafe(32),
            "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
            "METASERVE_S3_ACCESS_KEY_ID": "msc" + secrets.token_hex(8),
            "METASERVE_S3_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "METASERVE_GPU_RESOURCE": "gpu_slot",
            "RAY_REDIS_PASSWORD": secrets.token_urlsafe(16),
        }
        self.compose = compose.load(self.dotenv)
        self.admin_key = ""
        self.api_key = ""
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers

    def __getitem__(self, host: str):  # noqa: ANN204
        return self.topology[host]

    def ip(self, host: str) -> str:
        return self.topology[host].ip

    def service_env(self, host: str, service: str | None = None) -> dict[str, str]:
        service = service or SERVICE_OF.get(host, host)
        env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": str(self.topology.host_dir(host)), "LANG": "C.UTF-8"}
        env.update(compose.environment_of(self.compose, service))
        if service in ("ray-head", "ray-worker", "dispatcher", "api"):
            env.update(RAY_TEST_ENV)
        if service == "dispatcher":
            env.update(DISPATCHER_TEST_ENV)
        return env

    def volumes(self, service: str) -> list[tuple[Path, str]]:
        return [(self.topology.volume(source), target)
                for source, target in compose.volumes_of(self.compose["services"][service])]

    def start_service(self, host: str, extra_args: list[str] | None = None) -> Container:
        """Start the compose service of ``host`` with its command and environment."""
        service = SERVICE_OF.get(host, host)
        spec = self.compose["services"][service]
        argv = compose.command_of(spec) + list(extra_args or [])
        return self.topology[host].start(argv, self.service_env(host), volumes=self.volumes(service))

    def http(self, method: str, path: str, *, key: str | None = None, host: str = "client",
             timeout: float = 30, **kwargs) -> httpx.Response:
        """An HTTP request to the API from ``host``'s network namespace."""
        key = key or self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}

        def call() -> httpx.Response:
            with httpx.Client(base_url=f"http://{self.ip('api')}:8000", timeout=timeout) as client:
                return client.request(method, path, headers=headers, **kwargs)

        return self.topology.in_netns(host, call, timeout=timeout + 10)

    def s3(self, fn):  # noqa: ANN001, ANN201
        """Call ``fn(s3_client)`` from the client host (boto3 against the object store)."""
        import boto3
        from botocore.config import Config

        def call():  # noqa: ANN202
            client = boto3.client(
                "s3", endpoint_url=f"http://{self.ip('artifacts')}:9000", region_name="us-east-1",
                aws_access_key_id=self.dotenv["METASERVE_S3_ACCESS_KEY_ID"],
                aws_secret_access_key=self.dotenv["METASERVE_S3_SECRET_ACCESS_KEY"],
                config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 2}))
            return fn(client)

        return self.topology.in_netns("client", call, timeout=60)

    def healthcheck(self, host: str) -> tuple[int, str]:
        """The compose health check of ``host``'s service, run as docker runs it (inside the
        host's container): its exit status and output."""
        check = self.compose["services"][SERVICE_OF.get(host, host)]["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL"), check
        argv = check[1:] if check[0] == "CMD" else ["sh", "-c", check[1]]
        result = self.topology[host].exec(argv, self.service_env(host), check=False, timeout=60)
        return result.returncode, (result.stdout + result.stderr).strip()

    def ray_status(self) -> str:
        return self.topology["ray-head"].exec(["ray", "status", "--address=127.0.0.1:6379"],
                                              self.service_env("ray-head"), timeout=60).stdout

    def active_nodes(self) -> int:
        status = self.ray_status()
        active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
        return len(re.findall(r"node_[0-9a-f]+", active))

    def ray_python(self, host: str, code: str, timeout: float = 120) -> Any:
        """Run ``code`` as a Ray driver inside ``host``'s container (which must run a Ray node);
        it prints one JSON line last, which is returned."""
        result = self.topology[host].exec([str(VENV_BIN / "python"), "-c", code],
                                          self.service_env(host), timeout=timeout)
        return json.loads(result.stdout.strip().splitlines()[-1])

    # ------------------------------------------------------------------ services

    def start_postgres(self, restart: bool = False) -> None:
        """A new instance; ``restart``: the same one again, on its data directory (the
        ``pgdata`` volume of a restarted container)."""
        env = compose.environment_of(self.compose, "postgres")
        root = self.topology.base / "pg"
        data, sockets = root / "data", root / "sock"
        if restart:
            self._run_postgres(root, data, sockets)
            return
        for path in (root, data, sockets):
            path.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
        data.chmod(0o700)
        run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(data),
             "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"], timeout=120)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.ip('postgres').rsplit('.', 1)[0]}.0/24 scram-sha-256\n")
        self._run_postgres(root, data, sockets)
        user, password, database = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
        self.psql(f"create role \"{user}\" login password '{password}'")
        self.psql(f"create database \"{database}\" owner \"{user}\"")

    def stop_postgres(self, timeout: float = 60) -> None:
        """``docker compose stop postgres``: the image's stop signal, SIGINT to the server (a
        fast shutdown: clients are disconnected), here sent by ``pg_ctl stop -m fast`` run in
        the container; then the container ends."""
        host = self.topology["postgres"]
        container = host.container
        assert container is not None
        data = self.topology.base / "pg" / "data"
        host.exec(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "stop", "-D",
                   str(data), "-m", "fast", "-w", "-t", str(int(timeout))],
                  {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                  timeout=timeout + 10, check=False)  # killed with the container as it ends
        wait_for("PostgreSQL's container to end", lambda: not container.alive(),
                 timeout=timeout, on_timeout=lambda: self.topology.tails("postgres"))

    def _run_postgres(self, root: Path, data: Path, sockets: Path) -> None:
        self.topology["postgres"].start(
            [str(PG_BIN / "postgres"), "-D", str(data), "-k", str(sockets), "-p", "5432",
             "-c", "listen_addresses=*", "-c", "fsync=off", "-c", "max_connections=200"],
            {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}, user="postgres",
            workdir=root)

        def psql(sql: str, database: str = "postgres") -> str:
            return run(["runuser", "-u", "postgres", "--", str(PG_BIN / "psql"),
                        "-h", str(sockets), "-p", "5432", "-U", "postgres", "-d", database,
                        "-v", "ON_ERROR_STOP=1", "-tAc", sql], timeout=30).stdout

        self.psql = psql
        wait_for("PostgreSQL", lambda: psql("select 1").strip() == "1", timeout=60,
                 on_timeout=lambda: self.topology.tails("postgres"),
                 alive=self.topology["postgres"].container_alive)

    def start_artifacts(self, replay: bool = False) -> None:
        """moto's S3 server in place of MinIO (see the module docstring)."""
        recording = "/data/recording.jsonl"
        volumes = self.volumes("artifacts")
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(self.topology.host_dir("artifacts")),
               "LANG": "C.UTF-8", "MOTO_ENABLE_RECORDING": "True",
               "MOTO_RECORDER_FILEPATH": recording}
        self.topology["artifacts"].start(
            [str(VENV_BIN / "python"), "-m", "moto.server", "-H", "0.0.0.0", "-p", "9000"],
            env, volumes=volumes)
        wait_for("the object store", lambda: self.s3(lambda s3: s3.list_buckets()) is not None,
                 timeout=60, on_timeout=lambda: self.topology.tails("artifacts"),
                 alive=self.topology["artifacts"].container_alive)
        if replay:
            def replay_call() -> int:
                with httpx.Client(timeout=120) as client:
                    return client.post(f"http://{self.ip('artifacts')}:9000"
                                       "/moto-api/recorder/replay-recording").status_code
            assert self.topology.in_netns("client", replay_call, timeout=150) == 200
        else:  # the artifacts-init service's `mc mb --ignore-existing store/metaserve`
            self.s3(lambda s3: s3.create_bucket(Bucket=BUCKET))

    def start_redis(self) -> None:
        self.start_service("redis")
        wait_for("redis", lambda: self.healthcheck("redis")[0] == 0, timeout=60,
                 on_timeout=lambda: self.topology.tails("redis"),
                 alive=self.topology["redis"].container_alive)

    def start_ray_head(self, tries: int = 3) -> None:
        """Start the head and wait until it answers; a head that exits while it starts is
        started again, as ``restart: unless-stopped`` does (at most ``tries`` times)."""
        for attempt in range(1, tries + 1):
            container = self.start_service("ray-head")
            try:  # `ray start` says so once its own node is up (its GCS answers before that)
                wait_for("the Ray head", lambda: "Ray runtime started" in container.log.read_text(
                    errors="replace") and "Active:" in self.ray_status(),
                    timeout=STARTUP_TIMEOUT_S, interval=2,
                    on_timeout=lambda: self.topology.tails("ray-head"), alive=container.alive)
                return
            except RuntimeError:  # it exited while starting
                if attempt == tries:
                    raise
                print(f"\nthe Ray head exited while starting (try {attempt}); restarting it:\n"
                      + self.topology.tails("ray-head", lines=5))

    def start_ray_worker(self, host: str) -> Container:
        return self.start_service(host, WORKER_EXTRA_ARGS[host])

    def start_api(self) -> None:
        self.start_service("api")

        def ready() -> bool:
            return self.http("GET", "/readyz", timeout=5).status_code == 200

        wait_for("the API", ready, timeout=STARTUP_TIMEOUT_S, interval=1,
                 on_timeout=lambda: self.topology.tails("api"),
                 alive=self.topology["api"].container_alive)

    def wait_nodes(self, count: int, what: str, *hosts: str) -> None:
        wait_for(f"{count} Ray nodes ({what})", lambda: self.active_nodes() >= count,
                 timeout=STARTUP_TIMEOUT_S, interval=2,
                 on_timeout=lambda: self.ray_status() + self.topology.tails(*hosts),
                 alive=lambda: all(self.topology[host].container_alive() for host in hosts))

    def up(self) -> None:
        """Start the whole cluster, in compose's dependency order, independent parts at once."""
        started = time.monotonic()
        self.topology.open()
        with ThreadPoolExecutor(max_workers=3) as pool:
            steps = [pool.submit(self.start_postgres), pool.submit(self.start_artifacts),
                     pool.submit(lambda: (self.start_redis(), self.start_ray_head()))]
            for step in steps:
                step.result()
        self.timings["postgres+artifacts+head"] = time.monotonic() - started
        self.start_ray_worker("ray-worker-1")
        self.start_ray_worker("ray-worker-2")
        self.start_api()
        admin = self.topology["api"].exec(["cat", "/var/lib/metaserve/admin.key"],
                                          self.service_env("api"))
        self.admin_key = admin.stdout.strip()
        self.api_key = self.topology["api"].exec(
            ["metaserve", "keys", "create", "alice"], self.service_env("api")).stdout.strip().splitlines()[-1]
        self.wait_nodes(3, "head and two workers", "ray-worker-1", "ray-worker-2")
        self.timings["workers+api"] = time.monotonic() - started
        self.start_service("dispatcher-1")
        self.start_service("dispatcher-2")
        self.wait_nodes(5, "two dispatchers joined", "dispatcher-1", "dispatcher-2")
        self.timings["up"] = time.monotonic() - started

    def down(self) -> None:
        self.topology.close()

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: dict) -> dict:
        response = self.http("POST", "/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        response = self.http("GET", f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_job(self, job_id: str, timeout: float = 240,
                 until=lambda job: job["status"] in ("succeeded", "failed", "cancelled")) -> dict:  # noqa: ANN001
        return wait_for(f"job {job_id}", lambda: (lambda job: job if until(job) else None)(self.job(job_id)),
                        timeout=timeout, interval=1,
                        on_timeout=lambda: json.dumps(self.job(job_id))[:2000] + "\n"
                        + self.topology.tails("dispatcher-1", "dispatcher-2", "ray-worker-1",
                                              "ray-worker-2", lines=30))

    def job_column(self, job_id: str, expression: str) -> str:
        """``expression`` over the job's row, read from the database (as text)."""
        assert re.fullmatch(r"[0-9A-Za-z_-]+", job_id)
        database = compose.environment_of(self.compose, "postgres")["POSTGRES_DB"]
        return self.psql(f"select {expression} from jobs where id = '{job_id}'", database).strip()

    def lease_owner(self, job_id: str) -> str:
        """The dispatcher holding the job's lease (its worker id starts with its host name)."""
        return self.job_column(job_id, "coalesce(lease_owner, '')")

    def wait_progress(self, job_id: str, iteration: int, timeout: float = 180) -> dict:
        """Wait until the running job is at ``iteration`` or later (and not finished)."""
        def reached(job: dict) -> bool:
            assert job["status"] in ("queued", "running"), json.dumps(job)[:2000]
            return (job.get("progress") or {}).get("iteration", 0) >= iteration
        return self.wait_job(job_id, timeout=timeout, until=reached)

    def artifact(self, job_id: str, name: str = "meta_init.safetensors") -> bytes:
        response = self.http("GET", f"/v1/jobs/{job_id}/artifacts/{name}", timeout=60)
        assert response.status_code == 200, response.text[:500]
        return response.content


def env_for_client(cluster: Cluster) -> dict[str, str]:
    return {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(cluster.topology.host_dir("client")),
            "LANG": "C.UTF-8", "METASERVE_URL": "http://api:8000", "METASERVE_API_KEY": cluster.api_key}

