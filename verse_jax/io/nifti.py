"""NIfTI completeness check: a truncated file or non-finite voxels are refused before reading.

SimpleITK reads a truncated ``.nii``/``.nii.gz`` as zeros past the end; the header's data offset
and size tell how many bytes the voxels need, and float data is scanned for NaN/inf.
"""

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verse_jax.io.files import VerseFormatError


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


def check_nifti_data(path: Path) -> None:
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
        refuse_non_finite(path, _count_non_finite_nifti(path, compressed, layout), layout.dtype)


def refuse_non_finite(path: Path, count: int, dtype: np.dtype) -> None:
    if count:
        raise VerseFormatError(
            f"{path}: {count} voxels are NaN or infinite ({np.dtype(dtype).name} data); "
            "an image must hold finite values"
        )
