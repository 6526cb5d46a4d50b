"""``/v1/datasets``: a user's own datasets (few-shot images, or task-grouped tables),
uploaded once and named by id in specs.

The upload is the request body itself (``Content-Type`` anything; an ``.npz``, a ``.zip`` or a
``.tar`` of images, a CSV or a Parquet table: told apart by content), streamed to a spool file
on disk as it arrives, its size checked as it arrives (413 naming ``body`` past
``METASERVE_DATASET_MAX_UPLOAD_BYTES``), then converted in a child process with memory and
time limits (:mod:`metaserve.service.dataset_ingest`), waited for from the threadpool; nothing
of a refused upload is kept.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from metaserve.api.deps import NO_CONTROL_CHARACTERS, CurrentUser, PathText, SessionDep
from metaserve.api.schemas import DatasetPublic, DatasetsPublic, ErrorResponse, model_response
from metaserve.service import artifacts, datasets
from metaserve.service.exceptions import DatasetTooLarge

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
})

UPLOAD_PATH = "/v1/datasets"


def _too_large(size: int, cap: int) -> DatasetTooLarge:
    return DatasetTooLarge(
        f"body: the upload is {'more than ' if size > cap else ''}{size:,} bytes, above the cap "
        f"of {cap:,} (METASERVE_DATASET_MAX_UPLOAD_BYTES)",
        body=f"at most {cap:,} bytes")


UPLOAD_BODY = {"requestBody": {"required": True, "description": "The dataset file itself.",
                               "content": {"application/octet-stream": {
                                   "schema": {"type": "string", "format": "binary"}}}}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic,
             openapi_extra=UPLOAD_BODY, responses={
    413: {"model": ErrorResponse, "description": "Upload above METASERVE_DATASET_MAX_UPLOAD_BYTES"},
    422: {"model": ErrorResponse, "description": "Not a dataset this server reads, a refused "
          "archive member, CSV line or column (named), or above a dataset limit (code "
          "limit_exceeded, named: rows, columns, a Parquet row group, archive metadata (zip "
          "directory, tar header), a decompression bomb, the expansion ratio, the conversion's "
          "memory or time)"},
    429: {"model": ErrorResponse, "description": "The key's datasets reach "
          "METASERVE_DATASET_MAX_PER_USER or METASERVE_DATASET_MAX_BYTES_PER_USER (named)"},
    503: {"model": ErrorResponse, "description": "Every conversion slot "
          "(METASERVE_DATASET_CONVERT_CONCURRENCY) stayed busy for 30 s; Retry-After"},
})
async def upload_dataset(
    request: Request,
    user: CurrentUser,
    name: Annotated[str | None, Query(max_length=200, pattern=NO_CONTROL_CHARACTERS,
                                      description="Default: dataset-<time>.")] = None,
) -> Response:
    """Upload a dataset as the request body: an `.npz` with `images` and `labels`, a
    `.zip`/`.tar` of an ImageFolder (class/*.png) or Omniglot (alphabet/character/*.png) tree,
    or a table of rows grouped by task: CSV (UTF-8, header row) or Parquet. The response
    describes it: metadata, the default split's sizes and `usable_for`."""
    settings = request.app.state.settings
    cap = settings.dataset_max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _too_large(int(declared), cap)

    def check_quota() -> None:  # before the body is read: a full quota costs no upload
        with request.app.state.session_factory() as session:
            datasets.check_dataset_quota(session=session, owner=user, settings=settings)

    await run_in_threadpool(check_quota)
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.upload_dir))
    try:
        digest, size = hashlib.sha256(), 0
        with open(spool / "upload", "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise _too_large(size, cap)
                digest.update(chunk)
                handle.write(chunk)
        store = artifacts.get_store(settings.storage_config())

        def convert() -> DatasetPublic:
            with request.app.state.session_factory() as session:
                dataset = datasets.create_dataset(
                    session=session, owner=user, upload=spool / "upload",
                    name=name or f"dataset-{digest.hexdigest()[:8]}", size=size,
                    sha256=digest.hexdigest(), settings=settings, store=store)
                return DatasetPublic.of(dataset)

        public = await run_in_threadpool(convert)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    return model_response(public, status.HTTP_201_CREATED,
                          headers={"Location": f"/v1/datasets/{public.id}"})


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    user: CurrentUser,
    session: SessionDep,
    cursor: Annotated[str | None, Query(max_length=100, pattern=NO_CONTROL_CHARACTERS)] = None,
    limit: Annotated[int, Query(ge=1, le=datasets.MAX_PAGE)] = 50,
) -> Response:
    """Your datasets, newest first (an admin sees everyone's)."""
    page, next_cursor = datasets.list_datasets(session=session, owner=user, cursor=cursor,
                                               limit=limit)
    return model_response(DatasetsPublic(data=[DatasetPublic.of(d) for d in page],
                                         next_cursor=next_cursor))


@router.get("/{dataset_id}", response_model=DatasetPublic,
            responses={404: {"model": ErrorResponse}})
def get_dataset(dataset_id: PathText, user: CurrentUser, session: SessionDep) -> Response:
    """The dataset, its metadata, the sizes of the default split and `usable_for`."""
    return model_response(DatasetPublic.of(
        datasets.get_dataset(session=session, dataset_id=dataset_id, owner=user)))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses={
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse, "description": "A queued or running job uses it (named)"},
})
def delete_dataset(dataset_id: PathText, user: CurrentUser, session: SessionDep,
                   request: Request) -> Response:
    """Delete the dataset and its stored files (refused while a queued or running job uses it)."""
    store = artifacts.get_store(request.app.state.settings.storage_config())
    datasets.delete_dataset(session=session, dataset_id=dataset_id, owner=user, store=store)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
