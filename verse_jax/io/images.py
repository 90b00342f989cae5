"""CT volumes and label masks: reading (NIfTI, NRRD, MHA, DICOM series) and atomic writing.

The only module that touches SimpleITK files and SimpleITK's (z, y, x) numpy view. Arrays handed out
are (x, y, z); geometry is ``verse_jax.geometry.Geometry`` (LPS physical mm).
"""

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from verse_jax.geometry import Geometry, Volume
from verse_jax.io.files import VerseFormatError, atomic_path
from verse_jax.io.nifti import check_nifti_data, refuse_non_finite

logger = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


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
    check_nifti_data(path)
    try:
        volume = volume_from_sitk(image)
    except ValueError as error:
        raise VerseFormatError(f"{path}: {error}") from error
    if np.issubdtype(volume.array.dtype, np.floating):
        refuse_non_finite(
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


def _atomic_write_image(path, image: sitk.Image) -> None:
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
    except RuntimeError as error:
        raise VerseFormatError(f"{path}: cannot write image ({error})") from error


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
