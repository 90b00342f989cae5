"""The stage contract: one definition per stage, read by training, prediction, export and configs.

A :class:`StageSpec` is everything that decides what a stage's network sees and how its output is
read: the stage grid (isotropic spacing, crop size, smoothing before resampling), the input
channels and how they are built, the crop placement, the centroid-channel Gaussian, the landmark
mask of the SCN, the candidate rules of the SCN's heatmaps and the network factory. Training
(``data.samples``, ``data.cache``, ``data.pipeline``), prediction (``infer.predict``), the export
(``infer.bundle``, which stores the whole definition in ``stage.json``) and the experiment configs
all read it from here.
The facts each default follows are in ``docs/reference.md`` (cited as "reference §x").

Crop placement (``crop_center_vox``), all in voxels of the stage grid (identity direction):
    spine: the centre of the scan, ``(size - 1) / 2`` (reference §4.2);
    scn: x, y at the column centre (training: the mean of the valid landmarks; prediction: the
        stage-1 spine point), z at the centre of the scan, plus in training a random z offset
        ``(size_z - crop_z) * U(-0.5, 0.5)`` (reference §5.2);
    seg: the vertebra centroid plus ``posterior_offset_mm`` along +y (posterior; reference §6.2).
"""

import dataclasses

import numpy as np

from verse_jax.data.augmentation import AugmentRanges
from verse_jax.preprocessing import OUTSIDE_NORMALIZED

STAGE_NAMES = ("spine", "scn", "seg")
# Version of the serialised definition (``to_dict``); see ``from_dict`` for older ones.
# 2: ``window_pad_value`` (version 1 definitions padded SCN windows with -1, the reference's value).
DEFINITION_VERSION = 3
# Network factory of each stage (``verse_jax.models``) and its number of input channels.
FACTORIES = {
    "spine": "spine_localization_net",
    "scn": "vertebrae_localization_net",
    "seg": "vertebrae_segmentation_net",
}
INPUT_CHANNELS = {"spine": 1, "scn": 1, "seg": 2}  # seg: CT, centroid Gaussian
MASK_MARGIN_RULES = ("mm", "slices_per_mm")


@dataclasses.dataclass(frozen=True)
class StageGrid:
    """Network grid of a stage: isotropic spacing (mm), crop (x, y, z) voxels, smoothing (mm)."""

    spacing_mm: float
    crop_size: tuple[int, int, int]
    smoothing_mm: float


