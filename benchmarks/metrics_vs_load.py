"""Does ``GET /metrics`` tell the truth? Its request-latency histogram against wrk's measured
latency of the same requests (issue 15: "p99 agrees with the load benchmark within one
bucket").

    python benchmarks/metrics_vs_load.py [--runs 3] [--clients 50] [--seconds 20]
                                         [--packets] [--json out.json]

Each run: a fresh ``metaserve serve`` on SQLite in a fresh directory (dispatcher off: only
the API is measured), one job, measured once the server has frozen its start-up objects
(``metaserve_gc_frozen_objects`` above 0) and settled; then the poll phases of
benchmarks/load.py: ``--clients`` wrk connections each GET /v1/jobs/{id} every 0.25-0.75 s
(an open load of 100 polls/s), then back to back (saturated).

The comparison is of the same requests: only ``GET /v1/jobs/{job_id}`` answered 200 (wrk
sends nothing else; its count is checked against the server's), in the same window:
/metrics is scraped just before wrk starts and again once the requests wrk left in flight
have been answered, and the phase's histogram is the difference. The server's p99 is the
bucket holding the 99th percentile of the phase's requests, plus the value Prometheus'
``histogram_quantile`` would interpolate within it; wrk's p99 (its exact percentile, from
writing a request to reading the last byte of its response) is placed in the same buckets,
and the indices are compared ("within one bucket": at most 1 apart).

The server times a request from reading its first byte to handing over its response's last
byte. What wrk sees and it cannot: a request that arrives while the event loop is stalled
waits unread in its socket. So each phase also reports, from the same two scrapes, the
event loop's lag (``metaserve_event_loop_lag_seconds``: the largest bucket reached, and how
many probes found it 100 ms late or more) and the process's full garbage collections
(``metaserve_gc_pause_seconds{generation="2"}``). ``--packets`` (root and tcpdump) also
records the loopback packets of the phase: each request's first packet to its response's
last, the kernel's view of the same latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.load import POLL_LUA, machine, run_wrk, wrk_version  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

ROUTE = "/v1/jobs/{job_id}"
TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
FREEZE_WAIT_S = 90.0
SETTLE_S = 3.0
IN_FLIGHT_WAIT_S = 1.0
STALL_S = 0.1


def load_average() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def scrape(client) -> dict:  # noqa: ANN001
    """The histograms this benchmark reads, cumulative counts by upper bound (seconds)."""
    found: dict = {"poll": {}, "lag": {}, "gc2": {}, "gc2_sum": 0.0, "frozen": 0.0}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "metaserve_http_request_duration_seconds_bucket"
                    and labels.get("route") == ROUTE and labels.get("method") == "GET"
                    and labels.get("status") == "200"):
                found["poll"][float(labels["le"])] = sample.value
            elif sample.name == "metaserve_event_loop_lag_seconds_bucket":
                found["lag"][float(labels["le"])] = sample.value
            elif (sample.name == "metaserve_gc_pause_seconds_bucket"
                  and labels.get("generation") == "2"):
                found["gc2"][float(labels["le"])] = sample.value
            elif sample.name == "metaserve_gc_frozen_objects":
                found["frozen"] = sample.value
            elif (sample.name == "metaserve_gc_pause_seconds_sum"
                  and labels.get("generation") == "2"):
                found["gc2_sum"] = sample.value
    return found


def difference(before: dict[float, float], after: dict[float, float]) -> tuple[list, list]:
    """Upper bounds (ascending, +Inf last) and the phase's cumulative counts."""
    bounds = sorted(after)
    return bounds, [after[b] - before.get(b, 0.0) for b in bounds]


def quantile_bucket(bounds: list[float], cumulative: list[float], q: float) -> tuple[int, float]:
    """The index of the bucket holding quantile ``q``, and the value histogram_quantile
    interpolates linearly inside it."""
    rank = q * cumulative[-1]
    index = next(i for i, count in enumerate(cumulative) if count >= rank)
    if index == len(bounds) - 1:  # +Inf: Prometheus answers the highest finite bound
        return index, bounds[-2]
    lower = bounds[index - 1] if index else 0.0
    below = cumulative[index - 1] if index else 0.0
    inside = cumulative[index] - below
    return index, lower + (bounds[index] - lower) * ((rank - below) / inside if inside else 1.0)


def bucket_of(bounds: list[float], seconds: float) -> int:
    return next(i for i, bound in enumerate(bounds) if seconds <= bound)


def milliseconds(bound: float) -> float | str:
    return "+Inf" if bound == float("inf") else round(bound * 1000, 3)


