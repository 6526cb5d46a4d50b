"""Conversion of an upload into its canonical layout, in a child process.

The route spools the body to disk (never whole in memory); :func:`convert_in_child` then runs
``python -m metaserve.service.dataset_ingest`` on it, with an address-space limit
(``RLIMIT_AS`` = ``METASERVE_DATASET_CONVERT_MEMORY_BYTES``), a wall-clock timeout
(``METASERVE_DATASET_CONVERT_TIMEOUT_S``) and a lower CPU priority, so a hostile upload can
exhaust only that process: the API process's memory stays what it was (measured in
``benchmarks/upload_memory.py``). A child out of memory or time is a 422 naming ``body``;
whatever the child wrote is removed by the caller.

The format is told by content, never by the name:

- ``PAR1`` at both ends: a Parquet table (:mod:`metaserve.service.table_ingest`);
- a zip: an ``.npz`` (only ``.npy`` members) with ``images`` (uint8 ``[N,H,W]`` or
  ``[N,C,H,W]``, C = 1 or 3) and ``labels`` (``[N]`` integers or strings), read without pickle
  and streamed member by member; else a tree of images;
- a tar (also gzip/bzip2/xz-compressed) or a zip of an ImageFolder tree (``class/*.png``) or an
  Omniglot tree (``alphabet/character/*.png``), below any common top folder. Members are never
  extracted: each image is read into memory (at most :func:`member_byte_cap` bytes), decoded
  and written into the canonical file;
- anything else: a CSV table with a header row (:mod:`metaserve.service.table_ingest`).

Refused, with the member named and nothing kept: absolute paths, ``..`` parts, links and
device files, members that are not ``.png``/``.jpg``/``.jpeg``/``.bmp`` images (only
directories, ``__MACOSX/`` and ``.DS_Store`` are passed over), images PIL cannot decode,
members larger than their cap or an archive that decompresses to more than its members
declare (bombs), images with a side above ``dataset_max_image_side``, more than
``dataset_max_images`` images, a decoded size above ``dataset_max_stored_bytes``.

Archive metadata is bounded before it is parsed: a zip's end record (member count, central
directory size) is read before :mod:`zipfile` builds an entry per member; a tar's GNU
long-name and pax headers above 1 MiB, and sparse members, are refused as their header is
read (:class:`~metaserve.service.image_ingest.BoundedTarInfo`); an npz's declared shapes are
checked against the caps, ``labels`` above 64 MiB are refused, and a dataset may decode to at
most ``dataset_max_expansion`` times the upload's size (above 64 MiB): a 1 MB npz of zeros
declaring 1 GiB is refused before anything is written; an image PIL calls a decompression
bomb is refused naming the member.

Images of one dataset share one shape: gray if every image is gray, else RGB; images of a
size other than the most common one are resized to it (Lanczos).
"""

from __future__ import annotations

import json
import os
import logging
import resource
import signal
import subprocess
import sys
import threading
import traceback
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from metaserve.service.background import run_in_background
from metaserve.service.exceptions import (ConversionsBusy, DatasetLimitExceeded,
                                          InvalidDataset, MetaserveError)
from metaserve.service.upload_conversion import Converted, Limits

RESULT_FILE = ".conversion.json"
CHILD_NICENESS = 5
STDERR_TAIL = 2000
SLOT_WAIT_S = 30.0
KILLED_BY_MEMORY = (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS)
"""How a child that hit RLIMIT_AS outside Python dies (a C++ bad_alloc aborts, a failed mmap
faults); the kernel's OOM killer sends SIGKILL."""
logger = logging.getLogger(__name__)
ERRORS: dict[str, type[MetaserveError]] = {"InvalidDataset": InvalidDataset,
                                           "DatasetLimitExceeded": DatasetLimitExceeded}


# --------------------------------------------------------------------------- the child process


_slots: threading.BoundedSemaphore | None = None
_slots_size = 0
_slots_lock = threading.Lock()


def _conversion_slots(concurrency: int) -> threading.BoundedSemaphore:
    """The process-wide slots of ``concurrency`` conversions (one set per server process)."""
    global _slots, _slots_size
    with _slots_lock:
        if _slots is None or _slots_size != concurrency:
            _slots, _slots_size = threading.BoundedSemaphore(concurrency), concurrency
        return _slots


def convert_in_child(upload: Path, workdir: Path, settings: Any) -> Converted:
    """Convert ``upload`` into ``workdir`` in a child process under the settings' memory and
    time limits, at most ``dataset_convert_concurrency`` at once (so concurrent uploads
    cannot multiply the memory a conversion may take); raise :class:`InvalidDataset` /
    :class:`DatasetLimitExceeded` naming the field, member, line or column, or
    :class:`ConversionsBusy` (503) when no slot frees within ``SLOT_WAIT_S``."""
    slots = _conversion_slots(settings.dataset_convert_concurrency)
    if not slots.acquire(timeout=SLOT_WAIT_S):
        raise ConversionsBusy(
            f"{settings.dataset_convert_concurrency} uploads are being converted "
            "(METASERVE_DATASET_CONVERT_CONCURRENCY); retry later",
            retry_after_s=max(1, round(SLOT_WAIT_S)))
    try:
        return _convert_in_child(upload, workdir, settings)
    finally:
        slots.release()


