"""Hostile load: ``/healthz`` latency of a real ``metaserve serve`` while clients misbehave.

    python benchmarks/hostile_load.py [--seconds 20] [--rate 20] [--streams 300]
                                      [--adapt 45] [--header-mb 128] [--slow 1100]
                                      [--only a_quiet f_slow ...]
                                      [--json benchmarks/results/hostile_load.json]
                                      [--repeat N] [--variants NAME[:ENV=VALUE,...] ...]
                                      [--server-env ENV=VALUE ...] [--trace-gc] [--py-spy DIR]

``--variants`` serves the same directory once per variant, back to back (``--repeat`` times in
turn), each with its environment added: an A/B on one noisy machine within minutes (e.g.
``base:PYTHONPATH=/tmp/base`` for a copy of the code before a change). Every run records,
beside ``/healthz`` as the probe saw it: CPU and run-queue wait (time runnable while every
CPU was taken, ``/proc/*/task/*/schedstat``) of the server's event-loop thread, its other
threads, its child processes by kind and the probe itself (``scheduling``); the server's own
event-loop lag and GC pause histograms from ``GET /metrics`` (``server_metrics``); with
``--trace-gc``, each collection of generations 1 and 2 in the server (wall and CPU ms, objects
walked); with ``--py-spy``, a py-spy record of who held the GIL.

Loopback only: the server listens on 127.0.0.1 (its default), every client connects there.

Setup, in a fresh temporary directory:

1. ``metaserve serve`` on its embedded default (SQLite, the local Ray it starts) runs a tiny
   sine job to success: the job ``/adapt`` is called against. ``metaserve keys create
   streamNN --admin`` makes the keys of the stream users (``METASERVE_MAX_EVENT_STREAMS_PER_USER``
   is 20 per user: 300 streams need 15 users; admin keys, so that every user may stream the
   same job). The server is stopped (SIGTERM).
2. The same directory is served again with one setting changed:
   ``METASERVE_DRIVER_MEMORY_MB=1048576``, so that a second job stays ``queued`` ("waiting for
   resources: the job's driver asks 1024 GiB"); the dispatcher checks that against
   ``ray.nodes()`` every 10 s without starting any process. An SSE stream stays open only
   while its job is not terminal (on a finished job it replays the events and closes), so
   the streams follow that job. Everything else is the default, Ray included.

Then, each for ``--seconds`` at ``--rate`` requests/s (one keep-alive connection, on a fixed
schedule; latency = request written to response read, httpx in the main process):

a. quiet;
b. header: one client sends a ``--header-mb`` request head in 64 KiB chunks; the server
   answers 431 past 64 KiB and closes, the client starts again at once (``attempts`` counts);
c. streams: ``--streams`` SSE streams on ``GET /v1/jobs/{id}/events`` held open (opened
   before the measurement starts; each user's 21st would get 429);
d. adapt: ``--adapt`` ``POST /v1/jobs/{id}/adapt`` calls in flight at once, in waves (a wave
   ends when all its calls answered), not honouring Retry-After: the pool
   (``METASERVE_ADAPT_CONCURRENCY`` 2 + ``METASERVE_ADAPT_QUEUE`` 8) answers 503 beyond;
e. all three at once;
f. slow: ``--slow`` connections (from 127.0.0.2, .3, ..., 50 each) each sending ``POST
   /v1/jobs`` with ``Content-Length: 100000`` and then a byte every 5 s, half without a key
   (401 before the body is read), half with one (408 at ``METASERVE_BODY_TIMEOUT_S``), each
   reopened as soon as the server closes it: more than the server's connection cap (1,000,
   and 100 below its descriptor limit), so the cap evicts the longest-waiting one (503);
g. all four at once.

Each hostile client runs in a process of its own (``_load`` subcommand), bounded by a count
and a deadline, and stops on a stop file. The server is stopped in a ``finally``. Target:
``/healthz`` p99 < 50 ms. Before the runs the adapt processes are started by two adapt calls
(each imports torch: not what a run measures). Where the tail came from:
docs/notes/hostile-load-tail.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess, metaserve_executable  # noqa: E402

TINY_JOB = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "iterations": 20,
            "log_every": 10, "evaluation": {"every": 20, "tasks": 5, "inner_steps": [1]}}
P99_TARGET_MS = 50.0
STREAMS_PER_USER = 20  # METASERVE_MAX_EVENT_STREAMS_PER_USER's default
WAITING_DRIVER_MB = 1024 * 1024
CHUNK = 64 * 1024
READY_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0
LOADER_READY_TIMEOUT_S = 60.0
LOADER_EXIT_TIMEOUT_S = 30.0
SETTLE_S = 5.0
MAX_HEADER_ATTEMPTS = 100_000
MAX_ADAPT_WAVES = 10_000


# --------------------------------------------------------------------------- measurements

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def probe_healthz(url: str, seconds: float, rate: float) -> dict:
    """GET /healthz ``seconds × rate`` times on a fixed schedule over one keep-alive
    connection; a late answer delays the next request (``behind_schedule`` counts them)."""
    count = int(seconds * rate)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    behind = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        client.get("/healthz")  # open the connection before the clock starts
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            elif now - due > 1 / rate:
                behind += 1
            sent = time.perf_counter()
            try:
                response = client.get("/healthz")
                elapsed = (time.perf_counter() - sent) * 1000
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            except httpx.HTTPError as error:
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
    return {"requests": count, "ok": len(latencies), "errors": errors,
            "behind_schedule": behind,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else None,
            "mean_ms": sum(latencies) / len(latencies) if latencies else None}


# --------------------------------------------------------------------------- hostile clients
# Each runs in its own process: `hostile_load.py _load KIND CONFIG_JSON`. It prints "ready" on
# stdout once its load is on, stops when the stop file appears or its deadline passes, and
# writes its summary as JSON to the result file.

def split_url(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def ready() -> None:
    print("ready", flush=True)


def should_stop(config: dict) -> bool:
    return time.time() > config["deadline"] or Path(config["stop_file"]).exists()


def load_header(config: dict) -> dict:
    """Send a ``header_mb`` MB request head in 64 KiB chunks, again and again."""
    host, port = split_url(config["url"])
    total = config["header_mb"] * 2**20
    chunk = b"a" * CHUNK
    statuses: dict[str, int] = {}
    attempts, sent_bytes, completed_heads = 0, [], 0
    ready()
    while not should_stop(config) and attempts < MAX_HEADER_ATTEMPTS:
        attempts += 1
        sent = 0
        with socket.create_connection((host, port), timeout=5) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
                while sent < total and not should_stop(config):
                    sock.sendall(chunk)
                    sent += len(chunk)
                if sent >= total:
                    sock.sendall(b"\r\n\r\n")
                    completed_heads += 1
            except OSError:
                pass  # the server closed the connection (after its 431)
            try:
                first = sock.recv(64).split(b"\r\n", 1)[0].decode(errors="replace")
                status = first.split()[1] if first.startswith("HTTP/") else "closed"
            except OSError as error:
                status = type(error).__name__
        statuses[status] = statuses.get(status, 0) + 1
        sent_bytes.append(sent)
    return {"attempts": attempts, "statuses": statuses, "heads_sent_in_full": completed_heads,
            "bytes_sent_per_attempt_max": max(sent_bytes, default=0),
            "bytes_sent_total": sum(sent_bytes)}


async def _one_stream(host: str, port: int, path: str, key: str, config: dict,
                      opened: asyncio.Queue) -> dict:
    result = {"status": None, "bytes": 0, "closed_by_server": False}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as error:
        result["status"] = type(error).__name__
        await opened.put(result)
        return result
    try:
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                      f"Authorization: Bearer {key}\r\n\r\n").encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        parts = line.decode(errors="replace").split()
        result["status"] = parts[1] if len(parts) > 1 else "closed"
        await opened.put(result)
        while not should_stop(config):
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.5)
            except asyncio.TimeoutError:
                continue
            if not data:
                result["closed_by_server"] = not should_stop(config)
                break
            result["bytes"] += len(data)
    except (OSError, asyncio.TimeoutError) as error:
        if result["status"] is None:
            result["status"] = type(error).__name__
            await opened.put(result)
        else:
            result["closed_by_server"] = True
    finally:
        writer.close()
    return result


async def _streams(config: dict) -> dict:
    host, port = split_url(config["url"])
    path = f"/v1/jobs/{config['job_id']}/events"
    keys = config["keys"]
    opened: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_one_stream(host, port, path, keys[i // STREAMS_PER_USER],
                                             config, opened))
             for i in range(config["streams"])]
    answered = 0
    deadline = time.monotonic() + LOADER_READY_TIMEOUT_S
    while answered < len(tasks) and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(opened.get(), 1)
            answered += 1
        except asyncio.TimeoutError:
            pass
    ready()
    results = await asyncio.gather(*tasks)
    statuses: dict[str, int] = {}
    for result in results:
        statuses[str(result["status"])] = statuses.get(str(result["status"]), 0) + 1
    return {"streams": len(tasks), "statuses": statuses,
            "open_until_the_end": sum(1 for r in results
                                      if r["status"] == "200" and not r["closed_by_server"]),
            "closed_by_server": sum(1 for r in results if r["closed_by_server"]),
            "bytes_received": sum(r["bytes"] for r in results)}


def load_streams(config: dict) -> dict:
    return asyncio.run(_streams(config))


async def _adapt(config: dict) -> dict:
    body = {"support_x": [[x / 5] for x in range(-25, 25, 5)],
            "support_y": [[(x / 5) ** 2 / 10] for x in range(-25, 25, 5)],
            "query_x": [[x / 20] for x in range(-100, 100, 2)]}
    statuses: dict[str, int] = {}
    ok_latencies: list[float] = []
    waves = 0
    limits = httpx.Limits(max_connections=config["adapt"], max_keepalive_connections=config["adapt"])
    async with httpx.AsyncClient(base_url=config["url"], timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {config['admin_key']}"}) as client:
        async def one() -> None:
            started = time.perf_counter()
            try:
                response = await client.post(f"/v1/jobs/{config['adapt_job_id']}/adapt", json=body)
                status = str(response.status_code)
                if response.status_code == 200:
                    ok_latencies.append((time.perf_counter() - started) * 1000)
            except httpx.HTTPError as error:
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1

        ready()
        while not should_stop(config) and waves < MAX_ADAPT_WAVES:
            waves += 1
            await asyncio.gather(*(one() for _ in range(config["adapt"])))
    return {"parallel": config["adapt"], "waves": waves, "calls": sum(statuses.values()),
            "statuses": statuses, "503s": statuses.get("503", 0),
            "ok_p50_ms": percentile(ok_latencies, 50), "ok_max_ms": max(ok_latencies, default=None)}


def load_adapt(config: dict) -> dict:
    return asyncio.run(_adapt(config))


async def _slow(config: dict) -> dict:
    """``slow`` connections, each ``POST /v1/jobs`` with ``Content-Length: 100000`` and then a
    body byte every ``SLOW_BYTE_EVERY_S``; half without a key (answered 401 before the body),
    half with a valid key (held until the body timeout: 408). Each connection the server
    closes is opened again at once. From 127.0.0.2, .3, ... (``SLOW_PER_ADDRESS`` each): the
    per-address cap does not stop them, only the total cap does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, config["slow"] + 500)), hard))
    host, port = split_url(config["url"])
    statuses: dict[str, int] = {}
    opened = 0

    async def one(index: int) -> None:
        nonlocal opened
        key = config["admin_key"] if index % 2 else None
        head = (b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n"
                + (f"Authorization: Bearer {key}\r\n".encode() if key else b"") + b"\r\n")
        source = (f"127.0.0.{2 + index // SLOW_PER_ADDRESS}", 0)
        while not should_stop(config):
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=source)
            except OSError as error:
                statuses[type(error).__name__] = statuses.get(type(error).__name__, 0) + 1
                await asyncio.sleep(1)
                continue
            opened += 1
            try:
                writer.write(head)
                while not should_stop(config):
                    writer.write(b"{")
                    await writer.drain()
                    try:
                        line = await asyncio.wait_for(reader.readline(), SLOW_BYTE_EVERY_S)
                    except asyncio.TimeoutError:
                        continue
                    status = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "closed"
                    statuses[status] = statuses.get(status, 0) + 1
                    break
            except OSError as error:
                statuses[type(error).__name__] = statuses.get(type(error).__name__, 0) + 1
            finally:
                writer.close()

    tasks = [asyncio.create_task(one(index)) for index in range(config["slow"])]
    await asyncio.sleep(2)  # the first connections are open
    ready()
    await asyncio.gather(*tasks)
    return {"connections": config["slow"], "opened": opened, "statuses": statuses}


