"""Synthetic spine CT phantoms in the VerSe layout (the default data set).

``anatomy`` (a sampled spine: curvature, sizes, extra vertebrae), ``shapes`` (the implicit shapes
of every structure), ``render`` (one phantom on its acquisition grid), ``dataset`` (seeded data
sets and the cached default). The public names of ``render`` and ``dataset`` are available here.
"""

from verse_jax.phantoms.dataset import (
    case_seed,
    default_dataset,
    default_workers,
    split_cases,
    write_phantom_dataset,
)
from verse_jax.phantoms.render import (
    DEFAULT_MAX_VOXELS,
    DEFAULT_NUM_CASES,
    FIELDS_OF_VIEW,
    PHANTOM_VERSION,
    Phantom,
    direction_matrix,
    draw_spine,
    generate_phantom,
)

__all__ = [
    "FIELDS_OF_VIEW",
    "PHANTOM_VERSION",
    "DEFAULT_MAX_VOXELS",
    "DEFAULT_NUM_CASES",
    "Phantom",
    "direction_matrix",
    "draw_spine",
    "generate_phantom",
    "case_seed",
    "split_cases",
    "write_phantom_dataset",
    "default_dataset",
    "default_workers",
]
