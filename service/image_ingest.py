"""Conversion of an uploaded image dataset (an ``.npz``, or a zip/tar of an ImageFolder or
Omniglot tree) into the canonical layout of :mod:`metaserve.workers.tasks.uploaded`; run in
the conversion child of :mod:`metaserve.service.dataset_ingest`, whose docstring lists what
is refused."""

from __future__ import annotations

import collections
import io
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator

import numpy as np

from metaserve.service.exceptions import DatasetLimitExceeded, InvalidDataset
from metaserve.service.upload_conversion import Converted, Limits, expansion_cap

# The canonical layout's writers (metaserve.workers.tasks.uploaded, .table_format) are imported
# where a dataset is written, not here: importing the tasks package imports torch (3 s of CPU,
# 200 MB), and a refused upload (every check below) should cost the conversion child neither.

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "BMP"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
PASSED_OVER = ("__MACOSX/",)
PASSED_OVER_NAMES = frozenset({".DS_Store"})
MAX_LABEL_ITEMSIZE = 1024
MAX_LABEL_BYTES = 64 * 1024**2
"""Largest ``labels`` array of an npz (N × itemsize): a million string labels of 64 bytes
each (``<U16``) fit; a million ``<U256`` labels (1 GiB) do not."""
MAX_TAR_HEADER_BYTES = 1024**2
"""Largest GNU long-name/long-link or pax extended header: read whole by :mod:`tarfile`
before any member, so a header declaring 1 GiB would be 1 GiB of memory and minutes of
decompression. A path is at most a few KiB."""
TAR_METADATA_TYPES = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK:
                      "GNU long-link", tarfile.XHDTYPE: "pax", tarfile.XGLTYPE: "pax global",
                      tarfile.SOLARIS_XHDTYPE: "Solaris pax"}
ZIP_DIRECTORY_ENTRY_BYTES = 46 + 1024
"""Average central-directory bytes per member allowed (the fixed 46 plus a name and extra
field of 1 KiB): the directory's size then bounds how many entries :mod:`zipfile` can build,
whatever count the end record claims."""
MAX_ZIP_DIRECTORY_BYTES = 256 * 1024**2


def images_meta(class_sizes: np.ndarray, shape: list[int]) -> dict[str, Any]:
    """An image dataset's metadata: classes, images, shape and images per class (minimum,
    maximum, histogram ``[[images, classes], ...]``; each class's count, in class-id order, for
    at most ``MAX_LISTED_TASKS`` classes: what the submit check splits as the family does)."""
    from metaserve.workers.tasks.table_format import MAX_LISTED_TASKS, size_histogram

    histogram, binned = size_histogram(class_sizes)
    meta: dict[str, Any] = {
        "kind": "images", "classes": int(len(class_sizes)), "images": int(class_sizes.sum()),
        "shape": [int(n) for n in shape],
        "images_per_class": {"min": int(class_sizes.min()), "max": int(class_sizes.max()),
                             "histogram": histogram, "histogram_binned": binned}}
    if len(class_sizes) <= MAX_LISTED_TASKS:
        meta["class_sizes"] = [int(n) for n in class_sizes]
    return meta


def _images_converted(layout: str, class_names: list[str], ids: np.ndarray,
                      shape: list[int]) -> Converted:
    from metaserve.workers.tasks.uploaded import DATASET_JSON, DATASET_TENSORS

    sizes = np.bincount(ids, minlength=len(class_names))
    return Converted("images", layout, [DATASET_TENSORS, DATASET_JSON], images_meta(sizes, shape))


def member_byte_cap(settings: Limits) -> int:
    """Largest archive member read: a raw RGBA image of the largest side, twice, plus 1 MiB
    (a PNG or BMP is never much larger than its raw pixels)."""
    return 8 * settings.dataset_max_image_side ** 2 + (1 << 20)


# --------------------------------------------------------------------------- conversion


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


def _check_count(count: int, settings: Limits) -> None:
    if count > settings.dataset_max_images:
        raise DatasetLimitExceeded(
            f"images: {count:,} images, more than the cap of {settings.dataset_max_images:,} "
            "(METASERVE_DATASET_MAX_IMAGES)",
            images=f"{count:,} images, more than the cap of {settings.dataset_max_images:,}")


