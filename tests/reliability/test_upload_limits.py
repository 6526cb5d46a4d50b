"""Hostile dataset uploads (issue 26, item 2): archive metadata bounded before it is parsed
(a tar's long-name header, a zip's central directory), declared npz shapes bounded by the
upload's size, string labels bounded, PIL decompression bombs named, per-user dataset quotas.
Each refusal is a 4xx naming what it refuses, with nothing kept."""

from __future__ import annotations

import io
import lzma
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from metaserve.api.app import create_app
from metaserve.service import dataset_ingest
from metaserve.service.settings import Settings
from metaserve.service.upload_conversion import Limits
from tests import synthetic_datasets as synth
from tests.helpers import bearer, make_user

SMALL = dict(classes=6, per_class=4)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=db_url, dispatcher=False, data_dir=tmp_path / "state",
                    artifact_root=tmp_path / "artifacts", dataset_max_upload_bytes=8 * 2**20,
                    dataset_max_images=500, dataset_max_image_side=64,
                    dataset_convert_memory_bytes=1536 * 2**20)


@pytest.fixture
def api(engine, settings: Settings) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def alice(sessions) -> dict[str, str]:  # noqa: ANN001
    return bearer(make_user(sessions, "alice")[1])


@pytest.fixture
def admin(sessions) -> dict[str, str]:  # noqa: ANN001
    return bearer(make_user(sessions, "root", is_admin=True)[1])


def upload(api: TestClient, auth: dict, body: bytes, name: str = "upload"):  # noqa: ANN201
    return api.post("/v1/datasets", params={"name": name}, content=body, headers=auth)


def refusal(response, status: int = 422) -> tuple[dict, dict[str, str]]:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    return error, {d["field"]: d["message"] for d in error["details"]}


def nothing_kept(api: TestClient, settings: Settings, auth: dict) -> None:
    assert synth.files_under(settings.upload_dir) == []
    assert synth.files_under(Path(settings.artifact_root)) == []
    assert api.get("/v1/datasets", headers=auth).json()["data"] == []


def small_dataset() -> bytes:
    return synth.npz_bytes(*synth.shapes(**SMALL), compressed=True)


# --------------------------------------------------------------------------- tar headers


def tar_xz_with_long_name(declared: int) -> bytes:
    """A .tar.xz whose first header is a GNU long-name record declaring ``declared`` bytes,
    all of them present (zeros): xz streams of 64 MiB of zeros, concatenated (one stream
    compressed once), so building it is fast and the archive small, as in the issue's
    156 KB / 1 GiB repro."""
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, declared
    chunk = 64 * 2**20
    assert declared % chunk == 0
    zeros = lzma.compress(bytes(chunk), preset=0)
    member = synth.tar_bytes(synth.tree_members(*synth.shapes(**SMALL)))
    return b"".join([lzma.compress(header.tobuf(format=tarfile.GNU_FORMAT)),
                     zeros * (declared // chunk), lzma.compress(member)])


def test_a_tar_long_name_header_declaring_a_gibibyte_is_refused_as_its_header_is_read(
        api, settings, alice) -> None:  # noqa: ANN001
    body = tar_xz_with_long_name(2**30)
    assert len(body) < 1_000_000
    error, details = refusal(upload(api, alice, body))
    assert "GNU long-name header" in error["message"], error
    assert f"{2**30:,} bytes" in error["message"]
    assert "body" in details
    nothing_kept(api, settings, alice)


def test_a_pax_header_above_the_bound_is_refused_in_a_plain_tar(api, settings, alice) -> None:  # noqa: ANN001
    members = synth.tree_members(*synth.shapes(**SMALL))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for position, (name, data) in enumerate(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if position == 3:
                info.pax_headers = {"comment": "x" * (2 * 2**20)}  # a 2 MiB pax record
            archive.addfile(info, io.BytesIO(data))
    error, details = refusal(upload(api, alice, buffer.getvalue()))
    assert "pax header" in error["message"] and "body" in details, error
    nothing_kept(api, settings, alice)


# --------------------------------------------------------------------------- zip directories


def zip_of_empty_entries(count: int) -> bytes:
    """A zip of ``count`` empty stored members (``e/<i>``), written record by record."""
    local, central, offset = [], [], 0
    for index in range(count):
        name = f"e/{index}".encode()
        record = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0,
                                   len(name), 0, 0, 0, 0, 0, offset) + name)
        local.append(record)
        offset += len(record)
    directory = b"".join(central)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), offset, 0)
    return b"".join(local) + directory + end


