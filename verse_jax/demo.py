"""The shipped demo model and ``verse-jax demo``: one fresh phantom, predicted and scored.

The package ships a small model bundle (``verse_jax/demo_bundle``, the three demo networks trained
on the built-in phantoms; rebuilt with ``python experiments/build_demo_bundle.py``). Its
``bundle.json`` ``extra`` says ``"trained": true`` with the training figures, or ``false`` for a
placeholder of random weights; whatever uses it says so on stderr, in one line.
"""

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from verse_jax import io, metrics, phantoms

if TYPE_CHECKING:  # the bundle module imports jax: loaded only when a model is
    from verse_jax.infer.bundle import Bundle

SHIPPED_BUNDLE = Path(__file__).resolve().parent / "demo_bundle"
# Not a training seed: the phantom data sets draw case seeds with phantoms.case_seed (32-bit
# hashes of (data set seed, index)); tests/test_demo.py checks this one against them.
DEMO_SEED = 2019


def notice(model: "Bundle", shipped: bool) -> str | None:
    """The one stderr line a model needs (untrained placeholder, or the shipped phantom model)."""
    if model.extra.get("trained") is False:
        which = "no --model given: the shipped demo model" if shipped else f"the model {model.path}"
        return (
            f"verse-jax: {which} is an UNTRAINED placeholder (random weights): its output is "
            "meaningless; build the trained one with `python experiments/build_demo_bundle.py` "
            "(README, Demo)"
        )
    if shipped:
        return (
            "verse-jax: no --model given: using the shipped demo model, trained on synthetic "
            "phantoms only; not for real scans"
        )
    return None


def load_model(path=None) -> tuple["Bundle", str | None]:
    """``(bundle, notice)``: the bundle at ``path``, or the shipped demo bundle when None."""
    from verse_jax.infer import bundle

    shipped = path is None
    model = bundle.load_bundle(SHIPPED_BUNDLE if shipped else path)
    return model, notice(model, shipped)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What ``run_demo`` wrote (name -> path) and the case's scores."""

    files: dict[str, Path]
    scores: metrics.CaseMetrics
    failure: str | None = None


def run_demo(
    out_dir,
    model: "Bundle",
    *,
    seed: int = DEMO_SEED,
    fov: str | None = None,
    max_voxels: int = phantoms.DEFAULT_MAX_VOXELS,
    overlap_z: int | None = None,
) -> DemoResult:
    """Generates phantom ``seed``, predicts it with ``model`` and scores it against its truth.

    Writes into ``out_dir``: ``<id>_ct.nii.gz`` (the phantom), ``<id>_seg.nii.gz`` and
    ``<id>_ctd.json`` (the prediction, as ``verse-jax predict`` writes them), ``ground_truth/``
    (``<id>_seg.nii.gz``, ``<id>_ctd.json``), ``scores.json`` and ``<id>_preview.png``. The scores
    are computed from the written files as ``verse-jax evaluate --pred OUT --gt
    OUT/ground_truth`` computes them.
    """
    from verse_jax import preview
    from verse_jax.infer import predict

    out = Path(out_dir)
    truth = out / "ground_truth"
    truth.mkdir(parents=True, exist_ok=True)
    case_id = f"demo-seed{seed}"
    times = {}
    tic = time.perf_counter()
    phantom = phantoms.generate_phantom(seed, fov=fov, max_voxels=max_voxels)
    files = {
        "ct": out / f"{case_id}_ct.nii.gz",
        "mask": out / f"{case_id}_seg.nii.gz",
        "centroids": out / f"{case_id}_ctd.json",
        "truth_mask": truth / f"{case_id}_seg.nii.gz",
        "truth_centroids": truth / f"{case_id}_ctd.json",
        "scores": out / "scores.json",
        "preview": out / f"{case_id}_preview.png",
    }
    io.write_volume(files["ct"], phantom.image)
    io.write_mask(files["truth_mask"], phantom.mask)
    io.write_centroids(files["truth_centroids"], phantom.centroids, phantom.mask.geometry)
    times["phantom_s"], tic = time.perf_counter() - tic, time.perf_counter()
    image = io.read_volume(files["ct"])  # what `verse-jax predict` would read
    failure = None
    try:
        centroids, mask = predict.predict_case(image, model, overlap_z=overlap_z)
    except predict.NoSpineFoundError as error:  # scored as every vertebra missed
        failure = f"{type(error).__name__}: {error}"
        centroids = io.Centroids(np.zeros(0, np.int64), np.zeros((0, 3)))
        mask = type(image)(np.zeros(image.geometry.size, np.uint16), image.geometry)
    io.write_volume(files["mask"], type(mask)(np.asarray(mask.array, np.uint16), mask.geometry))
    io.write_centroids(files["centroids"], centroids, image.geometry)
    times["predict_s"], tic = time.perf_counter() - tic, time.perf_counter()
    scores = _score(case_id, files)
    title = f"{case_id} prediction"
    if model.extra.get("trained") is False:
        title += " (UNTRAINED placeholder model: random output)"
    preview.write_preview(files["preview"], image, mask, centroids, title=title)
    times["score_and_preview_s"] = time.perf_counter() - tic
    report = {
        "case_id": case_id,
        "seed": int(seed),
        "fov": fov,
        "max_voxels": int(max_voxels),
        "model": str(model.path),
        "trained": model.extra.get("trained"),
        "prediction_failed": failure,
        **scores.to_dict(),
        "seconds": {k: round(v, 2) for k, v in times.items()},
    }
    io.write_text_atomic(files["scores"], json.dumps(io.json_safe(report), indent=2) + "\n")
    return DemoResult(files, scores, failure)


def _score(case_id: str, files: dict[str, Path]) -> metrics.CaseMetrics:
    gt_mask = io.read_mask(files["truth_mask"])
    pred_mask = io.read_mask(files["mask"])
    io.check_same_grid(pred_mask.geometry, gt_mask.geometry, files["mask"])
    gt = io.read_centroids(files["truth_centroids"], gt_mask.geometry)
    pred = io.read_centroids(files["centroids"], pred_mask.geometry)
    return metrics.CaseMetrics(
        case_id,
        metrics.localization_metrics(pred, gt),
        metrics.segmentation_metrics(pred_mask.array, gt_mask.array, gt_mask.geometry.spacing_mm),
    )