def _check_side(height: int, width: int, settings: Limits, member: str | None = None) -> None:
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


def _check_stored(count: int, shape: list[int], settings: Limits,
                  label_bytes: int | None = None) -> None:
    """The decoded size against ``dataset_max_stored_bytes`` and against the upload's size
    (:func:`~metaserve.service.upload_conversion.expansion_cap`), before anything is decoded."""
    stored = count * int(np.prod(shape))
    if stored > settings.dataset_max_stored_bytes:
        raise DatasetLimitExceeded(
            f"images: {count:,} images of {shape} are {stored:,} bytes decoded, more than the "
            f"cap of {settings.dataset_max_stored_bytes:,} (METASERVE_DATASET_MAX_STORED_BYTES)",
            images=f"{stored:,} bytes decoded, more than {settings.dataset_max_stored_bytes:,}")
    total = stored + (8 * count if label_bytes is None else label_bytes)
    cap = expansion_cap(settings)
    if settings.upload_bytes and total > cap:
        raise DatasetLimitExceeded(
            f"images: {count:,} images of {shape} decode to {total:,} bytes from an upload of "
            f"{settings.upload_bytes:,}, more than {cap:,} ({settings.dataset_max_expansion}× "
            "the upload, METASERVE_DATASET_MAX_EXPANSION): a compression bomb?",
            images=f"{total:,} bytes decoded from {settings.upload_bytes:,} uploaded, more than "
                   f"{settings.dataset_max_expansion}×")


