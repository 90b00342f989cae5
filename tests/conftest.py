"""Shared test setup: strict numpy rank promotion in JAX and paths to the real VerSe sample."""

import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

SAMPLE_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "verse_sample"


@pytest.fixture(scope="session")
def verse_sample() -> pathlib.Path:
    """Folder with the real VerSe sample files (mask, centroid JSON, CT crop)."""
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"VerSe sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR
