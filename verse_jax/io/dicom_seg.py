"""DICOM Segmentation objects (highdicom) for masks predicted on a DICOM series, and reading back.

Needs the optional extra ``pip install 'verse-jax[dicom]'`` (highdicom, pydicom). One segment per
vertebra, numbered 1..N in label order; its label is the VerSe name ("L1"), its type SNOMED CT
"Vertebra" (51282000) in the category "Anatomical Structure" (91723000), its display colour the
previews' colour. Frames are matched to the series' slices by their image position, so the mask
must be on the grid SimpleITK reads from the series (`io.read_volume` of the folder).
"""

import importlib.util
from pathlib import Path

import numpy as np

from verse_jax import __version__
from verse_jax.geometry import Volume
from verse_jax.io.files import atomic_path
from verse_jax.labels import VERTEBRA_NAMES, label_colors, vertebra_name

_VERTEBRA = ("51282000", "SCT", "Vertebra")
_ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")


def available() -> bool:
    """Whether highdicom is installed."""
    return importlib.util.find_spec("highdicom") is not None


def _require():
    if not available():
        raise ValueError("DICOM-SEG needs highdicom: pip install 'verse-jax[dicom]'")
    import highdicom
    import pydicom

    return highdicom, pydicom


def series_datasets(folder) -> list:
    """pydicom datasets of the series `io.read_volume` reads from ``folder`` (its first series).

    Raises:
        ValueError: no DICOM series in ``folder``.
    """
    import SimpleITK as sitk

    _, pydicom = _require()
    folder = Path(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) if folder.is_dir() else ()
    if not series:
        raise ValueError(f"{folder}: not a DICOM series folder (DICOM-SEG needs one)")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    return [pydicom.dcmread(name) for name in files]


def _slice_index(dataset, geometry) -> int:
    """z index of a source slice in ``geometry``, from its ImagePositionPatient."""
    index = geometry.physical_to_index(np.asarray(dataset.ImagePositionPatient, np.float64))
    k = int(np.rint(index[2]))
    if not (np.allclose(index[:2], 0.0, atol=0.1) and abs(index[2] - k) < 0.1 and 0 <= k):
        k = -1
    if not 0 <= k < geometry.size[2]:
        raise ValueError(
            f"{getattr(dataset, 'filename', 'slice')}: position {index} is not a slice of the grid"
        )
    return k


def _segment(highdicom, number: int, label: int):
    from pydicom.sr.coding import Code

    rgb = np.rint(label_colors()[label, :3] * 255).astype(int)
    return highdicom.seg.SegmentDescription(
        segment_number=number,
        segment_label=vertebra_name(label),
        segmented_property_category=Code(*_ANATOMICAL_STRUCTURE),
        segmented_property_type=Code(*_VERTEBRA),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=highdicom.AlgorithmIdentificationSequence(
            name="verse-jax",
            family=Code("123109", "DCM", "Artificial Intelligence"),
            version=__version__,
        ),
        tracking_id=vertebra_name(label),
        tracking_uid=highdicom.UID(),
        display_color=highdicom.color.CIELabColor.from_rgb(*rgb.tolist()),
    )


def write_dicom_seg(path, mask: Volume, source_datasets: list) -> Path:
    """Write ``mask`` as a binary DICOM Segmentation referencing ``source_datasets``.

    Args:
        path: output file (``.dcm``).
        mask: (x, y, z) VerSe label mask on the series' grid.
        source_datasets: the series' slices (`series_datasets`), any order.

    Raises:
        ValueError: highdicom missing, the mask is empty, or a slice does not lie on the grid.
    """
    highdicom, _ = _require()
    labels_xyz = np.asarray(mask.array)
    present = [int(v) for v in np.unique(labels_xyz) if v != 0]
    if not present:
        raise ValueError(f"{path}: the mask is empty; a DICOM-SEG needs at least one segment")
    numbers = np.zeros(int(labels_xyz.max()) + 1, np.uint16)
    numbers[present] = np.arange(1, len(present) + 1)
    frames = np.stack(
        [numbers[labels_xyz[:, :, _slice_index(ds, mask.geometry)]].T for ds in source_datasets]
    )
    reference = source_datasets[0]
    try:
        seg = _segmentation(highdicom, source_datasets, frames, present, reference)
    except (ValueError, AttributeError) as error:  # highdicom names the missing attribute
        raise ValueError(f"{path}: cannot make a DICOM-SEG of this series ({error})") from error
    path = Path(path)
    with atomic_path(path) as temporary:
        seg.save_as(temporary)
    return path


def _segmentation(highdicom, source_datasets, frames, present, reference):
    return highdicom.seg.Segmentation(
        source_images=source_datasets,
        pixel_array=frames,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(highdicom, i + 1, lab) for i, lab in enumerate(present)],
        series_instance_uid=highdicom.UID(),
        series_number=int(getattr(reference, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer="verse-jax",
        manufacturer_model_name="verse-jax",
        software_versions=__version__,
        device_serial_number="0",
        content_description="Vertebrae (VerSe labels)",
    )


def read_dicom_seg(path, source_datasets: list, geometry) -> Volume:
    """Read a Segmentation written by `write_dicom_seg` back into a VerSe label Volume.

    Args:
        path: the DICOM-SEG file.
        source_datasets: the referenced series' slices (`series_datasets`).
        geometry: the series' grid (`io.read_volume(folder).geometry`).

    Returns:
        uint16 (x, y, z) Volume on ``geometry``; segment labels are mapped back to VerSe ids.
    """
    highdicom, _ = _require()
    seg = highdicom.seg.segread(path)
    names = {name: label for label, name in VERTEBRA_NAMES.items()}
    to_label = np.zeros(len(seg.SegmentSequence) + 1, np.uint16)
    for item in seg.SegmentSequence:
        to_label[int(item.SegmentNumber)] = names[item.SegmentLabel]
    uids = [ds.SOPInstanceUID for ds in source_datasets]
    pixels = seg.get_pixels_by_source_instance(
        uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    labels = np.zeros(geometry.size, np.uint16)
    for ds, frame in zip(source_datasets, pixels, strict=True):
        labels[:, :, _slice_index(ds, geometry)] = to_label[np.asarray(frame).T]
    return Volume(labels, geometry)