def test_a_zip_with_more_members_than_the_cap_is_refused_before_zipfile_reads_its_directory(
        tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """In the conversion process itself: :class:`zipfile.ZipFile` is never constructed (it
    would build one object per entry: 3,000,000 empty entries took 1.5 GB in the issue)."""
    path = tmp_path / "upload"
    path.write_bytes(zip_of_empty_entries(12_000))  # the cap: 2 × 500 + 10,000 = 11,000
    assert len(zipfile.ZipFile(path).infolist()) == 12_000  # a valid zip

    def never(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise AssertionError("zipfile.ZipFile was built")

    monkeypatch.setattr(zipfile, "ZipFile", never)
    limits = Limits(dataset_max_images=500, dataset_max_image_side=64,
                    dataset_max_stored_bytes=2**30, dataset_max_rows=10, dataset_max_columns=10,
                    dataset_convert_memory_bytes=2**30)
    (tmp_path / "work").mkdir()
    with pytest.raises(Exception) as raised:
        dataset_ingest.convert_upload(path, tmp_path / "work", limits)
    assert "12,000 members" in str(raised.value) and "11,000" in str(raised.value)


def test_a_zip_whose_end_record_understates_its_members_is_refused_by_its_directory_size(
        api, settings, alice) -> None:  # noqa: ANN001
    body = bytearray(zip_of_empty_entries(12_000))
    end = body.rindex(b"PK\x05\x06")
    body[end + 8:end + 12] = struct.pack("<2H", 10, 10)  # "10 members", 12,000 listed
    error, details = refusal(upload(api, alice, bytes(body)))
    assert "central directory" in error["message"] and "10 declared" in error["message"], error
    assert "body" in details
    nothing_kept(api, settings, alice)


def test_a_zip_of_many_empty_entries_is_422_through_the_api(api, settings, alice) -> None:  # noqa: ANN001
    error, details = refusal(upload(api, alice, zip_of_empty_entries(12_000)))
    assert error["code"] == "limit_exceeded" and "12,000 members" in details["body"], error
    nothing_kept(api, settings, alice)


# --------------------------------------------------------------------------- npz shapes


def npz_streamed(arrays: dict[str, tuple[np.dtype, tuple[int, ...], bytes]]) -> bytes:
    """An npz (deflated) of arrays given as (dtype, shape, one chunk repeated to fill it),
    written chunk by chunk so that a declared GiB never exists in this process."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, (dtype, shape, chunk) in arrays.items():
            total = int(np.prod(shape)) * np.dtype(dtype).itemsize
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array_header_1_0(
                    handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                             "fortran_order": False, "shape": shape})
                written = 0
                while written < total:
                    piece = chunk[:total - written]
                    handle.write(piece)
                    written += len(piece)
    return buffer.getvalue()


def test_an_npz_of_zeros_declaring_far_more_than_its_size_is_refused_before_it_is_written(
        api, settings, alice) -> None:  # noqa: ANN001
    """The issue's 1 MB npz declaring [4096,1,512,512] (1 GiB), at this server's 64-pixel
    side: [65536,1,64,64] is 256 MiB of zeros in a ~260 KB upload, under the stored-bytes cap
    (16 GiB) but ~1000× the upload (cap: 100×, METASERVE_DATASET_MAX_EXPANSION)."""
    api.app.state.settings.dataset_max_images = 100_000
    labels = np.arange(65536, dtype=np.int64) % 8
    body = npz_streamed({"labels": (np.int64, (65536,), labels.tobytes()),
                         "images": (np.uint8, (65536, 1, 64, 64), bytes(2**20))})
    assert len(body) < 2 * 2**20
    error, details = refusal(upload(api, alice, body))
    assert error["code"] == "limit_exceeded", error
    assert "METASERVE_DATASET_MAX_EXPANSION" in error["message"]
    assert "100×" in details["images"]
    nothing_kept(api, settings, alice)


def test_a_small_upload_that_decodes_under_the_floor_is_accepted(api, settings, alice) -> None:  # noqa: ANN001
    """Blank images compress far beyond 100×; below 64 MiB decoded they are harmless."""
    labels = np.arange(1000, dtype=np.int64) % 4
    body = npz_streamed({"labels": (np.int64, (1000,), labels.tobytes()),
                         "images": (np.uint8, (1000, 1, 64, 64), bytes(2**20))})
    assert 1000 * 64 * 64 > 100 * len(body)
    api.app.state.settings.dataset_max_images = 10_000
    assert upload(api, alice, body).status_code == 201


def test_a_million_long_string_labels_are_refused_naming_labels(api, settings, alice) -> None:  # noqa: ANN001
    """The issue's 1,000,000 ``<U256`` labels (1 GiB) in a 2.1 MB npz, at 100,000 (100 MB)."""
    api.app.state.settings.dataset_max_images = 1_000_000
    body = npz_streamed({"labels": (np.dtype("<U256"), (100_000,), bytes(2**20)),
                         "images": (np.uint8, (100_000, 8, 8), bytes(2**20))})
    error, details = refusal(upload(api, alice, body))
    assert error["code"] == "limit_exceeded", error
    assert f"{100_000 * 1024:,} bytes" in details["labels"]
    nothing_kept(api, settings, alice)


# --------------------------------------------------------------------------- PIL bombs


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` × ``height`` gray pixels (one row of data): PIL
    checks the declared size when it opens the file, before any decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">2I5B", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(b"IEND", b""))


def test_a_decompression_bomb_png_in_a_zip_is_422_naming_the_member(api, settings, alice) -> None:  # noqa: ANN001
    members = synth.tree_members(*synth.shapes(**SMALL))
    members["data/class00/bomb.png"] = png_header_only(20_000, 20_000)
    error, details = refusal(upload(api, alice, synth.zip_bytes(members)))
    assert error["code"] == "limit_exceeded", error
    assert details["member"] == "data/class00/bomb.png"
    assert "decompression bomb" in error["message"]
    nothing_kept(api, settings, alice)


# --------------------------------------------------------------------------- quotas


@pytest.mark.dialects
def test_the_dataset_count_quota_is_429_naming_it_and_admins_are_exempt(
        api, settings, alice, admin) -> None:  # noqa: ANN001
    api.app.state.settings.dataset_max_per_user = 2
    for _ in range(2):
        assert upload(api, alice, small_dataset()).status_code == 201
    error, details = refusal(upload(api, alice, small_dataset()), 429)
    assert error["code"] == "quota_exceeded"
    assert details["limit"] == "METASERVE_DATASET_MAX_PER_USER" and details["cap"] == "2"
    assert len(api.get("/v1/datasets", headers=alice).json()["data"]) == 2
    assert len(synth.files_under(Path(settings.artifact_root))) == 2 * 2  # two datasets' files
    for _ in range(3):
        assert upload(api, admin, small_dataset()).status_code == 201


@pytest.mark.dialects
def test_the_stored_bytes_quota_counts_decoded_bytes_and_keeps_nothing_past_it(
        api, settings, alice) -> None:  # noqa: ANN001
    first = upload(api, alice, small_dataset()).json()
    stored = first["meta"]["stored_bytes"]
    assert stored > first["bytes"]  # decoded, not as uploaded (a compressed npz)
    api.app.state.settings.dataset_max_bytes_per_user = stored + stored // 2
    error, details = refusal(upload(api, alice, small_dataset()), 429)
    assert details["limit"] == "METASERVE_DATASET_MAX_BYTES_PER_USER", error
    assert details["stored_bytes"] == f"{stored}"
    assert [d["id"] for d in api.get("/v1/datasets", headers=alice).json()["data"]] == [first["id"]]
    assert synth.files_under(settings.upload_dir) == []
    assert sorted({p.split("/")[0] for p in synth.files_under(Path(settings.artifact_root))}) == [
        first["id"]]
    assert api.delete(f"/v1/datasets/{first['id']}", headers=alice).status_code == 204
    assert upload(api, alice, small_dataset()).status_code == 201


@pytest.mark.dialects
def test_concurrent_uploads_cannot_pass_the_count_quota_together(api, settings, alice) -> None:  # noqa: ANN001
    api.app.state.settings.dataset_max_per_user = 1
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(
        upload(api, alice, small_dataset()).status_code)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 429]
    assert len(api.get("/v1/datasets", headers=alice).json()["data"]) == 1
    assert len(synth.files_under(Path(settings.artifact_root))) == 2
