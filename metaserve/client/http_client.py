"""The HTTP client of the metaserve API: jobs, their events and logs, artifacts, datasets and
sweeps. Connection settings come from, first to last: the arguments, ``METASERVE_URL`` and
``METASERVE_API_KEY``, the config file (:mod:`metaserve.client.config`). A client without a
key still loads and adapts a downloaded directory; its first request raises
:class:`~metaserve.client.errors.NotConfigured`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from metaserve.client.config import DEFAULT_URL, read_config
from metaserve.client.errors import (ConnectionFailed, MetaserveClientError, NotConfigured,
                                     error_from_response)
from metaserve.client.local import (ARTIFACT_FILES, LOADERS, META_INIT_FILES, adapt, adapt_rows,
                                    load_meta_init, load_meta_policy)
from metaserve.client.model_registry import RegisteredModels, is_model_uri
from metaserve.client.progress import Progress, ProgressBar
from metaserve.client.spec_documents import load_spec_document
from metaserve.client.sse import READ_TIMEOUT_S, Event, parse_sse, stream_timeout

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from metaserve.workers.engine.final_artifact import MetaInitModel
    from metaserve.workers.rl.loader import MetaPolicy

TIMEOUT_S = 30.0
UPLOAD_CHUNK_BYTES = 1 << 20
UPLOAD_TIMEOUT_S = 3600.0  # the server converts the upload before it answers
RECONNECT_DELAY_S = 1.0
MAX_RECONNECTS = 30
CHECKPOINT_PREFIX = "checkpoint."  # checkpoint.safetensors, checkpoint.json
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def job_id_of(job: str | dict[str, Any]) -> str:
    """A job id from an id or a job as returned by the API."""
    return job["id"] if isinstance(job, dict) else str(job)


def safe_target(directory: Path, name: str) -> Path:
    """Where artifact ``name`` (as the server listed it) goes under ``directory``; a name that
    would leave it (``..``, absolute, a drive or backslash, a control character, a link out
    of it) raises :class:`MetaserveClientError` instead: a server's names are not trusted."""
    import re

    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or ":" in name
            or re.search(r"[\x00-\x1f\x7f]", name)
            or any(part in ("", ".", "..") for part in parts)):
        raise MetaserveClientError(f"refusing artifact name {name!r}: it would leave {directory}")
    root = directory.resolve()
    target = (directory / name).resolve()
    if not target.is_relative_to(root):
        raise MetaserveClientError(f"refusing artifact name {name!r}: it would leave {directory}")
    return directory / name