def _convert_in_child(upload: Path, workdir: Path, settings: Any) -> Converted:
    limits = Limits.of(settings)
    command = [sys.executable, "-m", "metaserve.service.dataset_ingest", str(upload),
               str(workdir), json.dumps(asdict(limits))]
    # One thread each: the child must not compete with the API for every core; the system
    # allocator returns Arrow's refusals under RLIMIT_AS as errors, not aborts.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"}
    timeout = settings.dataset_convert_timeout_s
    try:
        completed = subprocess.run(command, env=env, capture_output=True, timeout=timeout,
                                   stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        raise DatasetLimitExceeded(
            f"body: converting the upload took longer than {timeout:g} s "
            "(METASERVE_DATASET_CONVERT_TIMEOUT_S)", body=f"longer than {timeout:g} s") from None
    result_path = workdir / RESULT_FILE
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    result_path.unlink(missing_ok=True)
    if result is None:
        logger.warning("dataset conversion died", extra={
            "returncode": completed.returncode,
            "stderr": completed.stderr[-STDERR_TAIL:].decode(errors="replace")})
        if completed.returncode in KILLED_BY_MEMORY:
            raise _out_of_memory(limits)
        raise InvalidDataset(f"body: the conversion process ended with status "
                             f"{completed.returncode} before it could say why",
                             body="the conversion failed")
    if "error" in result:
        error = result["error"]
        raise ERRORS[error["type"]](error["message"], **error["details"])
    converted = result["converted"]
    return Converted(converted["kind"], converted["format"], converted["files"],
                     converted["meta"])


def _out_of_memory(limits: Limits) -> DatasetLimitExceeded:
    cap = limits.dataset_convert_memory_bytes
    return DatasetLimitExceeded(
        f"body: converting the upload needs more than {cap:,} bytes of memory "
        "(METASERVE_DATASET_CONVERT_MEMORY_BYTES); upload a smaller dataset",
        body=f"needs more than {cap:,} bytes of memory to convert")


OUT_OF_MEMORY_TEXTS = ("cannot allocate memory", "failed to map segment", "bad_alloc",
                       "out of memory", "malloc of size")
"""How running out of address space reads when it is not a MemoryError: Arrow's allocation
failures, and a shared library (torch, Arrow) that cannot be mapped while it is imported."""


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return any(marker in text for marker in OUT_OF_MEMORY_TEXTS) or (
        "memory" in text and "alloc" in text)


def _error(error: MetaserveError) -> dict[str, Any]:
    return {"error": {"type": type(error).__name__, "message": error.message,
                      "details": error.details}}


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m metaserve.service.dataset_ingest UPLOAD WORKDIR LIMITS_JSON``.
    Writes ``WORKDIR/.conversion.json``: ``{"converted": ...}`` or ``{"error": ...}``."""
    upload, workdir, limits_json = (argv if argv is not None else sys.argv[1:])
    limits = Limits(**json.loads(limits_json))
    cap = limits.dataset_convert_memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    run_in_background(CHILD_NICENESS)
    target = Path(workdir) / RESULT_FILE
    try:
        converted = convert_upload(Path(upload), Path(workdir), limits)
        result: dict[str, Any] = {"converted": asdict(converted)}
    except (InvalidDataset, DatasetLimitExceeded) as error:
        result = _error(error)
    except Exception as error:  # noqa: BLE001 - a reader's own error on a malformed upload
        if _is_out_of_memory(error):
            result = _error(_out_of_memory(limits))
        else:
            traceback.print_exc()
            text = f"{type(error).__name__}: {error}"[:500]
            result = _error(InvalidDataset(f"body: the upload cannot be read ({text})",
                                           body=text))
    target.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- conversion


def convert_upload(upload: Path, workdir: Path, settings: Limits) -> Converted:
    """Convert the spooled upload into the canonical files in ``workdir`` (in this process;
    the server calls :func:`convert_in_child`), or raise :class:`InvalidDataset` /
    :class:`DatasetLimitExceeded` naming the field, member, line or column."""
    from metaserve.service import image_ingest  # table_ingest (pyarrow) only for a table

    settings = replace(settings, upload_bytes=upload.stat().st_size)
    with open(upload, "rb") as handle:
        magic = handle.read(4)
        handle.seek(max(0, upload.stat().st_size - 4))
        tail = handle.read(4)
    if magic == b"PAR1" and tail == b"PAR1":
        from metaserve.service import table_ingest

        return table_ingest.convert_parquet(upload, workdir, settings)
    if magic[:2] == b"PK":
        image_ingest.check_zip_directory(upload, settings)
        try:
            archive = zipfile.ZipFile(upload)
        except (zipfile.BadZipFile, OSError) as error:
            raise InvalidDataset(f"the upload is not a readable zip archive ({error})",
                                 body=str(error)) from None
        with archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
            if names and all(name.endswith(".npy") for name in names):
                return image_ingest.convert_npz(archive, workdir, settings)
            return image_ingest.convert_tree(image_ingest.ZipMembers(archive, settings), workdir,
                                             settings)
    if image_ingest.is_tar(upload):
        return image_ingest.convert_tree(image_ingest.TarMembers(upload, settings), workdir,
                                         settings)
    from metaserve.service import table_ingest

    return table_ingest.convert_csv(upload, workdir, settings)


if __name__ == "__main__":
    sys.exit(main())