@dataclasses.dataclass(frozen=True)
class CandidateRule:
    """How landmark candidates are read off an SCN heatmap (reference §5.6).

    Attributes:
        min_distance_mm: exclusion radius around each found maximum (reference: 7 voxels at 2 mm).
        min_max_value: below this global maximum only the global maximum is a candidate.
        relative_threshold: further maxima need value > relative_threshold * global maximum.
        max_candidates: None keeps every maximum the rule finds (as the reference); an int caps M.
        value_scale: the merged heatmaps are multiplied by this before candidates are read and
            the sequence is selected, so that the reference's absolute thresholds (0.25, 0.5 and
            the ones of ``infer.sequence.select_landmark_sequence``) keep their meaning for target
            Gaussians of another height. Reference: 1. The demo's targets (sigma 2 voxels) are 8x
            taller than the paper's (sigma 4) at the start; with 1 its weak off-target responses
            passed 0.25 and the front/back extension ran away (prediction, not training).
    """

    min_distance_mm: float = 14.0
    min_max_value: float = 0.25
    relative_threshold: float = 0.1
    max_candidates: int | None = None
    value_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """The full definition of one stage.

    Attributes:
        name: "spine" (stage 1), "scn" (stage 2) or "seg" (stage 3).
        spacing_mm: isotropic spacing of the stage grid and of the network crop.
        crop_size: (x, y, z) network input size in voxels.
        smoothing_mm: Gaussian sigma (mm) applied before resampling.
        num_landmarks: 25 (VerSe'19) or 26 (with T13).
        augment: random augmentation ranges (training).
        landmark_jitter_mm: "seg": the centroid channel's position ~ centroid + U(-a, a) mm
            (training only).
        posterior_offset_mm: "seg": crop centre = centroid + (0, offset, 0) mm (+y posterior).
        heatmap_sigma_vox: "seg": sigma of the peak-1 centroid Gaussian (second input channel),
            filled in the reference's truncated window (``heatmaps.gaussian_heatmaps(window=)``).
        mask_margin_mm: "scn": the landmark mask is 0 near the scan's z ends (see next field).
        mask_margin_rule: "scn": "mm": ``round(margin / h_z)`` slices; "slices_per_mm": the
            reference's ``int(margin * h_z)`` slices (reference §5.2; equal at 1 mm z spacing).
        candidates: "scn": candidate rule of the prediction.
        window_pad_value: "scn": normalised value that pads a column shorter than a window at
            prediction. Default: the training crops' outside value (-1024 HU -> -0.5), so a short
            scan looks at prediction as it looked in training. The reference pads with -1 although
            its training crops are padded with -1024 HU (reference §5.6); the paper definition keeps
            its -1. With the demo's 256 mm windows most phantom scans are shorter than a window:
            padding with -1 put the lumbar ends 20-40 mm off (measured on held-out phantoms).
        target_smoothing_vox: "seg" training: the label crop is split one-hot over all label
            ids, each channel smoothed with a Gaussian of this sigma (voxels, window +-4 sigma,
            edge values beyond the crop), and the argmax taken again before the vertebra's
            channel becomes the binary target (docs/reference.md §6.2); 0 turns it off.
            Definitions of version 2 and older were trained without it (read as 0).
    """

    name: str
    spacing_mm: float
    crop_size: tuple[int, int, int]
    smoothing_mm: float
    num_landmarks: int = 25
    augment: AugmentRanges = AugmentRanges()
    landmark_jitter_mm: float = 3.0
    posterior_offset_mm: float = 20.0
    heatmap_sigma_vox: float = 3.0
    mask_margin_mm: float = 25.0
    mask_margin_rule: str = "mm"
    candidates: CandidateRule = CandidateRule()
    window_pad_value: float = OUTSIDE_NORMALIZED
    target_smoothing_vox: float = 1.0

    def __post_init__(self):
        if self.name not in STAGE_NAMES:
            raise ValueError(f"stage name must be one of {STAGE_NAMES}, got {self.name!r}")
        crop = tuple(int(v) for v in self.crop_size)
        if len(crop) != 3 or min(crop) < 1:
            raise ValueError(f"crop_size must be 3 positive ints, got {self.crop_size}")
        object.__setattr__(self, "crop_size", crop)
        if not self.spacing_mm > 0 or self.smoothing_mm < 0:
            raise ValueError(f"bad spacing/smoothing: {self.spacing_mm}, {self.smoothing_mm}")
        if self.num_landmarks not in (25, 26):
            raise ValueError(f"num_landmarks must be 25 or 26, got {self.num_landmarks}")
        if not self.target_smoothing_vox >= 0:
            raise ValueError(f"target_smoothing_vox must be >= 0, got {self.target_smoothing_vox}")
        if not self.heatmap_sigma_vox > 0:
            raise ValueError(f"heatmap_sigma_vox must be > 0, got {self.heatmap_sigma_vox}")
        if self.mask_margin_rule not in MASK_MARGIN_RULES:
            rules, got = MASK_MARGIN_RULES, self.mask_margin_rule
            raise ValueError(f"mask_margin_rule must be one of {rules}, got {got!r}")

    @property
    def factory(self) -> str:
        """Network factory name (``verse_jax.models``)."""
        return FACTORIES[self.name]

    @property
    def input_channels(self) -> int:
        return INPUT_CHANNELS[self.name]

    @property
    def grid(self) -> dict:
        """``{"spacing_mm", "crop_size", "smoothing_mm"}``."""
        return {
            "spacing_mm": float(self.spacing_mm),
            "crop_size": list(self.crop_size),
            "smoothing_mm": float(self.smoothing_mm),
        }

    def cache_key(self) -> dict:
        """The settings that determine the cached arrays (not the crop or augmentation)."""
        key = {"name": self.name, "spacing_mm": float(self.spacing_mm)}
        key |= {"smoothing_mm": float(self.smoothing_mm), "num_landmarks": self.num_landmarks}
        if self.name == "scn":
            key["mask_margin_mm"] = float(self.mask_margin_mm)
            if self.mask_margin_rule != "mm":  # the key of "mm" caches stays what it was
                key["mask_margin_rule"] = self.mask_margin_rule
        return key

    def to_dict(self) -> dict:
        """JSON-serialisable definition (``from_dict`` reads it back)."""
        out = dataclasses.asdict(self)
        out["crop_size"] = list(self.crop_size)
        return {"definition_version": DEFINITION_VERSION, **out}

    @classmethod
    def from_dict(cls, data: dict, where: str = "stage definition") -> "StageSpec":
        """Inverse of ``to_dict``; ValueError naming ``where`` and the problem otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: the stage definition must be a JSON object, got {data!r}")
        data = dict(data)
        version = data.pop("definition_version", None)
        if version == 1 and "window_pad_value" not in data:  # version 1 padded with -1
            data["window_pad_value"], version = -1.0, 2
        if version == 2:  # trained on the raw label crops
            data.setdefault("target_smoothing_vox", 0.0)
            version = 3
        if version != DEFINITION_VERSION:
            raise ValueError(
                f"{where}: stage definition version {version!r} is not supported "
                f"(this verse-jax reads version {DEFINITION_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(
                f"{where}: stage definition has unknown fields {unknown}, misses {missing}"
            )
        try:
            data["augment"] = AugmentRanges(**data["augment"])
            data["candidates"] = CandidateRule(**data["candidates"])
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad stage definition ({err})") from err


# Fields that act in training only: two definitions equal but for these predict alike.
TRAINING_ONLY_FIELDS = ("augment", "landmark_jitter_mm", "target_smoothing_vox")


def prediction_definition(spec: StageSpec) -> dict:
    """``spec.to_dict()`` without ``TRAINING_ONLY_FIELDS``: what prediction reads of a stage."""
    return {k: v for k, v in spec.to_dict().items() if k not in TRAINING_ONLY_FIELDS}


# The paper's stages (reference §4.2, §5.2, §6.2); the network presets are in ``models``.
SPINE_PAPER = StageSpec("spine", 8.0, (64, 64, 128), 3.0)
SCN_PAPER = StageSpec(
    "scn", 2.0, (96, 96, 128), 0.75, mask_margin_rule="slices_per_mm", window_pad_value=-1.0
)
SEG_PAPER = StageSpec("seg", 1.0, (128, 128, 96), 0.75)
PAPER = {"spine": SPINE_PAPER, "scn": SCN_PAPER, "seg": SEG_PAPER}


def with_grid(name: str, grid: dict, num_landmarks: int = 25, **fields) -> StageSpec:
    """The paper definition of stage ``name`` with another grid (and any other fields)."""
    return dataclasses.replace(
        PAPER[name],
        spacing_mm=float(grid["spacing_mm"]),
        crop_size=tuple(int(v) for v in grid["crop_size"]),
        smoothing_mm=float(grid["smoothing_mm"]),
        num_landmarks=int(num_landmarks),
        **fields,
    )


def crop_center_vox(
    spec: StageSpec,
    volume_shape,
    *,
    column_xy_vox=None,
    centroid_vox=None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(3,) float64 crop centre in stage voxels (see the module docstring).

    Args:
        spec: the stage.
        volume_shape: (3,) size of the stage volume.
        column_xy_vox: "scn": (2,) x, y of the column (None: the volume's centre).
        centroid_vox: "seg": (3,) the vertebra centroid.
        rng: "scn" training: draws the random z slab; None: centred (evaluation, prediction).
    """
    shape = np.asarray(volume_shape, np.float64)
    center = (shape - 1) / 2
    if spec.name == "scn":
        if column_xy_vox is not None:
            center[:2] = np.asarray(column_xy_vox, np.float64)[:2]
        if rng is not None:
            center[2] += (shape[2] - spec.crop_size[2]) * rng.uniform(-0.5, 0.5)
    elif spec.name == "seg":
        if centroid_vox is None:
            raise ValueError("stage 'seg': the crop centre needs the vertebra centroid")
        offset = np.array([0.0, spec.posterior_offset_mm, 0.0]) / spec.spacing_mm
        center = np.asarray(centroid_vox, np.float64) + offset
    return center


def mask_margin_slices(spec: StageSpec, spacing_z_mm: float) -> int:
    """Slices zeroed at each z end of the SCN landmark mask on a scan of z spacing ``h_z``."""
    if spec.mask_margin_rule == "slices_per_mm":
        return int(spec.mask_margin_mm * spacing_z_mm)
    return int(round(spec.mask_margin_mm / spacing_z_mm))