def _class_ids(labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    values, ids = np.unique(labels, return_inverse=True)
    if len(values) < 2:
        raise InvalidDataset(f"labels: {len(values)} class; few-shot tasks need at least 2",
                             labels="at least 2 classes")
    return [str(value) for value in values], ids.astype(np.int64)


def convert_npz(archive: zipfile.ZipFile, workdir: Path, settings: Limits) -> Converted:
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
        label_bytes = shape[0] * dtype.itemsize
        if label_bytes > MAX_LABEL_BYTES:
            raise DatasetLimitExceeded(
                f"labels: {shape[0]:,} labels of {dtype} are {label_bytes:,} bytes, more than "
                f"{MAX_LABEL_BYTES:,}; use integer labels or shorter strings",
                labels=f"{label_bytes:,} bytes, more than {MAX_LABEL_BYTES:,}")
        raw = stream.read(label_bytes)
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
        _check_stored(shape[0], image_shape, settings, label_bytes)
        if min(image_shape[1:]) < 1 or shape[0] < 1:
            raise InvalidDataset(f"images: empty array of shape {list(shape)}", images="empty")
        class_names, ids = _class_ids(labels)
        count = shape[0]
        from metaserve.workers.tasks.uploaded import (DATASET_TENSORS, copy_exactly,
                                                      write_canonical_json)

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
    return _images_converted("npz", class_names, ids, image_shape)


def _header(count: int, shape: list[int], source: str) -> bytes:
    from metaserve.workers.tasks.uploaded import safetensors_header

    return safetensors_header([("images", "U8", [count, *shape]), ("labels", "I64", [count])],
                              {"source_format": source})


# --------------------------------------------------------------------------- archives of trees


class _Members:
    """An archive's members as ``(name, bytes)`` of its image files, every refusal raised on
    the way; iterated twice (the first pass reads headers, the second decodes)."""

    def __init__(self, settings: Limits) -> None:
        self.cap = member_byte_cap(settings)
        self.max_members = member_cap(settings)
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
        self.count_bytes(name, len(data))
        return data

    def count_bytes(self, name: str, size: int) -> None:
        """Count a member's bytes (read, or skipped by decompressing) against twice the
        stored cap."""
        self.total += size
        if self.total > self.total_cap:
            raise DatasetLimitExceeded(
                f"images: the archive's members hold more than {self.total_cap:,} bytes (twice "
                f"METASERVE_DATASET_MAX_STORED_BYTES), at {name!r}", images="too many bytes")

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError


def member_cap(settings: Limits) -> int:
    """Most members an archive of images may have (directories and passed-over files too)."""
    return 2 * settings.dataset_max_images + 10_000


def check_zip_directory(path: Path, settings: Limits) -> None:
    """Refuse a zip whose end record declares more members than :func:`member_cap` or a
    central directory larger than its members can need, before :mod:`zipfile` builds one
    object per entry (3,000,000 empty entries would be 1.5 GB of them)."""
    with open(path, "rb") as handle:
        try:
            end = zipfile._EndRecData(handle)  # the end record, zip64 included
        except OSError as error:
            raise InvalidDataset(f"the upload is not a readable zip archive ({error})",
                                 body=str(error)) from None
    if end is None:
        raise InvalidDataset("the upload is not a readable zip archive (no end of central "
                             "directory record)", body="no end of central directory record")
    entries, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    cap = member_cap(settings)
    if entries > cap:
        raise DatasetLimitExceeded(
            f"body: the zip declares {entries:,} members, more than {cap:,} (twice "
            "METASERVE_DATASET_MAX_IMAGES plus 10,000)", body=f"{entries:,} members")
    directory_cap = min(MAX_ZIP_DIRECTORY_BYTES, max(1, entries) * ZIP_DIRECTORY_ENTRY_BYTES)
    if directory > directory_cap:
        raise DatasetLimitExceeded(
            f"body: the zip's central directory is {directory:,} bytes for {entries:,} declared "
            f"members, more than {directory_cap:,}", body=f"a {directory:,}-byte directory")


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose metadata records (GNU long names, pax headers) are refused above
    :data:`MAX_TAR_HEADER_BYTES` *before* :mod:`tarfile` reads them whole, and whose sparse
    members are refused (their maps are read whole too, and images are never sparse)."""

    def _proc_member(self, tarfile_: tarfile.TarFile):  # noqa: ANN202 - tarfile's hook
        kind = TAR_METADATA_TYPES.get(self.type)
        if kind is not None and self.size > MAX_TAR_HEADER_BYTES:
            raise InvalidDataset(
                f"body: a {kind} header at byte {self.offset:,} of the tar declares "
                f"{self.size:,} bytes, more than {MAX_TAR_HEADER_BYTES:,}",
                body=f"a {self.size:,}-byte {kind} header")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise InvalidDataset(f"member {self.name!r} is a sparse file; sparse members are "
                                 "refused", member=self.name)
        return super()._proc_member(tarfile_)


def is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar (plain or compressed), read through :class:`BoundedTarInfo`
    (:func:`tarfile.is_tarfile` would read a first long-name header whole)."""
    try:
        with tarfile.open(path, mode="r:*", tarinfo=BoundedTarInfo):
            return True
    except (OSError, EOFError, tarfile.TarError):
        return False


class ZipMembers(_Members):
    def __init__(self, archive: zipfile.ZipFile, settings: Limits) -> None:
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


class TarMembers(_Members):
    def __init__(self, path: Path, settings: Limits) -> None:
        super().__init__(settings)
        self.path = path

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        self.total = 0
        try:
            with tarfile.open(self.path, mode="r:*", tarinfo=BoundedTarInfo) as archive:
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
                    if name is None:  # passed over, but a compressed tar decompresses it
                        self.count_bytes(member.name, member.size)
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


def _open_image(name: str, data: bytes, settings: Limits):  # noqa: ANN202 - a PIL image
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise _bomb(name, error) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InvalidDataset(f"member {name!r} is not a readable image ({error})",
                             member=name) from None
    if image.format not in IMAGE_FORMATS:
        raise InvalidDataset(f"member {name!r} is a {image.format} image; PNG, JPEG or BMP "
                             "only", member=name)
    width, height = image.size
    _check_side(height, width, settings, name)
    return image


def _bomb(name: str, error: Exception) -> DatasetLimitExceeded:
    """PIL refuses images above twice ``Image.MAX_IMAGE_PIXELS`` before decoding them."""
    return DatasetLimitExceeded(
        f"member {name!r}: a decompression bomb ({error})", member=name,
        shape=f"{name!r}: more pixels than PIL decodes (sides above "
              "METASERVE_DATASET_MAX_IMAGE_SIDE)")


def convert_tree(members: _Members, workdir: Path, settings: Limits) -> Converted:
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

    from metaserve.workers.tasks.uploaded import DATASET_TENSORS, write_canonical_json

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
            except Image.DecompressionBombError as error:
                raise _bomb(name, error) from None
            except (OSError, ValueError) as error:
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
    return _images_converted(layout, class_names, labels, shape)
