"""Model bundles: the three trained stages with their network configs, exported and loaded.

A stage export is a directory with ``stage.json`` and ``params.msgpack`` (``flax.serialization``
bytes of the params pytree; the SCN also has ``sigmas.npy``, ``(K,)`` float32). ``stage.json``
(version 2) stores the stage's whole definition (``stages.StageSpec.to_dict``): what the network
was trained on is what prediction uses. Version 1 exports stored only the grid; they are converted
on loading (the other fields were fixed in the code then, with the values of the paper definition).
Parameters are stored as float32, or as float16 where ``stage.json`` says
``"params_dtype": "float16"`` (half the size, for shipped bundles); loading always gives float32.
A bundle is a directory with ``bundle.json`` (optional free metadata under ``"extra"``) and one
such directory per stage (``spine``, ``scn``, ``seg``).
Loading checks format, version and that the stored parameters have exactly the tree structure and
shapes of the network the config builds (``jax.eval_shape`` of ``model.init``), and raises
:class:`BundleError` naming the file and the problem otherwise.
"""

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from verse_jax import stages
from verse_jax.infer.predict import Networks
from verse_jax.io.files import atomic_directory
from verse_jax.models import registry
from verse_jax.models.registry import StageNetwork, abstract_params
from verse_jax.stages import StageGrid, StageSpec

STAGE_FORMAT = "verse-jax-stage"
BUNDLE_FORMAT = "verse-jax-bundle"
FORMAT_VERSION = 1  # bundle.json
STAGE_VERSION = 2  # stage.json; version 1 (grid only) is converted on loading
STAGES = stages.STAGE_NAMES
STAGE_FACTORIES = stages.FACTORIES
STAGE_CHANNELS = stages.INPUT_CHANNELS
PAPER_GRIDS = {name: spec.grid for name, spec in stages.PAPER.items()}
_MAX_LISTED = 6
_PARAMS_DTYPES = ("float32", "float16")


