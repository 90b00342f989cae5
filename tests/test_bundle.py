"""Model bundles: export/load round trip and a clear error for each kind of bad bundle."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from verse_jax import stages, testing
from verse_jax.infer import bundle
from verse_jax.models import registry

LAX = {"conv_impl": "lax"}
GRIDS = {
    "spine": {"spacing_mm": 16.0, "crop_size": (8, 8, 16), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 4.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 2.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return testing.random_bundle(
        tmp_path_factory.mktemp("b") / "bundle", grids=GRIDS, seed=3, network_kwargs=LAX
    )


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_round_trip(tiny_bundle, tmp_path):
    loaded = bundle.load_bundle(tiny_bundle)
    assert loaded.scn.grid == stages.StageGrid(4.0, (12, 12, 16), 0.75)
    assert loaded.seg.input_channels == 2 and loaded.spine.input_channels == 1
    assert loaded.scn.num_landmarks == 25
    np.testing.assert_array_equal(loaded.scn.sigmas, np.full(25, 4.0, np.float32))
    assert loaded.spine.sigmas is None and loaded.spine.extra == {"random": True, "seed": 3}
    # Re-export the loaded spine stage; reloading gives bit-identical params.
    stage = loaded.spine
    out = bundle.export_stage(
        tmp_path / "spine",
        stage="spine",
        factory=stage.factory,
        factory_kwargs=stage.factory_kwargs,
        params={"params": stage.params},
        grid=stage.grid,
        num_landmarks=25,
        input_channels=1,
    )
    again = bundle.load_stage(out)
    leaves = zip(jax.tree.leaves(stage.params), jax.tree.leaves(again.params), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)
    y = loaded.seg.apply_fn("sigmoid")(jnp.zeros((1, 16, 16, 12, 2)))
    assert y.shape == (1, 16, 16, 12, 1) and bool(jnp.all((y > 0) & (y < 1)))
    other = bundle.load_stage(tiny_bundle / "seg")
    assert other.apply_partial("sigmoid").func is loaded.seg.apply_partial("sigmoid").func


def test_missing_paths(tiny_bundle, tmp_path):
    with pytest.raises(bundle.BundleError, match="not found"):
        bundle.load_bundle(tmp_path / "nope")
    copy = _copy(tiny_bundle, tmp_path)
    (copy / "seg" / "params.msgpack").unlink()
    with pytest.raises(bundle.BundleError, match=r"seg/params.msgpack: missing"):
        bundle.load_bundle(copy)
    (copy / "bundle.json").unlink()
    with pytest.raises(bundle.BundleError, match=r"bundle.json: missing"):
        bundle.load_bundle(copy)


def test_wrong_format_and_version(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    _edit_json(copy / "bundle.json", version=2)
    with pytest.raises(bundle.BundleError, match="version 2 is not supported"):
        bundle.load_bundle(copy)
    _edit_json(copy / "bundle.json", version=1, format="something-else")
    with pytest.raises(bundle.BundleError, match="format is 'something-else'"):
        bundle.load_bundle(copy)
    _edit_json(copy / "bundle.json", format="verse-jax-bundle")
    (copy / "scn" / "stage.json").write_text("{not json")
    with pytest.raises(bundle.BundleError, match=r"scn/stage.json: not valid JSON"):
        bundle.load_bundle(copy)


def test_params_that_do_not_match_the_network(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    meta = json.loads((copy / "spine" / "stage.json").read_text())
    meta["network"]["kwargs"]["num_filters_base"] = 6
    (copy / "spine" / "stage.json").write_text(json.dumps(meta))
    with pytest.raises(bundle.BundleError, match=r"do not match the network config.*shape"):
        bundle.load_bundle(copy)
    meta["network"]["kwargs"] = {"preset": "tiny", "num_levels": 2}
    (copy / "spine" / "stage.json").write_text(json.dumps(meta))
    with pytest.raises(bundle.BundleError, match="unexpected contracting_level2"):
        bundle.load_bundle(copy)
    (copy / "seg" / "params.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(bundle.BundleError, match="seg/params.msgpack"):
        bundle.load_stage(copy / "seg")


def test_sigmas_and_stage_roles(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    np.save(copy / "scn" / "sigmas.npy", np.ones(3, np.float32))
    with pytest.raises(bundle.BundleError, match=r"sigmas.npy: shape \(3,\), expected \(25,\)"):
        bundle.load_bundle(copy)
    with pytest.raises(bundle.BundleError, match="is a 'seg' stage export, given as 'spine'"):
        bundle.make_bundle(tmp_path / "b2", spine=copy / "seg", scn=copy / "scn", seg=copy / "seg")
    assert not (tmp_path / "b2").exists()


def test_export_rejects_bad_params(tmp_path):
    model = bundle.build_model("spine_localization_net", {"preset": "tiny"})
    params = testing.random_params(registry.abstract_params(model, (8, 8, 8), 1), seed=0)
    with pytest.raises(bundle.BundleError, match="do not match"):
        bundle.export_stage(
            tmp_path / "s",
            stage="seg",
            factory="vertebrae_segmentation_net",
            factory_kwargs={"preset": "tiny"},
            params=params,
            grid=GRIDS["seg"],
            num_landmarks=25,
            input_channels=2,
        )
    with pytest.raises(bundle.BundleError, match="unknown network factory"):
        bundle.build_model("resnet", {})
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())
