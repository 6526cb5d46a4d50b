"""The client's side of registered models (``/v1/models``): keep a job's result under a name,
as numbered versions, and point aliases (``production``) at them; then load it by the URIs
MLflow users know, ``models:/NAME/VERSION``, ``models:/NAME/latest`` and
``models:/NAME@ALIAS``:

```python
client.register_model("sine", job=job)                  # version 1 (the model made if new)
client.set_model_alias("sine", "production", 1)
model, recipe = client.load_meta_init("models:/sine@production")
```

A URI is resolved to its version's job at each load, so moving an alias changes what the
next load returns; the files are cached per job, whose artifacts never change.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from metaserve.client.errors import Conflict, MetaserveClientError, NotFound

if TYPE_CHECKING:  # pragma: no cover
    import httpx

MODEL_URI_PREFIX = "models:/"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[^/@]+))$")


def is_model_uri(target: object) -> bool:
    return isinstance(target, str) and target.startswith(MODEL_URI_PREFIX)


def parse_model_uri(uri: str) -> tuple[str, int | None, str | None]:
    """``(name, version, alias)`` of ``models:/NAME/3`` (alias None), ``models:/NAME@ALIAS``
    (version None) or ``models:/NAME/latest`` (both None); anything else raises
    :class:`MetaserveClientError` saying the forms."""
    match = _MODEL_URI.match(uri)
    if match is None:
        raise MetaserveClientError(f"{uri!r} is not a model URI: use models:/NAME/VERSION, "
                                   "models:/NAME/latest or models:/NAME@ALIAS")
    version = match["version"]
    return (match["name"], int(version) if version and version != "latest" else None,
            match["alias"])


def _segment(text: str) -> str:
    return quote(text, safe="")


class RegisteredModels:
    """Methods of :class:`metaserve.client.Client` for registered models."""

    def _request(self, method: str, path: str, **kwargs: Any) -> "httpx.Response":
        raise NotImplementedError  # pragma: no cover - Client's

    def create_model(self, name: str, *, description: str | None = None) -> dict[str, Any]:
        """A new registered model with no versions (409 Conflict if you have one of this name)."""
        return self._request("POST", "/v1/models",
                             json={"name": name, "description": description}).json()

    def models(self) -> list[dict[str, Any]]:
        """Your registered models by name, with their latest version and aliases."""
        return self._request("GET", "/v1/models").json()["data"]

    def model(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{_segment(name)}").json()

    def delete_model(self, name: str) -> None:
        """Delete the model, its versions and aliases; the jobs stay."""
        self._request("DELETE", f"/v1/models/{_segment(name)}")

    def register_model(self, name: str, *, job: str | dict[str, Any] | None = None,
                       sweep: str | dict[str, Any] | None = None,
                       description: str | None = None) -> dict[str, Any]:
        """A new version of model ``name`` from a succeeded ``job`` or the best trial of a
        ``sweep`` (ids or as the API returned them); the model is created first if you have
        none of that name, as ``mlflow.register_model`` does (and deleted again if the server
        refuses the version). Returns the version (its ``version`` number and ``uri``)."""
        if (job is None) == (sweep is None):
            raise MetaserveClientError("register_model takes exactly one of job= and sweep=")
        body: dict[str, Any] = {"description": description}
        if job is not None:
            body["job_id"] = job["id"] if isinstance(job, dict) else str(job)
        else:
            body["sweep_id"] = sweep["id"] if isinstance(sweep, dict) else str(sweep)
        path = f"/v1/models/{_segment(name)}/versions"
        try:
            return self._request("POST", path, json=body).json()
        except NotFound as error:
            if [detail.get("field") for detail in error.details] != ["name"]:
                raise  # the job or the sweep is what is missing
        try:
            self.create_model(name)
        except Conflict:  # made meanwhile by another call: theirs, kept whatever happens
            return self._request("POST", path, json=body).json()
        try:
            return self._request("POST", path, json=body).json()
        except MetaserveClientError:
            self.delete_model(name)  # a refused first version leaves no empty model behind
            raise

    def model_versions(self, name: str) -> list[dict[str, Any]]:
        """The model's versions, newest first."""
        return self._request("GET", f"/v1/models/{_segment(name)}/versions").json()["data"]

    def model_version(self, name: str, version: int) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{_segment(name)}/versions/{int(version)}").json()

    def set_model_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (created, or moved from where it pointed)."""
        return self._request("PUT", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}",
                             json={"version": int(version)}).json()

    def delete_model_alias(self, name: str, alias: str) -> None:
        self._request("DELETE", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}")

    def resolve_model_uri(self, uri: str) -> dict[str, Any]:
        """The version a ``models:/`` URI names now (its ``job_id``, ``artifact_kind``, ...)."""
        name, version, alias = parse_model_uri(uri)
        if alias is not None:
            return self._request("GET", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}"
                                 ).json()
        if version is None:  # latest
            latest = self.model(name)["latest_version"]
            if latest is None:
                raise MetaserveClientError(f"model {name} has no versions yet")
            version = latest
        return self.model_version(name, version)
