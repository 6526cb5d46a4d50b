"""Does ``GET /metrics`` tell the truth? Its request-latency histogram against wrk's measured
latency of the same requests (issue 15: "p99 agrees with the load benchmark within one
bucket").

    python benchmarks/metrics_vs_load.py [--clients 50] [--seconds 20] [--json out.json]

A real ``metaserve serve`` on SQLite in a fresh directory (dispatcher off: only the API is
measured), one job; the poll phase of benchmarks/load.py (``--clients`` wrk connections, each
GET /v1/jobs/{id} every 0.25-0.75 s), then the same back to back. /metrics is scraped before
and after each phase; the phase's histogram is the difference. The server's p99 is the upper
bound of the first bucket holding 99% of the phase's requests (what Prometheus'
``histogram_quantile`` interpolates within); wrk's p99 should fall in that bucket or the one
next to it. The server times a request from its arrival in the application to its response
head; wrk from writing it to the last byte read, so wrk's figure is the larger.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.load import POLL_LUA, machine, run_wrk, wrk_version  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

ROUTE = "/v1/jobs/{job_id}"
TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}


def buckets(client) -> dict[float, float]:  # noqa: ANN001
    """Cumulative counts of GET /v1/jobs/{job_id} 200 by upper bound (seconds)."""
    text = client.get("/metrics").text
    found: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "metaserve_http_request_duration_seconds_bucket"
                    and labels.get("route") == ROUTE and labels.get("method") == "GET"
                    and labels.get("status") == "200"):
                found[float(labels["le"])] = sample.value
    return found


def p99_bucket(before: dict[float, float], after: dict[float, float]) -> tuple[int, list]:
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    index = next(i for i, count in enumerate(counts) if count >= 0.99 * total)
    return index, bounds


def phase(server: ServerProcess, client, name: str, interval_ms: int, clients: int,  # noqa: ANN001
          seconds: float, env: dict, directory: Path) -> dict:
    before = buckets(client)
    measured = run_wrk(POLL_LUA, server.url, clients, seconds,
                       {**env, "INTERVAL_MS": str(interval_ms)}, directory)
    after = buckets(client)
    index, bounds = p99_bucket(before, after)
    wrk_p99_s = measured["p99_ms"] / 1000
    wrk_index = next((i for i, bound in enumerate(bounds) if wrk_p99_s <= bound), len(bounds) - 1)
    lower = bounds[index - 1] if index else 0.0
    return {"phase": name, "requests_wrk": measured["requests"],
            "requests_metrics": int(after[bounds[-1]] - before.get(bounds[-1], 0.0)),
            "wrk_p50_ms": measured["p50_ms"], "wrk_p99_ms": measured["p99_ms"],
            "metrics_p99_bucket_ms": [round(lower * 1000, 2), round(bounds[index] * 1000, 2)],
            "buckets_apart": wrk_index - index, "agrees_within_one_bucket": abs(wrk_index - index) <= 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metaserve-metrics-") as name:
        directory = Path(name)
        server = ServerProcess(directory, METASERVE_DISPATCHER="false",
                               METASERVE_DATABASE_URL=f"sqlite:///{directory}/.metaserve/metaserve.db").start()
        try:
            client = server.client()
            job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC).json()["id"]
            env = {"API_KEY": server.admin_key, "RUN_ID": uuid.uuid4().hex[:8],
                   "POLL_PATH": f"/v1/jobs/{job_id}"}
            phases = [phase(server, client, "every 0.25-0.75 s", 500, arguments.clients,
                            arguments.seconds, env, directory),
                      phase(server, client, "back to back", 0, arguments.clients,
                            min(arguments.seconds, 10.0), env, directory)]
        finally:
            server.terminate()
    report = {"machine": machine(), "wrk": wrk_version(), "clients": arguments.clients,
              "seconds": arguments.seconds, "phases": phases}
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