class Client(RegisteredModels):
    """An HTTP client of the metaserve API (see :mod:`metaserve.client`); registered models'
    methods come from :class:`~metaserve.client.model_registry.RegisteredModels`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = TIMEOUT_S, transport: httpx.BaseTransport | None = None,
                 stream_read_timeout: float = READ_TIMEOUT_S) -> None:
        """``stream_read_timeout``: the longest silence an event or log stream may keep
        before it is dropped and resumed (see :mod:`metaserve.client.sse`)."""
        config = read_config() if url is None or api_key is None else {}
        self.url = (url or os.environ.get("METASERVE_URL") or config.get("url") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("METASERVE_API_KEY") or config.get("api_key")
        self.stream_read_timeout = stream_read_timeout
        # Without a key the client still loads and adapts a downloaded directory (offline);
        # its first request raises NotConfigured.
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers=headers, event_hooks={"request": [self._require_key]})

    def _require_key(self, request: httpx.Request) -> None:
        if not self.api_key:
            raise NotConfigured()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ConnectionFailed(f"cannot reach {self.url}: {error}") from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    # ------------------------------------------------------------------ jobs

    def submit(self, spec_or_path: str | Path | dict[str, Any], *, overrides: list[str] | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue a job from a spec dict or a YAML/JSON file; returns the job (status ``queued``,
        the spec with every default filled in)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=load_spec_document(spec_or_path, overrides),
                             headers=headers).json()

    def get(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id_of(job)}").json()

    def list(self, *, status: str | None = None, limit: int | None = 50,
             name: str | None = None, sort: str | None = None, order: str | None = None,
             trials: str | None = None, **filters: str) -> list[dict[str, Any]]:
        """Your jobs, newest first (or by ``sort``: ``name``, ``status``, ``updated_at``,
        ``duration``, ``metric:<name>``, ``param:<spec.path>``; ``order`` asc or desc): up to
        ``limit`` (None: all), following the pages; ``name``: only those whose name contains
        it, in any case; ``trials``: ``fold`` (a sweep's trials hidden under their driver job,
        the default), ``show`` or ``only``; ``filters``: ``algorithm``, ``family``,
        ``sweep_id`` (see ``GET /v1/jobs``)."""
        return self.list_page(status=status, limit=limit, name=name, sort=sort, order=order,
                              trials=trials, **filters)["data"]

    def list_page(self, *, limit: int | None = 50, **query: Any) -> dict[str, Any]:
        """Like :meth:`list` (the same arguments), with how many jobs match in all:
        ``{"data": [...], "total": N, "next_cursor": ...}``."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        query = {key: value for key, value in query.items() if value is not None}
        while True:
            params: dict[str, Any] = {
                **query, "limit": 100 if limit is None else min(100, limit - len(found))}
            if cursor:
                params["cursor"] = cursor
            page = self._request("GET", "/v1/jobs", params=params).json()
            found.extend(page["data"])
            cursor = page["next_cursor"]
            if not cursor or (limit is not None and len(found) >= limit):
                return {"data": found, "total": page.get("total", len(found)),
                        "next_cursor": cursor}

    def cancel(self, job: str | dict[str, Any]) -> dict[str, Any]:
        """queued → cancelled; running → cancelling (the dispatcher stops it)."""
        return self._request("POST", f"/v1/jobs/{job_id_of(job)}/cancel").json()

    def metrics(self, job: str | dict[str, Any], *, name: str | None = None) -> list[dict[str, Any]]:
        """Every metric value of the job ordered by (step, name), following the pages."""
        points: list[dict[str, Any]] = []
        since_step: int | None = None
        while True:
            params: dict[str, Any] = {"limit": 10_000}
            if name:
                params["name"] = name
            if since_step is not None:
                params["since_step"] = since_step
            page = self._request("GET", f"/v1/jobs/{job_id_of(job)}/metrics", params=params).json()
            points.extend(page["data"])
            since_step = page["next_since_step"]
            if since_step is None:
                return points

    def artifacts(self, job: str | dict[str, Any]) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id_of(job)}/artifacts").json()["data"]

    # ------------------------------------------------------------------ events, waiting

    def events(self, job: str | dict[str, Any], *, last_event_id: str | None = None,
               reconnect: bool = True,
               on_reconnect: Callable[[], None] | None = None) -> Iterator[Event]:
        """The job's events until it is terminal. A dropped connection is resumed from the
        last event received (``Last-Event-ID``), so none is lost or repeated, and so is a
        stream silent for longer than ``stream_read_timeout`` (a half-open connection);
        ``on_reconnect()`` is called each time it is being resumed."""
        job_id = job_id_of(job)
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            terminal = False
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                       timeout=stream_timeout(TIMEOUT_S, self.stream_read_timeout)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_from_response(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        last_event_id = event.id
                        terminal = event.kind == "status" and event.data["status"] in TERMINAL_STATUSES
                        yield event
            except httpx.TransportError as error:
                failures += 1
                if not reconnect or failures > MAX_RECONNECTS:
                    raise ConnectionFailed(f"lost the event stream of {job_id}: {error}") from None
            if terminal:
                return
            if not reconnect:
                return
            if on_reconnect is not None:
                on_reconnect()
            time.sleep(RECONNECT_DELAY_S)

    def logs(self, job: str | dict[str, Any], *, after: int = 0) -> list[dict[str, Any]]:
        """The job's log records after seq ``after`` (its driver's and inner-loop workers'
        lines and tracebacks, the dispatcher's lines about its attempts), following the pages."""
        records: list[dict[str, Any]] = []
        while True:
            page = self._request("GET", f"/v1/jobs/{job_id_of(job)}/logs",
                                 params={"after": after, "limit": 5000}).json()
            records.extend(page["data"])
            after = page["next_after"]
            if page["complete"]:
                return records

    def follow_logs(self, job: str | dict[str, Any], *, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's log records as they are written (``?follow=true``), until the job has
        ended and its log is read; a dropped or silent (``stream_read_timeout``) connection is
        resumed after the last record."""
        job_id = job_id_of(job)
        failures = 0
        while True:
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/logs",
                                       params={"follow": "true", "after": after},
                                       timeout=stream_timeout(TIMEOUT_S, self.stream_read_timeout)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_from_response(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.kind == "end":
                            return
                        after = max(after, int(event.data["seq"]))
                        yield event.data
            except httpx.TransportError as error:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise ConnectionFailed(f"lost the log stream of {job_id}: {error}") from None
            time.sleep(RECONNECT_DELAY_S)

    def wait(self, job: str | dict[str, Any], *, progress: bool = True,
             on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
        """Follow the job's event stream until it is terminal and return the final job. With
        ``progress``, a rich progress bar shows iteration, loss, tasks/s and ETA."""
        state = Progress()
        bar = None

        def reconnecting() -> None:
            state.reconnecting = True
            if bar is not None:
                bar.show(state)

        try:  # the bar is stopped (its thread, its hold on stdout/stderr) however this ends
            if progress:
                found = job if isinstance(job, dict) and "name" in job else self.get(job)
                state.name, state.status = found["name"], found["status"]
                state.message = found.get("message") if found["status"] == "queued" else None
                bar = ProgressBar(job_id_of(job))
                bar.show(state)
            for event in self.events(job, on_reconnect=reconnecting):
                state.update(event)
                if bar is not None:
                    bar.show(state)
                if on_event is not None:
                    on_event(event)
        finally:
            if bar is not None:
                bar.stop()
        return self.get(job)

    # ------------------------------------------------------------------ artifacts, adaptation

    def download(self, job: str | dict[str, Any], directory: str | Path, *,
                 names: tuple[str, ...] | None = META_INIT_FILES) -> Path:
        """Download the job's artifacts ``names`` (default: the meta-initialization; None:
        every final artifact, checkpoints excluded) into ``directory``; returns it."""
        job_id = job_id_of(job)
        directory = Path(directory)
        listed = [artifact["name"] for artifact in self.artifacts(job_id)]
        wanted = list(names) if names is not None else listed
        missing = [name for name in wanted if name not in listed]
        if missing:
            raise MetaserveClientError(f"job {job_id} has no {', '.join(missing)} "
                                       f"(status: {self.get(job_id)['status']})")
        targets = {name: safe_target(directory, name) for name in wanted}  # all, before any I/O
        directory.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            target = targets[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_from_response(response)
                    with partial.open("wb") as file:
                        for chunk in response.iter_bytes():
                            file.write(chunk)
            except httpx.TransportError as error:
                raise ConnectionFailed(f"download of {name} failed: {error}") from None
            partial.replace(target)
        return directory

    def final_artifacts(self, job: str | dict[str, Any]) -> list[str]:
        """Names of the job's final artifacts, whatever its kind (``meta_init.*`` of a
        meta-learning job, ``meta_policy.*`` of a meta-RL job); checkpoints left out."""
        return [artifact["name"] for artifact in self.artifacts(job_id_of(job))
                if not artifact["name"].startswith(CHECKPOINT_PREFIX)]

    def artifact_kind(self, job: str | dict[str, Any]) -> str | None:
        """The kind of the job's final artifact, as its files record it: ``meta_init`` (a
        meta-learning job's meta-initialization) or ``meta_policy`` (a meta-RL job's
        meta-policy); None while it has none (not succeeded yet)."""
        names = set(self.final_artifacts(job))
        return next((kind for kind, files in ARTIFACT_FILES.items() if set(files) <= names), None)

    def _fetch_artifact(self, job_or_dir: str | Path | dict[str, Any], kind: str,
                        cache_dir: str | Path | None) -> Path:
        """The directory holding the job's artifact of ``kind``: ``job_or_dir`` itself when it
        is a directory, else the job's files downloaded into ``cache_dir`` (default
        ``~/.cache/metaserve/jobs/<id>``); a job whose artifact is of the other kind raises
        :class:`MetaserveClientError` naming the loader to use."""
        if is_model_uri(job_or_dir):  # models:/NAME/3, models:/NAME@ALIAS: its version's job
            job_or_dir = self.resolve_model_uri(str(job_or_dir))["job_id"]
            # One folder per job under cache_dir: an alias that moved must not find the
            # previous version's files there.
            cache_dir = Path(cache_dir) / job_or_dir if cache_dir else None
        elif not isinstance(job_or_dir, dict) and Path(job_or_dir).is_dir():
            return Path(job_or_dir)
        job_id = job_id_of(job_or_dir if isinstance(job_or_dir, dict) else str(job_or_dir))
        directory = Path(cache_dir) if cache_dir else _cache_root() / job_id
        files = ARTIFACT_FILES[kind]
        if not all((directory / name).exists() for name in files):
            found = self.artifact_kind(job_id)
            if found is not None and found != kind:
                raise MetaserveClientError(
                    f"job {job_id}'s artifact is a {found} ({', '.join(ARTIFACT_FILES[found])}), "
                    f"not a {kind}: load it with {LOADERS[found]}")
            self.download(job_id, directory, names=files)
        return directory

    def load_meta_init(self, job_or_dir: str | Path | dict[str, Any], *,
                       cache_dir: str | Path | None = None) -> tuple["MetaInitModel", dict[str, Any]]:
        """``(model, recipe)`` from a directory holding ``meta_init.safetensors`` +
        ``meta_init.json`` (offline), or from a job or a registered model's version
        (``models:/NAME/3``, ``models:/NAME@production``: the job it names now), downloaded
        first into ``cache_dir`` (default ``~/.cache/metaserve/jobs/<id>``)."""
        return load_meta_init(self._fetch_artifact(job_or_dir, "meta_init", cache_dir))

    def load_meta_policy(self, job_or_dir: str | Path | dict[str, Any], *,
                         cache_dir: str | Path | None = None) -> "MetaPolicy":
        """A meta-RL job's meta-policy from a directory holding ``meta_policy.safetensors`` +
        ``meta_policy.json`` (offline, e.g. what ``metaserve fetch`` downloaded), or from a job,
        downloaded first into ``cache_dir`` (default ``~/.cache/metaserve/jobs/<id>``). See
        :func:`load_meta_policy` for what it does."""
        return load_meta_policy(self._fetch_artifact(job_or_dir, "meta_policy", cache_dir))

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, path: str | Path, *, name: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Upload a dataset file (an ``.npz`` with ``images`` and ``labels``, or a ``.zip`` /
        ``.tar`` of an ImageFolder or Omniglot tree), streamed from disk; returns the dataset
        (its ``id`` goes in a spec as ``task_family: {name: images, dataset: <id>}``).
        ``progress(sent, total)`` is called as bytes go out."""
        path = Path(path)
        total = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            sent = 0
            with path.open("rb") as file:
                while chunk := file.read(UPLOAD_CHUNK_BYTES):
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, total)
                    yield chunk

        return self._request(
            "POST", "/v1/datasets", params={"name": name or path.name}, content=chunks(),
            headers={"Content-Length": str(total), "Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(TIMEOUT_S, read=UPLOAD_TIMEOUT_S)).json()

    def datasets(self) -> list[dict[str, Any]]:
        """Your datasets, newest first (every page)."""
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._request("GET", "/v1/datasets", params=params).json()
            found.extend(page["data"])
            if not page["next_cursor"]:
                return found
            params["cursor"] = page["next_cursor"]

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}").json()

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset (refused with :class:`Conflict` while a queued or running job uses it)."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # ------------------------------------------------------------------ sweeps

    def submit_sweep(self, sweep_or_path: str | Path | dict[str, Any], *,
                     overrides: list[str] | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue a hyperparameter sweep (docs/SWEEPS.md) from a dict or a YAML/JSON file, with
        ``key.path=value`` overrides of the sweep document (``num_samples=8``,
        ``spec.iterations=200``); returns the sweep (status ``queued``, defaults filled in)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/sweeps", headers=headers,
                             json=load_spec_document(sweep_or_path, overrides)).json()

    def sweep(self, sweep: str | dict[str, Any]) -> dict[str, Any]:
        """The sweep: status, trial counts by status, the best trial so far (selected by its
        validation ``value``; ``test_value``: its held-out test score)."""
        return self._request("GET", f"/v1/sweeps/{job_id_of(sweep)}").json()

    def sweeps(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """Your sweeps, newest first (one page of up to ``limit``)."""
        return self._request("GET", "/v1/sweeps", params={"limit": limit}).json()["data"]

    def sweep_trials(self, sweep: str | dict[str, Any]) -> list[dict[str, Any]]:
        """The leaderboard: every started trial (its config, job id, status, metric and its
        held-out ``test_value``), best first by the metric. Each ``job_id`` works with
        :meth:`get`, :meth:`metrics`, :meth:`download`."""
        return self._request("GET", f"/v1/sweeps/{job_id_of(sweep)}/trials").json()["data"]

    def cancel_sweep(self, sweep: str | dict[str, Any]) -> dict[str, Any]:
        """Stop the sweep and every running trial."""
        return self._request("POST", f"/v1/sweeps/{job_id_of(sweep)}/cancel").json()

    def wait_sweep(self, sweep: str | dict[str, Any], *, poll_s: float = 2.0,
                   timeout_s: float | None = None,
                   on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll the sweep until it ends (or ``timeout_s``); ``on_update(sweep)`` after each poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            current = self.sweep(sweep)
            if on_update is not None:
                on_update(current)
            if current["status"] in ("succeeded", "failed", "cancelled"):
                return current
            if deadline is not None and time.monotonic() > deadline:
                return current
            time.sleep(poll_s)

    def download_sweep(self, sweep: str | dict[str, Any], directory: str | Path) -> Path:
        """Download the sweep's artifacts (the best trial's ``meta_init.*`` and ``sweep.json``,
        the leaderboard) into ``directory``; :meth:`load_meta_init` loads it."""
        driver = self.sweep(sweep)["driver_job_id"]
        return self.download(driver, directory, names=(*META_INIT_FILES, "sweep.json"))

    @staticmethod
    def adapt(model: "MetaInitModel", support_x: "Tensor", support_y: "Tensor",
              steps: int | None = None) -> Callable[["Tensor"], "Tensor"]:
        """See :func:`adapt` (offline: no request is made)."""
        return adapt(model, support_x, support_y, steps)

    @staticmethod
    def adapt_rows(model: "MetaInitModel", *, support: Any = None, query: Any = None,
                   support_x: Any = None, support_y: Any = None, query_x: Any = None,
                   steps: int | None = None) -> dict[str, Any]:
        """See :func:`adapt_rows`: a tabular job's raw rows, offline (no request is made)."""
        return adapt_rows(model, support=support, query=query, support_x=support_x,
                          support_y=support_y, query_x=query_x, steps=steps)

    def adapt_remote(self, job: str | dict[str, Any], *, support_x: Any = None,
                     support_y: Any = None, query_x: Any = None, support: Any = None,
                     query: Any = None, steps: int | None = None) -> dict[str, Any]:
        """Server-side adaptation (``POST /v1/jobs/{id}/adapt``): the query predictions after
        adapting the job's meta-initialization to the support set. Arrays are nested lists
        or tensors. A tabular job also takes a new entity's raw rows as ``support``/``query``
        (named columns ``{"x1": [...], "y": [...]}`` or a list of row objects) and answers in
        the target's units."""
        if support is not None or query is not None:
            body: dict[str, Any] = {"support": _plain_rows(support), "query": _plain_rows(query)}
        else:
            body = {"support_x": _plain(support_x), "support_y": _plain(support_y),
                    "query_x": _plain(query_x)}
        if steps is not None:
            body["steps"] = steps
        if is_model_uri(job):
            job = self.resolve_model_uri(str(job))["job_id"]
        return self._request("POST", f"/v1/jobs/{job_id_of(job)}/adapt", json=body).json()


def _plain(array: Any) -> Any:
    return array.tolist() if hasattr(array, "tolist") else array


def _plain_rows(rows: Any) -> Any:
    """Named columns (a dict, or a pandas DataFrame: its columns) or row objects as JSON."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a DataFrame, without pandas
        rows = {str(name): rows[name].tolist() for name in rows.columns}
    if isinstance(rows, dict):
        return {name: _plain(column) for name, column in rows.items()}
    return rows


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metaserve" / "jobs"
