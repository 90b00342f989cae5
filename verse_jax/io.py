"""Reading and writing VerSe files: CT volumes, label masks, centroid JSON, data set layouts.

The only module that touches SimpleITK files and SimpleITK's (z, y, x) numpy view. Arrays handed out
are (x, y, z); geometry is ``verse_jax.geometry.Geometry`` (LPS physical mm).
"""

import gzip
import json
import logging
import math
import os
import re
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from verse_jax import labels as label_ids
from verse_jax.geometry import Geometry, Volume, axis_codes, reorientation_to_codes

logger = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


class VerseFormatError(ValueError):
    """A file is missing, unreadable or does not follow the expected VerSe format."""


# ---------------------------------------------------------------------------------------------
# Volumes


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Volume (array (x, y, z)) -> SimpleITK image with the same geometry (bool -> uint8)."""
    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)), isVector=False)
    geometry = volume.geometry
    image.SetSpacing(geometry.spacing_mm)
    image.SetOrigin(geometry.origin_mm)
    image.SetDirection(geometry.direction)
    return image


def volume_from_sitk(image: sitk.Image) -> Volume:
    """SimpleITK 3-D scalar image -> Volume with array (x, y, z) in the image's pixel type."""
    if image.GetDimension() != 3:
        raise ValueError(
            f"expected a 3-D image, got {image.GetDimension()}-D size {image.GetSize()}"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components"
        )
    geometry = Geometry(
        image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    )
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    return Volume(array, geometry)


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise VerseFormatError(f"{path}: file not found")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        message = str(error).strip().splitlines()
        detail = message[-1] if message else "unknown error"
        raise VerseFormatError(f"{path}: cannot read image ({detail})") from error


_DICOM_SLICE_SUFFIXES = (".dcm", ".ima", "")
_SPACING_TOLERANCE = 0.01  # relative deviation of one slice gap from the median gap


