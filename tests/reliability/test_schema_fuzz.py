"""Schema fuzzing: schemathesis generates requests for every operation of the live OpenAPI
document (valid ones, and — its negative mode — invalid ones), sends them with a valid API
key to the ASGI app, and runs all its checks on every response: no 5xx, the status code,
content type, headers and body conform to the schema, invalid data is rejected, valid data
accepted, and a request without credentials is refused.

Half of the generated ``job_id``s are replaced by a real job (cancelled, with metrics and a
registered artifact), so the routes behind the 404 are fuzzed too. Examples per operation:
``METASERVE_FUZZ_EXAMPLES`` (default :data:`DEFAULT_EXAMPLES`; the longer run whose figures
are in docs/RELIABILITY.md sets it higher).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from metaserve.api.app import create_app
from metaserve.service import artifacts, auth, job_store
from metaserve.service.settings import Settings

# Minutes: schemathesis walks every operation, on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.slow, pytest.mark.dialects]

DEFAULT_EXAMPLES = 12
FUZZ_EXAMPLES = int(os.environ.get("METASERVE_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
TWO_LINE_SPEC = {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}
DEFAULT_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429"]

# Where a schema-valid request may still be refused with a 4xx, because what makes it
# valid cannot be said in JSON Schema. Every other operation must accept valid data.
SEMANTIC_REFUSALS = [
    # Cross-field bounds of a spec, e.g. task_family.phase [low, high] needs low ≤ high: 422.
    {"include-name": "POST /v1/jobs",
     "checks": {"positive_data_acceptance": {"expected-statuses": [*DEFAULT_ACCEPTED, "422"]}}},
    # A sweep's space is checked against its spec (a path the spec has, low ≤ high, every
    # sampled spec a valid job): 422 naming the path.
    {"include-name": "POST /v1/sweeps",
     "checks": {"positive_data_acceptance": {"expected-statuses": [*DEFAULT_ACCEPTED, "422"]}}},
    # A dataset upload's bytes must be an archive this server reads: 422 (or 413 past a cap).
    {"include-name": "POST /v1/datasets",
     "checks": {"positive_data_acceptance": {"expected-statuses": [*DEFAULT_ACCEPTED, "413", "422"]}}},
    # A cursor is opaque: only one returned by a previous page is valid: 400. A status list
    # names job statuses, a sort key a column, a metric or a spec path: 422 naming the field.
    {"include-name": "GET /v1/jobs",
     "checks": {"positive_data_acceptance": {"expected-statuses": [*DEFAULT_ACCEPTED, "400",
                                                                   "422"]}}},
    {"include-name": "GET /v1/sweeps",
     "checks": {"positive_data_acceptance": {"expected-statuses": [*DEFAULT_ACCEPTED, "400"]}}},
]


def fuzz_schema(app) -> schemathesis.schemas.BaseSchema:  # noqa: ANN001
    config = SchemathesisConfig.from_dict({"operations": SEMANTIC_REFUSALS})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


@pytest.fixture
def fuzz_target(engine, sessions, db_url: str, tmp_path: Path) -> Iterator[tuple]:  # noqa: ANN001
    """The app, alice's key, and her cancelled job with metrics and one artifact."""
    settings_ = Settings(database_url=db_url, dispatcher=False,
                         artifact_root=tmp_path / "artifacts", data_dir=tmp_path)
    app = create_app(settings_)
    with sessions() as session:
        _, key = auth.create_key(session=session, name="alice")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        job_id = client.post("/v1/jobs", json=TWO_LINE_SPEC, headers=headers).json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
        with sessions.begin() as session:
            job_store.add_metrics(session=session, job_id=job_id,
                                  rows=[(1, "train/loss", 0.5), (2, "train/loss", float("nan"))])
        recipe = artifacts.job_dir(settings_.artifact_root, job_id) / "meta_init.json"
        recipe.parent.mkdir(parents=True)
        recipe.write_text(json.dumps({"recipe": {"algorithm": "maml"}}))
        described = artifacts.describe(recipe)
        with sessions.begin() as session:
            job_store.add_artifact(session=session, job_id=job_id, name=described.name,
                                   size=described.size, sha256=described.sha256,
                                   media_type=described.media_type)
        yield app, headers, job_id


def run_operation(operation, headers: dict[str, str], job_id: str) -> int:  # noqa: ANN001
    """Fuzz one operation; returns the number of cases sent (raises on the first failure)."""
    sent = 0
    has_job_id = "{job_id}" in operation.path

    @given(case=operation.as_strategy(), use_real_job=st.booleans())
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case, use_real_job: bool) -> None:  # noqa: ANN001
        nonlocal sent
        if has_job_id and use_real_job:
            case.path_parameters = {**(case.path_parameters or {}), "job_id": job_id}
        sent += 1
        case.call_and_validate(headers=headers)

    fuzz()
    return sent


def test_every_operation_passes_all_schemathesis_checks(fuzz_target) -> None:  # noqa: ANN001
    app, headers, job_id = fuzz_target
    schema = fuzz_schema(app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/jobs", "GET /v1/jobs", "GET /v1/jobs/{job_id}",
        "POST /v1/jobs/{job_id}/cancel", "GET /v1/jobs/{job_id}/metrics",
        "GET /v1/jobs/{job_id}/artifacts", "GET /v1/jobs/{job_id}/artifacts/{name}",
        "GET /v1/jobs/{job_id}/events", "POST /v1/jobs/{job_id}/adapt",
        "GET /v1/algorithms", "GET /v1/task-families", "GET /healthz", "GET /readyz"}
    failures: dict[str, str] = {}
    cases = 0
    # The list stream never ends by design (a page keeps it open; tests/api/
    # test_job_list_stream.py reads it over HTTP): the in-process client would wait forever.
    operations = [op for op in operations if op.label != "GET /v1/jobs/stream"]
    for operation in operations:
        try:
            cases += run_operation(operation, headers, job_id)
        # schemathesis' FailureGroup is a BaseExceptionGroup: caught too, so every operation runs.
        except (Exception, BaseExceptionGroup) as failure:  # noqa: BLE001 - reported below
            failures[operation.label] = str(failure)
    print(f"schemathesis: {len(operations)} operations, {cases} cases, "
          f"{len(failures)} failing operations")
    assert failures == {}, "\n\n".join(f"{label}: {failure}" for label, failure in failures.items())
