"""Uploaded datasets: validation and conversion of an upload into the canonical layout
(:mod:`metaserve.workers.tasks.uploaded`), owner scoping, deletion, and the check of a job
spec's dataset reference at submit.

An upload arrives as a file spooled to disk by the route (never whole in memory) and is one of

- an ``.npz`` (a zip of ``.npy`` members) with ``images`` (uint8 ``[N,H,W]`` or ``[N,C,H,W]``,
  C = 1 or 3) and ``labels`` (``[N]`` integers or strings), read without pickle and streamed
  member by member;
- a ``.zip`` or ``.tar`` (also gzip/bzip2/xz-compressed) of an ImageFolder tree
  (``class/*.png``) or an Omniglot tree (``alphabet/character/*.png``), below any common top
  folder. Members are never extracted: each image is read into memory (at most
  :func:`member_byte_cap` bytes), decoded and written into the canonical file.

Refused, with the member named and nothing kept: absolute paths, ``..`` parts, links and
device files, members that are not ``.png``/``.jpg``/``.jpeg``/``.bmp`` images (only
directories, ``__MACOSX/`` and ``.DS_Store`` are passed over), images PIL cannot decode,
members larger than their cap or an archive that decompresses to more than its members
declare (bombs), images with a side above ``dataset_max_image_side``, more than
``dataset_max_images`` images, a decoded size above ``dataset_max_stored_bytes``.

Images of one dataset share one shape: gray if every image is gray, else RGB; images of a
size other than the most common one are resized to it (Lanczos).
"""

from __future__ import annotations

import collections
import io
import logging
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from metaserve.service.exceptions import (DatasetInUse, DatasetLimitExceeded, DatasetNotFound,
                                          DatasetPathForbidden, DatasetReferenceInvalid,
                                          InvalidDataset)
from metaserve.service.ids import new_id
from metaserve.service.jobs import Transaction
from metaserve.service.orm import Dataset, Job, JobStatus, User
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec
from metaserve.workers.object_store import ArtifactStore
from metaserve.workers.tasks.uploaded import (DATASET_TENSORS, copy_exactly, safetensors_header,
                                              write_canonical_json)

logger = logging.getLogger(__name__)

DATASET_ID_PREFIX = "ds_"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "BMP"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
PASSED_OVER = ("__MACOSX/",)
PASSED_OVER_NAMES = frozenset({".DS_Store"})
MAX_LABEL_ITEMSIZE = 1024
ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.CANCELLING.value)
MAX_PAGE = 100


def new_dataset_id() -> str:
    return DATASET_ID_PREFIX + new_id()


def member_byte_cap(settings: Settings) -> int:
    """Largest archive member read: a raw RGBA image of the largest side, twice, plus 1 MiB
    (a PNG or BMP is never much larger than its raw pixels)."""
    return 8 * settings.dataset_max_image_side ** 2 + (1 << 20)


@dataclass(frozen=True)
class Converted:
    """What an upload became: its canonical files in ``directory``, and its description."""

    directory: Path
    format: str
    class_names: list[str]
    images: int
    shape: list[int]


# --------------------------------------------------------------------------- conversion


def convert_upload(upload: Path, workdir: Path, settings: Settings) -> Converted:
    """Convert the spooled upload into the canonical files in ``workdir``, or raise
    :class:`InvalidDataset` / :class:`DatasetLimitExceeded` naming the field or member."""
    with open(upload, "rb") as handle:
        magic = handle.read(4)
    if magic[:2] == b"PK":
        try:
            archive = zipfile.ZipFile(upload)
        except (zipfile.BadZipFile, OSError) as error:
            raise InvalidDataset(f"the upload is not a readable zip archive ({error})",
                                 body=str(error)) from None
        with archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
            if names and all(name.endswith(".npy") for name in names):
                return _convert_npz(archive, workdir, settings)
            return _convert_tree(_ZipMembers(archive, settings), workdir, settings)
    try:
        is_tar = tarfile.is_tarfile(upload)
    except (OSError, EOFError, tarfile.TarError):
        is_tar = False
    if is_tar:
        return _convert_tree(_TarMembers(upload, settings), workdir, settings)
    raise InvalidDataset("the upload is not an .npz, a .zip or a .tar (optionally compressed) "
                         "archive", body="expected an .npz, .zip or .tar archive")