class BundleError(ValueError):
    """A stage export or bundle that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)
class StageModel(StageNetwork):
    """One loaded stage export: the network the predictors take (``StageNetwork``: definition,
    Linen module, params as device arrays) and what the export records besides.

    ``sigmas`` is the SCN's ``(K,)`` learnable heatmap sigmas in voxels (None for other stages).
    """

    factory: str
    factory_kwargs: dict
    sigmas: np.ndarray | None
    extra: dict
    path: Path | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Bundle(Networks):
    """The three stages of the pipeline, loaded (``Networks`` with the bundle's metadata)."""

    spine: StageModel
    scn: StageModel
    seg: StageModel
    path: Path | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def build_model(factory: str, factory_kwargs: dict) -> nn.Module:
    """``registry.build_model``, raising BundleError (unknown factory, rejected kwargs)."""
    try:
        return registry.build_model(factory, factory_kwargs)
    except ValueError as err:
        raise BundleError(str(err)) from err


def _check_params(params: Any, expected: Any, where: str) -> None:
    """Raise BundleError listing missing, unexpected and wrongly shaped parameters."""
    got = traverse_util.flatten_dict(serialization.to_state_dict(params), sep="/")
    want = traverse_util.flatten_dict(serialization.to_state_dict(expected), sep="/")
    problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{k}: shape {tuple(np.shape(got[k]))}, network expects {tuple(want[k].shape)}"
        for k in sorted(set(got) & set(want))
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise BundleError(
            f"{where}: parameters do not match the network config: "
            + "; ".join(problems[:_MAX_LISTED])
            + more
        )


def _unwrap_params(params: Any) -> Any:
    """Accept both ``variables`` ({"params": tree}) and the bare params tree."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def _grid_dict(grid: Any, where: str) -> dict:
    if isinstance(grid, StageGrid):
        grid = dataclasses.asdict(grid)
    try:
        out = {
            "spacing_mm": float(grid["spacing_mm"]),
            "crop_size": [int(v) for v in grid["crop_size"]],
            "smoothing_mm": float(grid["smoothing_mm"]),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(
            f"{where}: bad grid {grid!r} ({err!r}); need spacing_mm, "
            "crop_size [x, y, z], smoothing_mm"
        ) from err
    if len(out["crop_size"]) != 3 or min(out["crop_size"]) < 1 or out["spacing_mm"] <= 0:
        raise BundleError(
            f"{where}: bad grid {grid!r}: crop_size must be 3 positive ints, spacing_mm > 0"
        )
    return out


def _resolve_spec(where, spec, stage, factory, grid, num_landmarks, input_channels) -> StageSpec:
    """The stage definition of an export: ``spec``, or the paper definition of ``stage`` with
    ``grid`` and ``num_landmarks``; the other arguments, where given, must agree with it."""
    if spec is None:
        if stage not in STAGES:
            raise BundleError(f"{where}: stage must be one of {STAGES}")
        if grid is None or num_landmarks is None:
            raise BundleError(f"{where}: give spec=, or stage=, grid= and num_landmarks=")
        grid = _grid_dict(grid, where)
        try:
            spec = stages.with_grid(stage, grid, int(num_landmarks))
        except ValueError as err:
            raise BundleError(f"{where}: {err}") from err
    given = {
        "stage": (stage, spec.name),
        "factory": (factory, spec.factory),
        "input_channels": (input_channels, spec.input_channels),
        "num_landmarks": (num_landmarks, spec.num_landmarks),
    }
    for name, (value, expected) in given.items():
        if value is not None and value != expected:
            raise BundleError(f"{where}: {name} {value!r}, the stage definition has {expected!r}")
    return spec


def export_stage(
    out_dir,
    *,
    factory_kwargs,
    params,
    spec: StageSpec | None = None,
    stage=None,
    factory=None,
    grid=None,
    num_landmarks=None,
    input_channels=None,
    sigmas=None,
    extra=None,
    params_dtype="float32",
) -> Path:
    """Write one stage export (``stage.json``, ``params.msgpack``, SCN ``sigmas.npy``) atomically.

    Args:
        out_dir: directory to create (replaced if it exists).
        factory_kwargs: JSON-serialisable kwargs for the factory, e.g. ``{"preset": "demo"}``.
        params: params pytree (or ``{"params": tree}``); checked against the network config.
        spec: the stage's whole definition (what it was trained with).
        stage, grid, num_landmarks: without ``spec``: the paper definition of ``stage`` with this
            grid (``{"spacing_mm", "crop_size" (x, y, z), "smoothing_mm"}`` or a StageGrid).
        factory, input_channels: optional; must agree with the definition.
        sigmas: SCN only, ``(K,)`` heatmap sigmas in voxels of the stage grid.
        extra: free JSON-serialisable metadata (training run, metrics, ...).
        params_dtype: ``"float32"`` or ``"float16"`` (stored rounded to half precision).

    Returns:
        ``Path(out_dir)``.
    """
    where = f"export of stage {stage or getattr(spec, 'name', None)!r} to {out_dir}"
    spec = _resolve_spec(where, spec, stage, factory, grid, num_landmarks, input_channels)
    meta = {
        "format": STAGE_FORMAT,
        "version": STAGE_VERSION,
        "stage": spec.name,
        "network": {"factory": spec.factory, "kwargs": dict(factory_kwargs)},
        "definition": spec.to_dict(),
        "extra": dict(extra or {}),
    }
    if params_dtype not in _PARAMS_DTYPES:
        raise BundleError(f"{where}: params_dtype must be one of {_PARAMS_DTYPES}")
    if params_dtype != "float32":
        meta["params_dtype"] = params_dtype
    params = jax.device_get(_unwrap_params(params))
    model = build_model(spec.factory, meta["network"]["kwargs"])
    _check_params(params, abstract_params(model, spec.crop_size, spec.input_channels), where)
    k = spec.num_landmarks
    if spec.name == "scn":
        if sigmas is None:
            raise BundleError(f"{where}: the SCN stage needs sigmas ({k},)")
        sigmas = np.asarray(sigmas, np.float32)
        if sigmas.shape != (k,):
            raise BundleError(f"{where}: sigmas shape {sigmas.shape}, expected ({k},)")
    text = json.dumps(meta, indent=2)
    data = serialization.to_bytes(jax.tree.map(lambda a: np.asarray(a, params_dtype), params))

    with atomic_directory(out_dir) as tmp:
        (tmp / "stage.json").write_text(text)
        (tmp / "params.msgpack").write_bytes(data)
        if sigmas is not None:
            np.save(tmp / "sigmas.npy", np.asarray(sigmas, np.float32))
    return Path(out_dir)


def _read_json(path: Path, fmt: str, versions=(FORMAT_VERSION,)) -> dict:
    if not path.is_file():
        raise BundleError(f"{path}: missing ({fmt} expects this file)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(f"{path}: format is {got!r}, expected {fmt!r}")
    if meta.get("version") not in versions:
        raise BundleError(
            f"{path}: {fmt} version {meta.get('version')!r} is not supported "
            f"(this verse-jax reads version {' or '.join(map(str, versions))})"
        )
    return meta


def _stage_definition(meta: dict, meta_path: Path) -> StageSpec:
    """The definition in a stage.json: version 2 stores it whole; version 1 only the grid, K and
    the channels (converted: the rest was fixed in the code, as the paper definition)."""
    stage = meta.get("stage")
    if stage not in STAGES:
        raise BundleError(f"{meta_path}: stage {stage!r} is not one of {STAGES}")
    if meta["version"] == 1:
        grid = _grid_dict(meta.get("grid"), str(meta_path))
        try:
            channels = int(meta["input_channels"])
            spec = stages.with_grid(stage, grid, int(meta["num_landmarks"]))
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{meta_path}: missing or bad field {err}") from err
        if channels != spec.input_channels:
            raise BundleError(
                f"{meta_path}: input_channels {channels}, stage {stage!r} has {spec.input_channels}"
            )
    else:
        try:
            spec = StageSpec.from_dict(meta.get("definition"), str(meta_path))
        except ValueError as err:
            raise BundleError(str(err)) from err
    if spec.name != stage:
        raise BundleError(f"{meta_path}: stage {stage!r} but its definition is {spec.name!r}")
    return spec


def load_stage(path) -> StageModel:
    """Load and check one stage export (a version 1 export is converted, see the module doc).

    Raises:
        BundleError: missing directory/files, wrong format or version, bad definition, unknown
            factory, unreadable params, params whose tree or shapes differ from the network
            config, bad SCN sigmas.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: stage export directory not found")
    meta_path = path / "stage.json"
    meta = _read_json(meta_path, STAGE_FORMAT, (1, STAGE_VERSION))
    try:
        factory = meta["network"]["factory"]
        kwargs = dict(meta["network"]["kwargs"])
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{meta_path}: missing or bad field {err}") from err
    spec = _stage_definition(meta, meta_path)
    try:
        model = build_model(factory, kwargs)
    except BundleError as err:
        raise BundleError(f"{meta_path}: network: {err}") from err
    params_path = path / "params.msgpack"
    if not params_path.is_file():
        raise BundleError(f"{params_path}: missing (stage parameters)")
    try:
        params = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as err:  # msgpack raises several unrelated types on corrupt bytes
        raise BundleError(f"{params_path}: cannot read parameters ({err!r})") from err
    expected = abstract_params(model, spec.crop_size, spec.input_channels)
    _check_params(params, expected, str(params_path))
    stored = meta.get("params_dtype", "float32")
    if stored not in _PARAMS_DTYPES:
        raise BundleError(f"{meta_path}: params_dtype {stored!r} is not one of {_PARAMS_DTYPES}")
    sigmas = None
    if spec.name == "scn":
        sigmas_path = path / "sigmas.npy"
        if not sigmas_path.is_file():
            raise BundleError(f"{sigmas_path}: missing (SCN sigmas)")
        sigmas = _load_sigmas(sigmas_path, spec.num_landmarks)
    return StageModel(
        spec=spec,
        model=model,
        params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params),
        factory=factory,
        factory_kwargs=kwargs,
        sigmas=sigmas,
        extra=dict(meta.get("extra") or {}),
        path=path,
    )


