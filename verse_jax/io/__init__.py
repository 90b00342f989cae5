"""Files in and out: CT volumes and masks, centroid JSON, data set layouts, atomic writes.

``images`` (volumes and masks, with the NIfTI completeness check of ``nifti``), ``centroids``
(both VerSe JSON flavours, landmark arrays), ``datasets`` (cases of a data set, splits, folds, the
command line's inputs), ``files`` (the one atomic-write helper); ``probabilities`` and
``dicom_seg`` write the optional outputs of ``verse-jax predict``. The names of the first four are
available here (``from verse_jax import io; io.read_volume(...)``).
"""

from verse_jax.io.centroids import (
    CENTROID_FORMATS,
    Centroids,
    centroids_to_landmarks,
    landmarks_to_centroids,
    read_centroids,
    write_centroids,
)
from verse_jax.io.datasets import (
    NUM_FOLDS,
    Case,
    case_id_from_path,
    find_cases,
    find_inputs,
    read_fold_file,
    read_splits,
    select_case_ids,
)
from verse_jax.io.files import (
    VerseFormatError,
    atomic_directory,
    atomic_path,
    json_safe,
    remove_stale_temporaries,
    temporary_path,
    write_bytes_atomic,
    write_text_atomic,
)
from verse_jax.io.images import (
    IMAGE_SUFFIXES,
    check_same_grid,
    read_geometry,
    read_mask,
    read_volume,
    volume_from_sitk,
    volume_to_sitk,
    write_mask,
    write_volume,
)

__all__ = [
    "VerseFormatError",
    "temporary_path",
    "remove_stale_temporaries",
    "json_safe",
    "atomic_path",
    "write_text_atomic",
    "write_bytes_atomic",
    "atomic_directory",
    "IMAGE_SUFFIXES",
    "volume_to_sitk",
    "volume_from_sitk",
    "read_volume",
    "read_geometry",
    "read_mask",
    "write_volume",
    "write_mask",
    "check_same_grid",
    "Centroids",
    "read_centroids",
    "CENTROID_FORMATS",
    "write_centroids",
    "centroids_to_landmarks",
    "landmarks_to_centroids",
    "Case",
    "find_cases",
    "read_splits",
    "NUM_FOLDS",
    "read_fold_file",
    "select_case_ids",
    "case_id_from_path",
    "find_inputs",
]