def _npy_header(stream: BinaryIO, member: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read(stream, max_header_size=10_000)
    except (ValueError, OSError, SyntaxError) as error:
        raise InvalidDataset(f"npz member {member!r} is not a NumPy array ({error})",
                             member=member) from None
    if dtype.hasobject:
        raise InvalidDataset(f"npz member {member!r} holds Python objects (pickles are "
                             "never read)", member=member)
    if fortran_order and len(shape) > 1:
        raise InvalidDataset(f"npz member {member!r} is in Fortran order; save a C-ordered "
                             "array (np.ascontiguousarray)", member=member)
    return tuple(int(n) for n in shape), dtype


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.dataset_max_images:
        raise DatasetLimitExceeded(
            f"images: {count:,} images, more than the cap of {settings.dataset_max_images:,} "
            "(METASERVE_DATASET_MAX_IMAGES)",
            images=f"{count:,} images, more than the cap of {settings.dataset_max_images:,}")


def _check_side(height: int, width: int, settings: Settings, member: str | None = None) -> None:
    side = settings.dataset_max_image_side
    if max(height, width) > side:
        where = f"{member!r}: " if member else ""
        details: dict[str, Any] = {"shape": f"{where}{height}×{width} pixels, larger than the "
                                            f"cap of {side} (METASERVE_DATASET_MAX_IMAGE_SIDE)"}
        if member:
            details["member"] = member
        raise DatasetLimitExceeded(f"shape: {where}an image of {height}×{width} pixels, a side "
                                   f"above the cap of {side} (METASERVE_DATASET_MAX_IMAGE_SIDE)",
                                   **details)


def _check_stored(count: int, shape: list[int], settings: Settings) -> None:
    stored = count * int(np.prod(shape))
    if stored > settings.dataset_max_stored_bytes:
        raise DatasetLimitExceeded(
            f"images: {count:,} images of {shape} are {stored:,} bytes decoded, more than the "
            f"cap of {settings.dataset_max_stored_bytes:,} (METASERVE_DATASET_MAX_STORED_BYTES)",
            images=f"{stored:,} bytes decoded, more than {settings.dataset_max_stored_bytes:,}")


def _class_ids(labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    values, ids = np.unique(labels, return_inverse=True)
    if len(values) < 2:
        raise InvalidDataset(f"labels: {len(values)} class; few-shot tasks need at least 2",
                             labels="at least 2 classes")
    return [str(value) for value in values], ids.astype(np.int64)


def _convert_npz(archive: zipfile.ZipFile, workdir: Path, settings: Settings) -> Converted:
    members = {info.filename: info for info in archive.infolist()}
    missing = sorted({"images.npy", "labels.npy"} - set(members))
    if missing:
        raise InvalidDataset(f"the npz lacks {', '.join(m[:-4] for m in missing)} (it has "
                             f"{', '.join(sorted(n[:-4] for n in members)) or 'nothing'})",
                             **{m[:-4]: "missing" for m in missing})
    with archive.open("labels.npy") as stream:
        shape, dtype = _npy_header(stream, "labels.npy")
        if len(shape) != 1 or dtype.kind not in "iuU" or dtype.itemsize > MAX_LABEL_ITEMSIZE:
            raise InvalidDataset(f"labels: must be integers or strings of shape [N], got {dtype} "
                                 f"of shape {list(shape)}", labels=f"{dtype} {list(shape)}")
        _check_count(shape[0], settings)
        raw = stream.read(shape[0] * dtype.itemsize)
        if len(raw) != shape[0] * dtype.itemsize:
            raise InvalidDataset("labels: the array ends early", labels="truncated")
        labels = np.frombuffer(raw, dtype=dtype)
    with archive.open("images.npy") as stream:
        shape, dtype = _npy_header(stream, "images.npy")
        if dtype != np.uint8 or len(shape) not in (3, 4):
            raise InvalidDataset(f"images: must be uint8 [N,H,W] or [N,C,H,W], got {dtype} of "
                                 f"shape {list(shape)}", images=f"{dtype} {list(shape)}")
        image_shape = [1, *shape[1:]] if len(shape) == 3 else list(shape[1:])
        if image_shape[0] not in (1, 3):
            raise InvalidDataset(f"images: [N,C,H,W] needs 1 or 3 channels, got shape "
                                 f"{list(shape)}", images=f"{image_shape[0]} channels")
        if shape[0] != len(labels):
            raise InvalidDataset(f"labels: {len(labels)} labels for {shape[0]} images",
                                 labels=f"{len(labels)} labels for {shape[0]} images")
        _check_count(shape[0], settings)
        _check_side(image_shape[1], image_shape[2], settings)
        _check_stored(shape[0], image_shape, settings)
        if min(image_shape[1:]) < 1 or shape[0] < 1:
            raise InvalidDataset(f"images: empty array of shape {list(shape)}", images="empty")
        class_names, ids = _class_ids(labels)
        count = shape[0]
        with open(workdir / DATASET_TENSORS, "wb") as out:
            out.write(_header(count, image_shape, "npz"))
            try:
                copy_exactly(stream, out, count * int(np.prod(image_shape)))
            except InvalidDataset:
                raise
            except Exception as error:  # noqa: BLE001 - a truncated or corrupt member
                raise InvalidDataset(f"images: the array cannot be read ({error})",
                                     images=str(error)) from None
            out.write(ids.tobytes())
    write_canonical_json(workdir, class_names=class_names, shape=image_shape, images=count,
                         source_format="npz")
    return Converted(workdir, "npz", class_names, count, image_shape)


def _header(count: int, shape: list[int], source: str) -> bytes:
    return safetensors_header([("images", "U8", [count, *shape]), ("labels", "I64", [count])],
                              {"source_format": source})


# --------------------------------------------------------------------------- archives of trees


class _Members:
    """An archive's members as ``(name, bytes)`` of its image files, every refusal raised on
    the way; iterated twice (the first pass reads headers, the second decodes)."""

    def __init__(self, settings: Settings) -> None:
        self.cap = member_byte_cap(settings)
        self.max_members = 2 * settings.dataset_max_images + 10_000
        self.total_cap = 2 * settings.dataset_max_stored_bytes
        self.total = 0

    def check_name(self, name: str) -> str | None:
        """The member's path if it is an image to read, None to pass over; raise otherwise."""
        if any(name.startswith(prefix) for prefix in PASSED_OVER):
            return None
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise InvalidDataset(f"member {name!r}: absolute or Windows paths are refused",
                                 member=name)
        parts = PurePosixPath(name).parts
        if ".." in parts:
            raise InvalidDataset(f"member {name!r}: '..' in a path is refused", member=name)
        if parts and parts[-1] in PASSED_OVER_NAMES:
            return None
        if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidDataset(f"member {name!r} is not an image (.png, .jpg, .jpeg, .bmp)",
                                 member=name)
        return name

    def check_size(self, name: str, size: int) -> None:
        if size > self.cap:
            raise InvalidDataset(f"member {name!r}: {size:,} bytes, more than an image of the "
                                 f"largest allowed side needs ({self.cap:,})", member=name)

    def read(self, name: str, stream: BinaryIO, declared: int) -> bytes:
        data = stream.read(self.cap + 1)
        if len(data) > self.cap or len(data) != declared:
            raise InvalidDataset(f"member {name!r} decompresses to more or other than the "
                                 f"{declared:,} bytes it declares (an archive bomb?)", member=name)
        self.total += len(data)
        if self.total > self.total_cap:
            raise DatasetLimitExceeded(
                f"images: the archive's images hold more than {self.total_cap:,} bytes "
                "(twice METASERVE_DATASET_MAX_STORED_BYTES)", images="too many bytes")
        return data

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError


class _ZipMembers(_Members):
    def __init__(self, archive: zipfile.ZipFile, settings: Settings) -> None:
        super().__init__(settings)
        self.archive = archive
        infos = archive.infolist()
        if len(infos) > self.max_members:
            raise DatasetLimitExceeded(f"images: the archive has {len(infos):,} members",
                                       images=f"{len(infos):,} members")

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        self.total = 0
        for info in self.archive.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidDataset(f"member {info.filename!r} is a symbolic link; links are "
                                     "refused", member=info.filename)
            if info.is_dir():
                continue
            name = self.check_name(info.filename)
            if name is None:
                continue
            self.check_size(name, info.file_size)
            try:
                with self.archive.open(info) as stream:
                    yield name, self.read(name, stream, info.file_size)
            except (zipfile.BadZipFile, OSError, NotImplementedError, EOFError) as error:
                raise InvalidDataset(f"member {name!r} cannot be read ({error})",
                                     member=name) from None


class _TarMembers(_Members):
    def __init__(self, path: Path, settings: Settings) -> None:
        super().__init__(settings)
        self.path = path

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        self.total = 0
        try:
            with tarfile.open(self.path, mode="r:*") as archive:
                for index, member in enumerate(archive):
                    if index >= self.max_members:
                        raise DatasetLimitExceeded(f"images: the archive has more than "
                                                   f"{self.max_members:,} members",
                                                   images="too many members")
                    if member.issym() or member.islnk():
                        raise InvalidDataset(f"member {member.name!r} is a link; links are "
                                             "refused", member=member.name)
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise InvalidDataset(f"member {member.name!r} is not a regular file "
                                             "(device, FIFO, ...)", member=member.name)
                    name = self.check_name(member.name)
                    if name is None:
                        continue
                    self.check_size(name, member.size)
                    stream = archive.extractfile(member)
                    assert stream is not None
                    yield name, self.read(name, stream, member.size)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise InvalidDataset(f"the tar archive cannot be read ({error})",
                                 body=str(error)) from None


def _layout(names: list[str]) -> tuple[str, list[str]]:
    """``(layout, class name of each image)``: folders below the longest common top folder,
    one level (ImageFolder) or two (Omniglot) for every image."""
    folders = [PurePosixPath(name).parts[:-1] for name in names]
    shortest = min(len(parts) for parts in folders)
    strip = 0
    while (shortest - strip > 1 and len({parts[strip] for parts in folders}) == 1):
        strip += 1
    depths = collections.Counter(len(parts) - strip for parts in folders)
    for name, parts in zip(names, folders):
        depth = len(parts) - strip
        if depth not in (1, 2):
            raise InvalidDataset(
                f"member {name!r}: images must be in class folders (class/image.png) or "
                "alphabet/character folders (alphabet/character/image.png)", member=name)
        if depth != max(depths):
            raise InvalidDataset(
                f"member {name!r} is {depth} folder(s) deep, others {max(depths)}: mixed "
                "ImageFolder and Omniglot layouts", member=name)
    layout = "imagefolder" if max(depths) == 1 else "omniglot"
    return layout, ["/".join(parts[strip:]) for parts in folders]


def _open_image(name: str, data: bytes, settings: Settings):  # noqa: ANN202 - a PIL image
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InvalidDataset(f"member {name!r} is not a readable image ({error})",
                             member=name) from None
    if image.format not in IMAGE_FORMATS:
        raise InvalidDataset(f"member {name!r} is a {image.format} image; PNG, JPEG or BMP "
                             "only", member=name)
    width, height = image.size
    _check_side(height, width, settings, name)
    return image


def _convert_tree(members: _Members, workdir: Path, settings: Settings) -> Converted:
    names: list[str] = []
    sizes: collections.Counter = collections.Counter()
    gray = True
    for name, data in members:  # pass 1: names, sizes, modes (headers only)
        image = _open_image(name, data, settings)
        names.append(name)
        _check_count(len(names), settings)
        sizes[image.size] += 1
        gray = gray and image.mode in GRAY_MODES
    if not names:
        raise InvalidDataset("the archive holds no images", body="no images")
    layout, classes = _layout(names)
    class_names = sorted(set(classes))
    if len(class_names) < 2:
        raise InvalidDataset(f"the archive holds {len(class_names)} class; few-shot tasks need "
                             "at least 2", body="at least 2 classes")
    (width, height), _ = max(sizes.items(), key=lambda item: (item[1], item[0]))
    shape = [1 if gray else 3, height, width]
    _check_stored(len(names), shape, settings)
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[c] for c in classes], dtype=np.int64)
    from PIL import Image

    written = 0
    with open(workdir / DATASET_TENSORS, "wb") as out:
        out.write(_header(len(names), shape, layout))
        for position, (name, data) in enumerate(members):  # pass 2: decode and write
            if position >= len(names) or name != names[position]:
                raise InvalidDataset("the archive changed between reads", body="changed")
            image = _open_image(name, data, settings)
            try:
                image.load()
                image = image.convert("L" if gray else "RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise InvalidDataset(f"member {name!r} cannot be decoded ({error})",
                                     member=name) from None
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.uint8)
            out.write((pixels[None] if gray else pixels.transpose(2, 0, 1)).tobytes())
            written += 1
        if written != len(names):
            raise InvalidDataset("the archive changed between reads", body="changed")
        out.write(labels.tobytes())
    write_canonical_json(workdir, class_names=class_names, shape=shape, images=len(names),
                         source_format=layout)
    return Converted(workdir, layout, class_names, len(names), shape)