def load_slow(config: dict) -> dict:
    return asyncio.run(_slow(config))


LOADERS = {"header": load_header, "streams": load_streams, "adapt": load_adapt,
           "slow": load_slow}
SLOW_BYTE_EVERY_S = 5.0
SLOW_PER_ADDRESS = 50


def run_loader(kind: str, config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    result = LOADERS[kind](config)
    Path(config["result_file"]).write_text(json.dumps(result))


class Loaders:
    """Hostile clients in processes of their own, started together and stopped together."""

    def __init__(self, workdir: Path, kinds: list[str], config: dict):
        self.workdir = workdir
        self.kinds = kinds
        self.config = config
        self.stop_file = workdir / f"stop-{time.monotonic_ns()}"
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "Loaders":
        for kind in self.kinds:
            config = {**self.config, "stop_file": str(self.stop_file),
                      "result_file": str(self.workdir / f"{kind}-{time.monotonic_ns()}.json")}
            path = self.workdir / f"{kind}-config.json"
            path.write_text(json.dumps(config))
            self.processes[kind] = subprocess.Popen(
                [sys.executable, __file__, "_load", kind, str(path)],
                stdout=subprocess.PIPE, text=True)
            self.processes[kind].result_file = config["result_file"]  # type: ignore[attr-defined]
        for kind, process in self.processes.items():
            line = _readline(process, LOADER_READY_TIMEOUT_S + 10)
            if line.strip() != "ready":
                raise RuntimeError(f"the {kind} client did not start: {line!r}")
        return self

    def results(self) -> dict:
        self.stop_file.touch()
        out = {}
        for kind, process in self.processes.items():
            try:
                process.wait(timeout=LOADER_EXIT_TIMEOUT_S)
                out[kind] = json.loads(Path(process.result_file).read_text())  # type: ignore[attr-defined]
            except (subprocess.TimeoutExpired, OSError, ValueError) as error:
                out[kind] = {"error": f"no result: {error!r}"}
        return out

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def _readline(process: subprocess.Popen, timeout: float) -> str:
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        if not selector.select(timeout):
            return "(timed out)"
        return process.stdout.readline()
    finally:
        selector.close()


# --------------------------------------------------------------------------- setup

def machine() -> dict:
    from machine import cpu_model  # noqa: PLC0415 (benchmarks/, beside this script)

    cpu = cpu_model()
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _schedstat(path: Path) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread."""
    try:
        run_ns, wait_ns, _ = Path(path, "schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def scheduling(server_pid: int) -> dict:
    """CPU and run-queue wait (seconds, cumulative) of: the server's event-loop thread (its
    main thread), its other threads, each group of its descendant processes by name (the
    adapt processes, Ray's), and this process's main thread (the probe). Diffed per run by
    :func:`scheduling_delta`: a thread's run-queue wait is time it was ready but every CPU was
    taken, which no change inside the server's own code can shorten."""
    out: dict[str, list[float]] = {}

    def add(name: str, cpu_wait: tuple[float, float]) -> None:
        total = out.setdefault(name, [0.0, 0.0])
        total[0] += cpu_wait[0]
        total[1] += cpu_wait[1]

    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        add("server_loop_thread" if task.name == str(server_pid) else "server_other_threads",
            _schedstat(task))
    seen, stack = set(), _children(server_pid)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        name = ("adapt_processes" if "multiprocessing" in cmdline else
                "dataset_conversion" if "dataset_ingest" in cmdline else f"child:{comm}")
        for task in Path(f"/proc/{pid}/task").glob("*"):
            add(name, _schedstat(task))
        stack += _children(pid)
    add("probe_thread", _schedstat(Path(f"/proc/self/task/{os.getpid()}")))
    return out


def scheduling_delta(before: dict, after: dict, seconds: float) -> dict:
    """Per group: CPU cores used and run-queue wait per second of the run."""
    return {name: {"cpu_cores": round((cpu - before.get(name, [0, 0])[0]) / seconds, 3),
                   "runqueue_wait_per_s": round((wait - before.get(name, [0, 0])[1]) / seconds, 3)}
            for name, (cpu, wait) in sorted(after.items())}


def scrape(client: httpx.Client) -> dict[str, float]:
    """The server's own histograms from ``GET /metrics``: event-loop lag, GC pauses, and
    ``/healthz`` as the server timed it (from its first byte read)."""
    wanted = ("metaserve_event_loop_lag_seconds", "metaserve_gc_pause_seconds",
              'metaserve_http_request_duration_seconds_bucket{method="GET",route="/healthz"')
    values: dict[str, float] = {}
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return values
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def scrape_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """Counts per histogram bucket over the run, as ``{"le": count}`` per series."""
    series: dict[str, dict[str, float]] = {}
    for name, value in after.items():
        delta = value - before.get(name, 0.0)
        base, _, labels = name.partition("{")
        le = ""
        if 'le="' in labels:
            le = labels.split('le="', 1)[1].split('"', 1)[0]
        generation = labels.split('generation="', 1)[1].split('"', 1)[0] if "generation" in labels else ""
        suffix = base.rsplit("_", 1)[1]
        key = base.removesuffix(f"_{suffix}") + (f"[gen{generation}]" if generation else "")
        series.setdefault(key, {})[le if suffix == "bucket" else suffix] = round(delta, 4)
    return series


def wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def wait_ready(client: httpx.Client) -> None:
    wait_for(lambda: client.get("/readyz").json().get("dispatcher") == "ready",
             READY_TIMEOUT_S, "/readyz: dispatcher ready")


def create_keys(directory: Path, count: int) -> list[str]:
    url = f"sqlite:///{directory / '.metaserve' / 'metaserve.db'}"
    keys = []
    for i in range(count):
        result = subprocess.run([metaserve_executable(), "keys", "create", f"stream{i:02d}",
                                 "--admin", "--url", url], capture_output=True, text=True,
                                timeout=60, check=True, cwd=directory)
        keys.append(result.stdout.strip().splitlines()[-1])
    return keys


def prepare(directory: Path, users: int) -> tuple[str, list[str]]:
    """First server: the succeeded job to adapt against, and the stream users' keys."""
    server = ServerProcess(directory)
    try:
        server.start()
        with server.client() as client:
            wait_ready(client)
            job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
            job = wait_for(lambda: (lambda j: j if j["status"] in {"succeeded", "failed",
                                                                   "cancelled"} else None)(
                client.get(f"/v1/jobs/{job_id}").json()), JOB_TIMEOUT_S, "the sine job")
            if job["status"] != "succeeded":
                raise RuntimeError(f"the sine job did not succeed: {job}")
        keys = create_keys(directory, users)
    finally:
        if server.process is not None:
            server.terminate()
    return job_id, keys


def py_spy(pid: int, directory: Path | None, name: str, seconds: float):  # noqa: ANN201
    """``py-spy record`` of the server for ``seconds`` (None when not asked for)."""
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(executable), "record", "-p", str(pid), "-d", str(int(seconds)),
                             "-r", "200", "--threads", "--gil", "-f", "raw", "--nonblocking",
                             "-o", str(directory / f"{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


GC_TRACE = """
import sys
if sys.argv[1:2] == ["serve"] and sys.argv[0].endswith("metaserve"):
    import gc, json, os, threading, time
    _path = os.environ["HOSTILE_GC_TRACE"]
    _start = {}

    def _trace(phase, info):
        generation = info.get("generation")
        if generation < 1:
            return
        if phase == "start":
            _start.update(objects=len(gc.get_objects(generation)) if generation == 2 else None,
                          wall=time.perf_counter(), cpu=time.thread_time())
            return
        record = {"t": time.time(), "generation": generation, "objects": _start["objects"],
                  "wall_ms": round((time.perf_counter() - _start["wall"]) * 1000, 2),
                  "cpu_ms": round((time.thread_time() - _start["cpu"]) * 1000, 2),
                  "collected": info.get("collected"),
                  "thread": threading.current_thread().name}
        with open(_path, "a") as out:
            out.write(json.dumps(record) + "\\n")

    gc.callbacks.append(_trace)
"""
"""``--trace-gc``: a ``sitecustomize`` for the measured server only: each collection of
generation 1 or 2 (wall and CPU ms of the thread that ran it, objects in generation 2)."""


def gc_trace_env(directory: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the GC trace's ``sitecustomize`` first on PYTHONPATH."""
    trace = directory / "gc-trace"
    trace.mkdir(exist_ok=True)
    (trace / "sitecustomize.py").write_text(GC_TRACE)
    path = os.pathsep.join(p for p in (str(trace), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "HOSTILE_GC_TRACE": str(directory / "gc-trace.jsonl")}


def gc_records(path: Path, since: float, until: float) -> dict:
    """The traced collections of generation 1 and 2 between ``since`` and ``until``."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if since <= record["t"] <= until:
                records.append(record)
    out = {}
    for generation in (1, 2):
        mine = [r for r in records if r["generation"] == generation]
        out[f"gen{generation}"] = {
            "count": len(mine),
            "cpu_ms": sorted(r["cpu_ms"] for r in mine)[-10:],
            "wall_ms": sorted(r["wall_ms"] for r in mine)[-10:],
            "objects": [r["objects"] for r in mine][:10] if generation == 2 else None}
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:ENV=VALUE,ENV=VALUE``."""
    name, _, rest = text.partition(":")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def summary(runs: dict) -> dict:
    """p99 per scenario (and variant): every value in run order and their median."""
    grouped: dict[str, list[float]] = {}
    for key, run in runs.items():
        grouped.setdefault(key.split("#", 1)[0], []).append(run["healthz"]["p99_ms"] or 1e9)
    out = {}
    for key, values in grouped.items():
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = (ordered[middle] if len(ordered) % 2
                  else (ordered[middle - 1] + ordered[middle]) / 2)
        out[key] = {"p99_ms": [round(v, 1) for v in values], "median_p99_ms": round(median, 1)}
    return out


def warm_adapt_processes(server: ServerProcess, job_id: str, slots: int = 2) -> None:
    """``slots`` (``METASERVE_ADAPT_CONCURRENCY``'s default) adapt calls at once before any
    run, so that no run measures the adapt processes' start (each imports torch)."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"support_x": [[0.0]], "support_y": [[0.0]], "query_x": [[0.0]]}

    def call(_: int) -> int:
        with server.client() as client:
            client.timeout = httpx.Timeout(300)
            return client.post(f"/v1/jobs/{job_id}/adapt", json=body).status_code

    with ThreadPoolExecutor(slots) as pool:
        statuses = list(pool.map(call, range(slots)))
    if statuses != [200] * slots:
        raise RuntimeError(f"warming the adapt processes answered {statuses}")


def measure_server(directory: Path, env: dict[str, str], runs: dict[str, list[str]],
                   suffix: str, args: argparse.Namespace, report: dict, state: dict,
                   adapt_job_id: str, keys: list[str]) -> None:
    """Serve ``directory`` with ``env`` (and the waiting driver), make sure the streams' job
    waits for resources, and measure each of ``runs``."""
    if args.trace_gc:
        env = gc_trace_env(directory, env)
    server = ServerProcess(directory, METASERVE_DRIVER_MEMORY_MB=str(WAITING_DRIVER_MB), **env)
    try:
        server.start()
        with server.client() as client:
            wait_ready(client)
            if state["waiting_id"] is None:
                state["waiting_id"] = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
            waiting_id = state["waiting_id"]
            waiting = wait_for(lambda: (lambda j: j if (j.get("message") or "").startswith(
                "waiting") else None)(client.get(f"/v1/jobs/{waiting_id}").json()),
                60, "the stream job to wait for resources")
        report["stream_job"] = {"status": waiting["status"], "message": waiting["message"]}
        warm_adapt_processes(server, adapt_job_id)
        config = {"url": server.url, "deadline": 0.0, "job_id": waiting_id, "keys": keys,
                  "streams": args.streams, "adapt": args.adapt, "header_mb": args.header_mb,
                  "slow": args.slow,
                  "adapt_job_id": adapt_job_id, "admin_key": server.admin_key}
        for name, kinds in runs.items():
            time.sleep(SETTLE_S)
            config["deadline"] = time.time() + LOADER_READY_TIMEOUT_S + args.seconds + 30
            load_before = os.getloadavg()
            with Loaders(directory, kinds, config) as loaders, server.client() as client:
                spy = py_spy(server.process.pid, args.py_spy, name + suffix, args.seconds)
                metrics_before = scrape(client)
                sched_before = scheduling(server.process.pid)
                cpu_before, wall_before = cpu_seconds(server.process.pid), time.monotonic()
                since = time.time()
                healthz = probe_healthz(server.url, args.seconds, args.rate)
                until = time.time()
                wall = time.monotonic() - wall_before
                server_cpu = (cpu_seconds(server.process.pid) - cpu_before) / wall
                sched = scheduling_delta(sched_before, scheduling(server.process.pid), wall)
                metrics = scrape_delta(metrics_before, scrape(client))
                clients = loaders.results()
                if spy is not None:
                    spy.wait(timeout=60)
            healthz["server_cpu_cores"] = round(server_cpu, 2)  # while probing
            with server.client() as client:
                still = client.get(f"/v1/jobs/{waiting_id}").json()["status"]
            report["runs"][name + suffix] = {
                "healthz": healthz, "clients": clients, "load_average_before": load_before,
                "scheduling": sched, "server_metrics": metrics, "server_env": env,
                **({"gc": gc_records(directory / "gc-trace.jsonl", since, until)}
                   if args.trace_gc else {}),
                "stream_job_status_after": still}
            print(name + suffix, json.dumps(healthz), json.dumps(clients), flush=True)
    finally:
        if server.process is not None:
            server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--adapt", type=int, default=45)
    parser.add_argument("--header-mb", type=int, default=128)
    parser.add_argument("--slow", type=int, default=1100,
                        help="slow-body connections held at once (f, g)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these (e.g. a_quiet f_slow)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record the server with py-spy (--threads --gil, raw: who holds the GIL) "
                             "during each run into DIR/<run>.txt")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="more environment for the measured server (A/B of a setting)")
    parser.add_argument("--trace-gc", action="store_true",
                        help="trace the server's collections of generations 1 and 2 (wall and "
                             "CPU ms each) during each run")
    parser.add_argument("--variants", nargs="*", default=[], metavar="NAME[:ENV=VALUE,...]",
                        help="serve once per variant (its environment added), back to back, "
                             "and measure each run under each; runs are named RUN@NAME")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every variant this many times, in turn (RUN#N)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/hostile_load.json")
    args = parser.parse_args()
    users = -(-args.streams // STREAMS_PER_USER)

    report: dict = {"command": "python " + " ".join(
                        [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
                    "machine": machine(), "load_average_before": os.getloadavg(),
                    "settings": {"seconds": args.seconds, "rate_per_s": args.rate,
                                 "streams": args.streams, "stream_users": users,
                                 "adapt_parallel": args.adapt, "header_mb": args.header_mb,
                                 "slow_connections": args.slow,
                                 "server_env": {"METASERVE_DRIVER_MEMORY_MB": str(WAITING_DRIVER_MB)}},
                    "target_p99_ms": P99_TARGET_MS, "runs": {}}
    variants = [parse_variant(text) for text in args.variants] or [("", {})]
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    report["settings"]["server_env"].update(extra_env)
    if args.variants:
        report["variants"] = {name: env for name, env in variants}
    report["repeat"] = args.repeat
    runs = {"a_quiet": [], "b_header": ["header"], "c_streams": ["streams"],
            "d_adapt": ["adapt"], "e_all": ["header", "streams", "adapt"],
            "f_slow": ["slow"], "g_all_and_slow": ["header", "streams", "adapt", "slow"]}
    if args.only:
        runs = {name: kinds for name, kinds in runs.items() if name in args.only}
    with tempfile.TemporaryDirectory(prefix="metaserve-hostile-") as tmp:
        directory = Path(tmp)
        started = time.monotonic()
        adapt_job_id, keys = prepare(directory, users)
        state: dict = {"waiting_id": None}
        for rep in range(1, args.repeat + 1):
            for variant, env in variants:
                suffix = (f"@{variant}" if args.variants else "") + (
                    f"#{rep}" if args.repeat > 1 else "")
                measure_server(directory, {**extra_env, **env}, runs, suffix, args, report,
                               state, adapt_job_id, keys)
                report.setdefault("setup_s", round(time.monotonic() - started, 1))
    report["summary"] = summary(report["runs"])
    report["load_average_after"] = os.getloadavg()
    report["met_target"] = {name: (run["healthz"]["p99_ms"] or 1e9) < P99_TARGET_MS
                            for name, run in report["runs"].items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_load":
        run_loader(sys.argv[2], sys.argv[3])
    else:
        main()
