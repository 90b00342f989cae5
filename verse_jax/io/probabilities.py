"""Probability maps on disk: NIfTI with 16-bit integers and a scale factor (``scl_slope``).

NIfTI has no float16 type, so a probability in [0, 1] is stored as ``round(p * 65535)`` (uint16)
with ``scl_slope = 1 / 65535``: as small as float16 on disk, with a uniform error below 7.7e-6
(float16's step near 1 is 4.9e-4). NIfTI readers apply the slope (ITK/SimpleITK, nibabel, 3D
Slicer) and hand out floats; `read_probabilities` does so too.
"""

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

from verse_jax.geometry import Volume
from verse_jax.io.files import atomic_path
from verse_jax.io.images import read_volume, write_volume

SCALE = 65535
_SLOPE_OFFSET = 112  # NIfTI-1 header: float32 scl_slope at 112, scl_inter at 116


def write_probabilities(path, probabilities: Volume) -> Path:
    """Write a probability Volume (values in [0, 1], any float dtype) as a scaled uint16 NIfTI.

    Args:
        path: ``.nii.gz`` or ``.nii`` file.
        probabilities: (x, y, z) Volume.

    Raises:
        ValueError: values outside [0, 1] or not finite; the folder does not exist.
    """
    path = Path(path)
    values = np.asarray(probabilities.array, np.float32)
    if values.size and not (
        np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1
    ):
        raise ValueError(f"{path}: probabilities must lie in [0, 1]")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    quantised = np.rint(values * SCALE).astype(np.uint16)
    compressed = path.name.lower().endswith(".gz")
    with atomic_path(path) as final:
        plain = final.with_name(final.name[: -len(".gz")]) if compressed else final
        try:
            write_volume(plain, Volume(quantised, probabilities.geometry))  # uncompressed
            with plain.open("r+b") as stream:
                order = "<" if struct.unpack("<i", stream.read(4))[0] == 348 else ">"
                stream.seek(_SLOPE_OFFSET)
                stream.write(struct.pack(order + "2f", 1.0 / SCALE, 0.0))
            if compressed:
                with plain.open("rb") as source, gzip.open(final, "wb", compresslevel=6) as target:
                    shutil.copyfileobj(source, target, 1 << 22)
        finally:
            if compressed and plain.exists():
                plain.unlink()
    return path


def read_probabilities(path) -> Volume:
    """Read a probability NIfTI as float32 (the reader applies ``scl_slope``)."""
    volume = read_volume(path)
    return Volume(np.asarray(volume.array, np.float32), volume.geometry)