# --------------------------------------------------------------------------- the resource


def create_dataset(*, session: Session, owner: User, upload: Path, name: str, size: int,
                   sha256: str, settings: Settings, store: ArtifactStore) -> Dataset:
    """Convert the spooled ``upload``, publish its canonical files and record the dataset.
    Whatever fails, nothing is kept: the work directory goes, and stored objects of a dataset
    that was not recorded are removed."""
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="convert-", dir=settings.upload_dir))
    dataset_id = new_dataset_id()
    published = False
    try:
        converted = convert_upload(upload, workdir, settings)
        store.put(dataset_id, [workdir / DATASET_TENSORS, workdir / "dataset.json"])
        published = True
        with Transaction(session):
            dataset = Dataset(id=dataset_id, owner_id=owner.id, name=name,
                              format=converted.format, classes=len(converted.class_names),
                              images=converted.images, shape=converted.shape, bytes=size,
                              sha256=sha256, status="ready")
            session.add(dataset)
        published = False  # recorded: kept
        logger.info("dataset uploaded", extra={"dataset_id": dataset_id, "images": converted.images,
                                               "classes": len(converted.class_names)})
        return dataset
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if published:
            store.delete(dataset_id)


def _visible(owner: User):  # noqa: ANN202
    query = select(Dataset)
    return query if owner.is_admin else query.where(Dataset.owner_id == owner.id)