def _read_dicom_series(folder: Path) -> sitk.Image:
    """Read the (first) DICOM series of a folder; refuse missing, unreadable or unevenly spaced
    slices, which ITK would silently skip (averaging the spacing over the gap)."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VerseFormatError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        logger.warning("%s holds %d DICOM series; reading %s", folder, len(series), series[0])
    listed = {Path(f).name for s in series for f in reader.GetGDCMSeriesFileNames(str(folder), s)}
    for item in sorted(folder.iterdir()):
        candidate = item.suffix.lower() in _DICOM_SLICE_SUFFIXES and item.name != "DICOMDIR"
        if (
            item.is_file()
            and candidate
            and not item.name.startswith(".")
            and item.name not in listed
        ):
            raise VerseFormatError(
                f"{folder}: slice {item.name} is not a readable DICOM slice of the series "
                "(corrupt, truncated or from another scan); fix or remove it"
            )
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    _check_slice_spacing(folder, reader, [Path(f).name for f in files])
    return image


def _check_slice_spacing(folder: Path, reader: sitk.ImageSeriesReader, names: list[str]) -> None:
    """Slice positions (0020|0032) along the slice normal must be evenly spaced."""
    try:
        position = [
            [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
            for i in range(len(names))
        ]
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        logger.warning("%s: slices without position/orientation tags; spacing not checked", folder)
        return
    if len(names) < 3:
        return
    normal = np.cross(cosines[:3], cosines[3:6])
    gaps = np.diff(np.asarray(position, np.float64) @ normal)
    typical = float(np.median(np.abs(gaps)))
    bad = np.flatnonzero(np.abs(np.abs(gaps) - typical) > _SPACING_TOLERANCE * typical + 1e-4)
    if typical == 0 or len(bad):
        i = int(bad[0]) if len(bad) else 0
        raise VerseFormatError(
            f"{folder}: uneven slice spacing: {abs(gaps[i]):.4g} mm between slices {names[i]} and "
            f"{names[i + 1]}, {typical:.4g} mm elsewhere (missing or unreadable slice?)"
        )


@dataclass(frozen=True)
class _NiftiLayout:
    data_offset: int
    data_end: int
    dtype: np.dtype | None  # numpy type of floating-point voxel data, None for other types


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Where the voxel data of a NIfTI-1/2 header lies and its float type (None if not NIfTI)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype = struct.unpack(order + "h", header[12:14])[0]
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    float_type = _NIFTI_FLOAT_TYPES.get(int(datatype))
    dtype = np.dtype(order + float_type) if float_type else None
    return _NiftiLayout(offset, offset + count * bitpix // 8, dtype)


def _count_non_finite_nifti(path: Path, compressed: bool, layout: _NiftiLayout) -> int:
    """Non-finite float voxels in the file's own data (ITK reads NIfTI NaN as 0)."""
    itemsize, total = layout.dtype.itemsize, 0
    with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
        stream.seek(layout.data_offset)
        remaining = layout.data_end - layout.data_offset
        while remaining > 0:
            chunk = stream.read(min(remaining, (1 << 24) * itemsize))
            if not chunk:
                break
            remaining -= len(chunk)
            values = np.frombuffer(chunk[: len(chunk) // itemsize * itemsize], layout.dtype)
            total += int(values.size - np.count_nonzero(np.isfinite(values)))
    return total


def _gzip_length(path: Path) -> int:
    """Uncompressed length of a complete gzip file; VerseFormatError if it is truncated/corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise VerseFormatError(f"{path}: truncated or corrupt gzip data ({error})") from error
    return total


def _check_nifti_data(path: Path) -> None:
    """ITK reads truncated NIfTI files without complaint and NaN voxels as 0: compare the data
    length to the header, and refuse non-finite float voxels."""
    name = path.name.lower()
    if path.is_dir() or not name.endswith((".nii", ".nii.gz")):
        return
    try:
        with path.open("rb") as stream:
            compressed = stream.read(2) == b"\x1f\x8b"  # gzip magic, whatever the name says
        with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
            layout = _nifti_layout(stream.read(544))
    except (OSError, EOFError, zlib.error) as error:
        raise VerseFormatError(f"{path}: unreadable NIfTI file ({error})") from error
    if layout is None:
        raise VerseFormatError(f"{path}: not a NIfTI file (bad header size field)")
    end = layout.data_end
    if not compressed:
        length = path.stat().st_size
    else:
        with path.open("rb") as stream:  # gzip trailer: length mod 2**32 (fast path)
            stream.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", stream.read(4))[0]
        length = end if trailer == end % 2**32 else _gzip_length(path)
    if length < end:
        raise VerseFormatError(f"{path}: truncated NIfTI file ({length} of {end} bytes)")
    if layout.dtype is not None:
        _refuse_non_finite(path, _count_non_finite_nifti(path, compressed, layout), layout.dtype)


def _refuse_non_finite(path: Path, count: int, dtype: np.dtype) -> None:
    if count:
        raise VerseFormatError(
            f"{path}: {count} voxels are NaN or infinite ({np.dtype(dtype).name} data); "
            "an image must hold finite values"
        )


def read_volume(path) -> Volume:
    """Read a 3-D image: NIfTI (.nii, .nii.gz), NRRD, MHA/MHD or a DICOM series folder.

    Args:
        path: file, or folder holding one DICOM series.

    Returns:
        Volume with array (x, y, z) in the file's pixel type and the exact file geometry.

    Raises:
        VerseFormatError: missing/unreadable file, not 3-D, not a scalar image, NaN or infinite
            voxels (checked in the file's own data type: ITK reads NIfTI NaN as 0), or a DICOM
            series with a missing, unreadable or unevenly spaced slice.
    """
    path = Path(path)
    image = _read_sitk(path)
    _check_nifti_data(path)
    try:
        volume = volume_from_sitk(image)
    except ValueError as error:
        raise VerseFormatError(f"{path}: {error}") from error
    if np.issubdtype(volume.array.dtype, np.floating):
        _refuse_non_finite(
            path, int(np.count_nonzero(~np.isfinite(volume.array))), volume.array.dtype
        )
    return volume


def read_geometry(path) -> Geometry:
    """Grid of an image file from its header alone (a DICOM folder is read whole)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return read_volume(path).geometry
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise VerseFormatError(f"{path}: cannot read image header ({error})") from error
    if reader.GetDimension() != 3:
        raise VerseFormatError(f"{path}: expected a 3-D image, got {reader.GetDimension()}-D")
    return Geometry(
        reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    )


def _as_labels(array: np.ndarray, path) -> np.ndarray:
    """Integer-valued label array (any dtype) -> uint16; VerseFormatError otherwise."""
    if array.dtype == np.bool_:
        return array.astype(np.uint16, copy=False)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise VerseFormatError(f"{path}: mask holds non-finite values")
        fractional = array != np.round(array)
        if np.any(fractional):
            bad = array[fractional].flat[0]
            raise VerseFormatError(f"{path}: mask holds non-integer label values (e.g. {bad})")
    elif not np.issubdtype(array.dtype, np.integer):
        raise VerseFormatError(f"{path}: mask pixel type {array.dtype} is not numeric")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise VerseFormatError(
            f"{path}: mask labels must lie in 0..65535, got {array.min()}..{array.max()}"
        )
    return array.astype(np.uint16, copy=False)


def read_mask(path) -> Volume:
    """Read a multi-label mask as integer labels (uint16 array (x, y, z)), exact file geometry.

    Float files (real VerSe masks are float64 on disk) are accepted when every value is an integer.

    Raises:
        VerseFormatError: unreadable file, not 3-D, non-integer or negative labels.
    """
    volume = read_volume(path)
    return Volume(_as_labels(volume.array, Path(path)), volume.geometry)


def temporary_path(path) -> Path:
    """Hidden temporary name beside ``path`` that keeps the extension (SimpleITK picks by it).

    ``.<stem>.<pid>-<random>.tmp<suffix>``: the writer's process id lets a later run tell a file
    left by a killed run from one still being written (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    suffix = _suffix(path.name)
    return path.with_name(
        f"{_temporary_prefix(path.name)}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}"
    )


def _suffix(name: str) -> str:
    return ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix


def _temporary_prefix(name: str) -> str:
    """``.<stem>.``: how the temporary names of output ``name`` begin."""
    suffix = _suffix(name)
    return f".{name[: len(name) - len(suffix)] if suffix else name}."


_TEMPORARY = re.compile(  # this version's names, then older ones (without process id)
    r"^\..+\.((?P<pid>\d+)-[0-9a-f]{8}|[0-9a-f]{12})\.tmp(\.[A-Za-z.]+)?$|^\..+\.tmp-[0-9a-f]{8}$"
)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def remove_stale_temporaries(folder, names=None) -> list[Path]:
    """Delete the temporary files (:func:`temporary_path`) in ``folder`` whose writer is gone.

    Files of a process still running on this machine are kept (another run into the same folder).

    Args:
        folder: the folder.
        names: only temporaries of these output file names (other hosts' shards write into the
            same folder, and their process ids mean nothing here); None: every temporary.

    Returns:
        The paths removed.
    """
    prefixes = None if names is None else tuple(_temporary_prefix(n) for n in names)
    removed = []
    for item in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        match = _TEMPORARY.match(item.name)
        if not match or not item.is_file():
            continue
        if prefixes is not None and not item.name.startswith(prefixes):
            continue
        if match["pid"] and _process_alive(int(match["pid"])):
            continue
        item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def _atomic_write_image(path, image: sitk.Image) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise VerseFormatError(f"{path}: folder {path.parent} does not exist")
    temporary = temporary_path(path)
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        os.replace(temporary, path)
    except RuntimeError as error:
        raise VerseFormatError(f"{path}: cannot write image ({error})") from error
    finally:
        if temporary.exists():
            temporary.unlink()


def write_volume(path, volume: Volume) -> None:
    """Write a volume (any format SimpleITK knows by extension) atomically, keeping its dtype."""
    _atomic_write_image(path, volume_to_sitk(volume))


def write_mask(path, volume: Volume) -> None:
    """Write a label volume atomically as uint8 (max label < 256) or uint16."""
    labels = _as_labels(np.asarray(volume.array), Path(path))
    dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.uint16
    _atomic_write_image(path, volume_to_sitk(Volume(labels.astype(dtype), volume.geometry)))


def check_same_grid(image_geometry: Geometry, mask_geometry: Geometry, path) -> None:
    """Raise VerseFormatError naming ``path`` if the mask grid differs from the image grid.

    Sizes must match exactly; spacing within 1e-4 relative, direction within 1e-4, origin within
    1e-4 relative plus 1e-4 of the largest spacing (NIfTI stores origins as float32).
    """
    a, b = image_geometry, mask_geometry
    tolerance = 1e-4 * max(a.spacing_mm)
    problems = []
    if a.size != b.size:
        problems.append(f"size {b.size} != {a.size}")
    if not np.allclose(b.spacing_mm, a.spacing_mm, rtol=1e-4, atol=0.0):
        problems.append(f"spacing {b.spacing_mm} != {a.spacing_mm}")
    if not np.allclose(b.origin_mm, a.origin_mm, rtol=1e-4, atol=tolerance):
        problems.append(f"origin {b.origin_mm} != {a.origin_mm}")
    if not np.allclose(b.direction, a.direction, rtol=0.0, atol=1e-4):
        problems.append(f"direction {b.direction} != {a.direction}")
    if problems:
        raise VerseFormatError(f"{path}: grid differs from its image: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Centroids


@dataclass(frozen=True, eq=False)  # array fields: compare arrays explicitly
class Centroids:
    """Vertebra centroids.

    Attributes:
        labels: (N,) int64 VerSe ids (1-25, 28).
        points_mm: (N, 3) float64 physical points, LPS mm.
    """

    labels: np.ndarray
    points_mm: np.ndarray

    def __post_init__(self):
        labels = np.asarray(self.labels)
        points = np.asarray(self.points_mm, np.float64)
        if labels.ndim != 1:
            raise ValueError(f"Centroids labels must have shape (N,), got {labels.shape}")
        if points.shape != (labels.shape[0], 3):
            raise ValueError(
                f"Centroids points_mm must have shape ({labels.shape[0]}, 3), got {points.shape}"
            )
        if labels.size and not np.all(labels == np.round(labels)):
            raise ValueError(f"Centroids labels must be integers, got {labels}")
        if not np.all(np.isfinite(points)):
            raise ValueError("Centroids points_mm must be finite")
        object.__setattr__(self, "labels", labels.astype(np.int64))
        object.__setattr__(self, "points_mm", points)


# VerSe'19 (MICCAI) JSON axes are millimetres in the RAI-reoriented (identity direction), origin-0
# image: internal x = Z, y = Y, z = S_z * h_z - X (docs/reference.md §2.2).
_IDENTITY_CODES = ("L", "P", "S")


def _load_json_list(path: Path) -> list:
    if not path.is_file():
        raise VerseFormatError(f"{path}: file not found")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VerseFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise VerseFormatError(f"{path}: expected a JSON list, got {type(entries).__name__}")
    return entries


def _parse_entry(entry, path: Path, position: int) -> tuple[int, tuple[float, float, float]]:
    if not isinstance(entry, dict):
        raise VerseFormatError(f"{path}: entry {position} is not an object: {entry!r}")
    missing = [key for key in ("label", "X", "Y", "Z") if key not in entry]
    if missing:
        raise VerseFormatError(f"{path}: entry {position} misses keys {missing}: {entry!r}")
    label, coords = entry["label"], [entry[key] for key in ("X", "Y", "Z")]
    if not _is_finite_number(label) or label != int(label):
        raise VerseFormatError(f"{path}: entry {position} has a non-integer label {label!r}")
    if int(label) not in label_ids.VALID_LABELS:
        raise VerseFormatError(f"{path}: entry {position} has unknown VerSe label id {label}")
    for value in coords:
        if not _is_finite_number(value):
            raise VerseFormatError(f"{path}: entry {position} has a bad coordinate {value!r}")
    return int(label), tuple(float(v) for v in coords)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _verse19_to_reoriented_index(coords: np.ndarray, reoriented: Geometry) -> np.ndarray:
    """VerSe'19 JSON (N, 3) mm -> continuous index in the identity-oriented (LPS codes) grid."""
    size, spacing = np.array(reoriented.size), np.array(reoriented.spacing_mm)
    internal_mm = np.stack(
        [coords[:, 2], coords[:, 1], size[2] * spacing[2] - coords[:, 0]], axis=-1
    )
    return internal_mm / spacing


def read_centroids(json_path, geometry: Geometry) -> Centroids:
    """Read a centroid JSON of either VerSe flavour into physical points of ``geometry``'s world.

    * BIDS/re-released: first entry ``{"direction": [c0, c1, c2]}`` (to-naming axis codes), then
      ``{label, X, Y, Z}`` continuous voxel indices of the image reoriented (permute/flip only) so
      that its index axes point towards the codes. Mapped back through that reorientation and the
      image's exact (possibly oblique) geometry.
    * VerSe'19/MICCAI: no direction entry; millimetres in the identity-oriented, origin-0 image.

    Args:
        json_path: the ``*_ctd.json`` file.
        geometry: grid of the image (or mask) the centroids belong to.

    Raises:
        VerseFormatError: missing/invalid JSON, unknown labels, missing keys, non-finite values.
    """
    path = Path(json_path)
    entries = _load_json_list(path)
    codes = None
    if entries and isinstance(entries[0], dict) and "direction" in entries[0]:
        codes, entries = entries[0]["direction"], entries[1:]
        if not isinstance(codes, list | tuple) or not all(isinstance(c, str) for c in codes):
            raise VerseFormatError(f"{path}: bad direction entry {codes!r}")
    parsed = [_parse_entry(entry, path, i + (codes is not None)) for i, entry in enumerate(entries)]
    labels = np.array([label for label, _ in parsed], np.int64)
    coords = np.array([c for _, c in parsed], np.float64).reshape(-1, 3)
    if len(set(labels.tolist())) != len(labels):
        raise VerseFormatError(f"{path}: duplicate labels {sorted(labels.tolist())}")
    try:
        record = reorientation_to_codes(geometry, _IDENTITY_CODES if codes is None else codes)
    except ValueError as error:
        raise VerseFormatError(f"{path}: {error}") from error
    if codes is None:
        coords = _verse19_to_reoriented_index(coords, record.geometry)
    points_mm = geometry.index_to_physical(record.to_original_index(coords))
    return Centroids(labels, points_mm.reshape(-1, 3))


def json_safe(value):
    """``value`` with non-finite floats as None and dict keys as strings, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and a rename."""
    if not path.parent.is_dir():
        raise VerseFormatError(f"{path}: folder {path.parent} does not exist")
    temporary = temporary_path(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


CENTROID_FORMATS = ("bids", "verse19")


def write_centroids(json_path, centroids: Centroids, geometry: Geometry, fmt: str = "bids") -> None:
    """Write centroids atomically in either VerSe flavour (``read_centroids`` reads both).

    ``"bids"`` (default): the grid's axis codes ``axis_codes(geometry.direction)`` and plain
    continuous voxel indices of ``geometry``. ``"verse19"``: the MICCAI release's millimetres in
    the identity-oriented, origin-0 image (``X = S_z h_z - z``, ``Y = y``, ``Z = x``), as the
    original's writer and evaluators for that release expect. Full float precision is kept
    (write -> read is exact to ~1e-9 mm).
    """
    if fmt not in CENTROID_FORMATS:
        raise ValueError(f"centroid format must be one of {CENTROID_FORMATS}, got {fmt!r}")
    path = Path(json_path)
    points_vox = geometry.physical_to_index(centroids.points_mm).reshape(-1, 3)
    entries: list[dict] = []
    if fmt == "bids":
        entries.append({"direction": list(axis_codes(geometry.direction))})
        coords = points_vox
    else:
        record = reorientation_to_codes(geometry, _IDENTITY_CODES)
        size = np.array(record.geometry.size, np.float64)
        spacing = np.array(record.geometry.spacing_mm, np.float64)
        internal_mm = record.from_original_index(points_vox).reshape(-1, 3) * spacing
        coords = np.stack(
            [size[2] * spacing[2] - internal_mm[:, 2], internal_mm[:, 1], internal_mm[:, 0]], -1
        )
    for label, (x, y, z) in zip(centroids.labels.tolist(), coords.tolist(), strict=True):
        entries.append({"label": int(label), "X": x, "Y": y, "Z": z})
    write_text_atomic(path, json.dumps(entries) + "\n")


def centroids_to_landmarks(
    centroids: Centroids, num_landmarks: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids -> landmark arrays indexed by ``labels.label_to_index``.

    Returns:
        points_mm (K, 3) float64 (zeros where invalid), valid (K,) bool.

    Raises:
        ValueError: a label has no index among ``num_landmarks`` (e.g. T13 with 25 landmarks).
    """
    points = np.zeros((num_landmarks, 3), np.float64)
    valid = np.zeros((num_landmarks,), bool)
    for label, point in zip(centroids.labels.tolist(), centroids.points_mm, strict=True):
        index = label_ids.label_to_index(label, num_landmarks)
        points[index], valid[index] = point, True
    return points, valid


def landmarks_to_centroids(points_mm, valid) -> Centroids:
    """Landmark arrays points_mm (K, 3), valid (K,) bool -> Centroids of the valid ones."""
    points_mm, valid = np.asarray(points_mm, np.float64), np.asarray(valid, bool)
    if points_mm.ndim != 2 or points_mm.shape[1] != 3 or valid.shape != points_mm.shape[:1]:
        raise ValueError(
            f"expected points_mm (K, 3) and valid (K,), got {points_mm.shape}, {valid.shape}"
        )
    labels = label_ids.index_to_label_array(points_mm.shape[0])
    return Centroids(labels[valid], points_mm[valid])


# ---------------------------------------------------------------------------------------------
# Data set layouts


@dataclass(frozen=True)
class Case:
    """One scan of a data set: CT path and, when present, its mask and centroid JSON."""

    case_id: str
    image_path: Path
    mask_path: Path | None
    centroids_path: Path | None


_MICCAI_IMAGE = re.compile(r"^(?P<id>.*\d)\.nii(\.gz)?$")
_BIDS_IMAGE = re.compile(r"^(?P<prefix>sub-.+)_ct\.nii(\.gz)?$")


def _first_existing(candidates) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _miccai_cases(root: Path) -> list[Case]:
    cases = []
    for image in sorted(root.iterdir()):
        match = _MICCAI_IMAGE.match(image.name)
        if not match or not image.is_file():
            continue
        case_id = match["id"]
        mask = _first_existing([root / f"{case_id}_seg.nii.gz", root / f"{case_id}_seg.nii"])
        centroids = _first_existing([root / f"{case_id}_ctd.json"])
        cases.append(Case(case_id, image, mask, centroids))
    if not any(case.mask_path or case.centroids_path for case in cases):
        return []  # CTs whose names end in a digit, but no annotation: not a VerSe'19 data set
    return cases


def _bids_cases(root: Path) -> list[Case]:
    rawdata, derivatives = root / "rawdata", root / "derivatives"
    images = sorted([*rawdata.glob("sub-*/*_ct.nii*"), *rawdata.glob("sub-*/*/*_ct.nii*")])
    cases = []
    for image in images:
        match = _BIDS_IMAGE.match(image.name)
        if not match or not image.is_file():
            continue
        prefix = match["prefix"]
        subject = image.relative_to(rawdata).parts[0]
        found = sorted((derivatives / subject).rglob(f"{prefix}_*")) if derivatives.is_dir() else []
        by_name = {p.name: p for p in found}
        mask = by_name.get(f"{prefix}_seg-vert_msk.nii.gz") or by_name.get(
            f"{prefix}_seg-vert_msk.nii"
        )
        cases.append(
            Case(
                prefix.removeprefix("sub-"),
                image,
                mask,
                by_name.get(f"{prefix}_seg-subreg_ctd.json"),
            )
        )
    return cases


def find_cases(root) -> list[Case]:
    """Discover the scans of a data set folder, sorted by case id.

    Layouts:
        * MICCAI (VerSe'19): ``root/verseNNN.nii.gz`` (any name ending in a digit),
          ``verseNNN_seg.nii.gz``, ``verseNNN_ctd.json``; case id ``verseNNN``. Recognised only
          when at least one such CT has its mask or centroid JSON beside it.
        * BIDS (re-release, phantoms): ``root/rawdata/sub-<id>[/ses-*]/sub-<id>[_...]_ct.nii.gz``,
          ``root/derivatives/sub-<id>/.../<prefix>_seg-vert_msk.nii.gz`` and
          ``<prefix>_seg-subreg_ctd.json``; case id = file prefix without ``sub-`` (``<id>[_...]``).

    Returns:
        The cases; empty when ``root`` follows neither layout.

    Raises:
        VerseFormatError: ``root`` is not a folder, or two scans share a case id.
    """
    root = Path(root)
    if not root.is_dir():
        raise VerseFormatError(f"{root}: data set folder not found")
    cases = _miccai_cases(root) + _bids_cases(root)
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise VerseFormatError(f"{root}: duplicate case ids {duplicates}")
    return sorted(cases, key=lambda case: case.case_id)


def read_splits(root) -> dict[str, list[str]]:
    """Read ``root/splits.json`` -> {"train": [...], "val": [...], "test": [...]} (case ids).

    Missing standard keys are returned as empty lists; extra keys are kept.

    Raises:
        VerseFormatError: missing file, invalid JSON, not a dict of string lists.
    """
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise VerseFormatError(f"{path}: file not found")
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VerseFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(splits, dict):
        raise VerseFormatError(f"{path}: expected a JSON object, got {type(splits).__name__}")
    for key, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise VerseFormatError(f"{path}: split {key!r} must be a list of case id strings")
    return {"train": [], "val": [], "test": [], **splits}