class Packets:
    """tcpdump on the loopback: for each request (a packet to the server's port carrying
    data), the time to the last data packet back on its connection before the next request."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port, self.path = port, directory / f"phase-{uuid.uuid4().hex[:8]}.pcap"
        payload = "(((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)"
        self.process = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-B", "32768", "-w", str(self.path),
             f"tcp port {port} and {payload}"], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # tcpdump listening

    def latencies(self) -> list[float]:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)
        text = subprocess.run(["tcpdump", "-r", str(self.path), "-tt", "-n"],
                              capture_output=True, text=True, check=True).stdout
        events: dict[int, list[tuple[str, float]]] = defaultdict(list)
        for line in text.splitlines():
            fields = line.split()
            source, target = fields[2], fields[4].rstrip(":")
            source_port, target_port = int(source.rsplit(".", 1)[1]), int(target.rsplit(".", 1)[1])
            if target_port == self.port:
                events[source_port].append(("request", float(fields[0])))
            else:
                events[target_port].append(("response", float(fields[0])))
        found = []
        for sequence in events.values():
            sent = answered = None
            for kind, at in sequence + [("request", 0.0)]:
                if kind == "request":
                    if sent is not None and answered is not None:
                        found.append(answered - sent)
                    sent, answered = at, None
                else:
                    answered = at
        return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase(server: ServerProcess, client, name: str, interval_ms: int, clients: int,  # noqa: ANN001
          seconds: float, env: dict, directory: Path, packets: bool) -> dict:
    capture = Packets(server.port, directory) if packets else None
    load_before = load_average()
    before = scrape(client)
    measured = run_wrk(POLL_LUA, server.url, clients, seconds,
                       {**env, "INTERVAL_MS": str(interval_ms)}, directory)
    time.sleep(IN_FLIGHT_WAIT_S)  # the requests wrk left in flight are answered
    after = scrape(client)
    load_after = load_average()
    bounds, cumulative = difference(before["poll"], after["poll"])
    index, interpolated = quantile_bucket(bounds, cumulative, 0.99)
    wrk_p99_s = measured["p99_ms"] / 1000
    wrk_index = bucket_of(bounds, wrk_p99_s)
    lag_bounds, lag = difference(before["lag"], after["lag"])
    largest_lag = next(i for i, count in enumerate(lag) if count == lag[-1])
    stalls = lag[-1] - lag[bucket_of(lag_bounds, STALL_S) - 1]
    gc_bounds, gc2 = difference(before["gc2"], after["gc2"])
    report = {
        "phase": name, "load_average_before": load_before, "load_average_after": load_after,
        "requests_wrk": measured["requests"], "requests_metrics": int(cumulative[-1]),
        "wrk_errors": measured["errors"],
        "wrk_p50_ms": measured["p50_ms"], "wrk_p99_ms": measured["p99_ms"],
        "wrk_max_ms": measured["max_ms"],
        "wrk_p99_bucket": {"index": wrk_index, "ms": [milliseconds(bounds[wrk_index - 1])
                                                     if wrk_index else 0.0,
                                                     milliseconds(bounds[wrk_index])]},
        "metrics_p99_bucket": {"index": index, "ms": [milliseconds(bounds[index - 1])
                                                      if index else 0.0,
                                                      milliseconds(bounds[index])]},
        "metrics_p99_interpolated_ms": round(interpolated * 1000, 2),
        "buckets_apart": wrk_index - index,
        "agrees_within_one_bucket": abs(wrk_index - index) <= 1,
        "loop_lag_probes": int(lag[-1]),
        "loop_lag_probes_100ms_or_more": int(stalls),
        "loop_lag_largest_bucket_ms": [milliseconds(lag_bounds[largest_lag - 1])
                                       if largest_lag else 0.0,
                                       milliseconds(lag_bounds[largest_lag])],
        "full_gc_collections": int(gc2[-1]),
        "full_gc_seconds": round(after["gc2_sum"] - before["gc2_sum"], 4),
    }
    if capture is not None:
        kernel = capture.latencies()
        report["packets"] = {"requests": len(kernel),
                             "p50_ms": round(percentile(kernel, 0.50) * 1000, 2),
                             "p99_ms": round(percentile(kernel, 0.99) * 1000, 2),
                             "p99_bucket_index": bucket_of(bounds, percentile(kernel, 0.99))}
    return report


def wait_for_freeze(client, timeout_s: float = FREEZE_WAIT_S) -> None:  # noqa: ANN001
    """``metaserve serve`` freezes its start-up objects after a warm-up and one full
    collection (api/app.py); measure after that, as a server that has been up a while."""
    deadline = time.monotonic() + timeout_s
    while not scrape(client)["frozen"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not freeze its start-up objects")
        time.sleep(0.5)
    time.sleep(SETTLE_S)


def one_run(arguments: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="metaserve-metrics-") as name:
        directory = Path(name)
        server = ServerProcess(directory, METASERVE_DISPATCHER="false",
                               METASERVE_DATABASE_URL=f"sqlite:///{directory}/.metaserve/metaserve.db").start()
        try:
            client = server.client()
            job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC).json()["id"]
            wait_for_freeze(client)
            env = {"API_KEY": server.admin_key, "RUN_ID": uuid.uuid4().hex[:8],
                   "POLL_PATH": f"/v1/jobs/{job_id}"}
            return {"phases": [
                phase(server, client, "every 0.25-0.75 s", 500, arguments.clients,
                      arguments.seconds, env, directory, arguments.packets),
                phase(server, client, "back to back", 0, arguments.clients,
                      min(arguments.seconds, 10.0), env, directory, arguments.packets)]}
        finally:
            server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--packets", action="store_true",
                        help="Also time each request from its loopback packets (tcpdump, root).")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if arguments.packets and (shutil.which("tcpdump") is None or os.geteuid() != 0):
        raise SystemExit("--packets needs tcpdump and root")
    report = {"machine": machine(), "wrk": wrk_version(), "clients": arguments.clients,
              "seconds": arguments.seconds,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    for _ in range(arguments.runs):
        report["runs"].append(one_run(arguments))
        text = json.dumps(report, indent=2)
        if arguments.json:  # after every run: a run cut short keeps the earlier ones
            arguments.json.parent.mkdir(parents=True, exist_ok=True)
            arguments.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