def get_dataset(*, session: Session, dataset_id: str, owner: User) -> Dataset:
    """``owner``'s dataset (any, for an admin); another user's is :class:`DatasetNotFound`."""
    with Transaction(session):
        dataset = session.scalars(_visible(owner).where(Dataset.id == dataset_id)).one_or_none()
    if dataset is None:
        raise DatasetNotFound(dataset_id=dataset_id)
    return dataset


def list_datasets(*, session: Session, owner: User, cursor: str | None = None,
                  limit: int = 50) -> tuple[list[Dataset], str | None]:
    """``owner``'s datasets newest first (an admin's: everyone's), a page of ``limit``; the
    cursor is the last id of the previous page."""
    query = _visible(owner).order_by(Dataset.id.desc()).limit(limit + 1)
    if cursor is not None:
        query = query.where(Dataset.id < cursor)
    with Transaction(session):
        rows = list(session.scalars(query))
    page = rows[:limit]
    return page, page[-1].id if len(rows) > limit else None


def jobs_using(*, session: Session, dataset_id: str) -> list[str]:
    """Ids of the queued or running jobs whose spec names ``dataset_id``."""
    rows = session.execute(select(Job.id, Job.spec).where(Job.status.in_(ACTIVE_STATUSES)))
    return [job_id for job_id, spec in rows
            if (spec.get("task_family") or {}).get("dataset") == dataset_id]