def _load_sigmas(path: Path, num_landmarks: int) -> np.ndarray:
    """SCN sigmas ``(K,)``: a plain numeric ``.npy`` array of positive finite values."""
    try:
        sigmas = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # not an .npy file, truncated, pickled data
        raise BundleError(f"{path}: not a readable .npy array ({err})") from err
    if sigmas.dtype.kind not in "iuf":
        raise BundleError(f"{path}: sigmas must be real numbers, got dtype {sigmas.dtype}")
    if sigmas.shape != (num_landmarks,):
        raise BundleError(f"{path}: shape {sigmas.shape}, expected ({num_landmarks},)")
    if not np.all(np.isfinite(sigmas) & (sigmas > 0)):
        raise BundleError(f"{path}: sigmas must be positive and finite, got {sigmas.tolist()}")
    return sigmas


def make_bundle(out_dir, *, spine, scn, seg, extra=None) -> Path:
    """Copy three stage exports into one bundle directory (atomic); each is checked first.

    ``extra``: free JSON-serialisable metadata stored in ``bundle.json`` (e.g. training figures).
    """
    sources = {"spine": Path(spine), "scn": Path(scn), "seg": Path(seg)}
    for name, src in sources.items():
        stage = load_stage(src)
        if stage.stage != name:
            raise BundleError(f"{src}: is a {stage.stage!r} stage export, given as {name!r}")
    meta = {"format": BUNDLE_FORMAT, "version": FORMAT_VERSION, "stages": {s: s for s in STAGES}}
    if extra:
        meta["extra"] = dict(extra)

    with atomic_directory(out_dir) as tmp:
        for name, src in sources.items():
            shutil.copytree(src, tmp / name)
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def load_bundle(path) -> Bundle:
    """Load a bundle directory (``bundle.json`` + three stage exports), checking everything."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: model bundle directory not found")
    meta_path = path / "bundle.json"
    meta = _read_json(meta_path, BUNDLE_FORMAT)
    stages = meta.get("stages")
    if not isinstance(stages, dict) or set(stages) != set(STAGES):
        raise BundleError(
            f"{meta_path}: 'stages' must map {list(STAGES)} to directories, got {stages!r}"
        )
    loaded = {}
    for name in STAGES:
        stage = load_stage(path / stages[name])
        if stage.stage != name:
            raise BundleError(
                f"{path / stages[name]}: is a {stage.stage!r} stage, "
                f"bundle.json lists it as {name!r}"
            )
        loaded[name] = stage
    if loaded["scn"].num_landmarks != loaded["seg"].num_landmarks:
        raise BundleError(
            f"{path}: SCN has {loaded['scn'].num_landmarks} landmarks, "
            f"segmentation stage {loaded['seg'].num_landmarks}"
        )
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise BundleError(f"{meta_path}: 'extra' must be an object, got {type(extra).__name__}")
    return Bundle(**loaded, path=path, extra=extra)