def delete_dataset(*, session: Session, dataset_id: str, owner: User,
                   store: ArtifactStore) -> None:
    """Delete ``owner``'s dataset, its row then its stored files; :class:`DatasetInUse`
    (409, naming the jobs) while a queued or running job uses it."""
    with Transaction(session):
        dataset = session.scalars(_visible(owner).where(Dataset.id == dataset_id)
                                  .with_for_update()).one_or_none()
        if dataset is None:
            raise DatasetNotFound(dataset_id=dataset_id)
        using = jobs_using(session=session, dataset_id=dataset_id)
        if using:
            raise DatasetInUse(f"dataset {dataset_id} is used by the queued or running job(s) "
                               f"{', '.join(using)}; cancel them or wait for them to finish",
                               jobs=", ".join(using))
        session.delete(dataset)
    store.delete(dataset_id)


def check_job_data(*, session: Session, owner: User, spec: JobSpec, settings: Settings) -> None:
    """At submit: the dataset a spec names must be one ``owner`` may use (422 naming
    ``task_family.dataset``), and a raw ``path`` is an admin's (or under the data root), 403
    naming ``task_family.path`` otherwise."""
    family = spec.task_family
    if family.name != "images":
        return
    if family.dataset is not None:
        try:
            get_dataset(session=session, dataset_id=family.dataset, owner=owner)
        except DatasetNotFound:
            raise DatasetReferenceInvalid(
                f"task_family.dataset: no dataset {family.dataset} of yours",
                **{"task_family.dataset": f"no dataset {family.dataset} of yours "
                                          "(GET /v1/datasets lists them)"}) from None
        return
    if owner.is_admin or _under_data_root(family.path, settings.data_root):
        return
    raise DatasetPathForbidden(
        "task_family.path: only an admin key may name a dataset path on the server; upload "
        "the dataset (POST /v1/datasets) and name it with task_family.dataset",
        **{"task_family.path": "admin keys only" + (
            f" (or a path under {settings.data_root})" if settings.data_root else "")})


def _under_data_root(path: str | None, data_root: str) -> bool:
    if not path or not data_root:
        return False
    root = Path(data_root).resolve()
    target = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    return target.is_relative_to(root)
