"""PNG previews of a CT with its vertebra mask and labelled centroids (matplotlib, Agg backend).

Two views through the spine, sampled in physical space (oblique inputs too): a sagittal plane
(world y-z at a fixed world x) and a coronal plane (world x-z at a fixed world y), superior up.
"""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from scipy import ndimage

from verse_jax import labels as verse_labels
from verse_jax.geometry import Volume
from verse_jax.io import Centroids
from verse_jax.io.files import atomic_path

_WINDOW_HU = (-300.0, 1200.0)
_MAX_PIXELS = 600


def _spine_point_mm(image: Volume, mask: Volume | None, centroids: Centroids | None) -> np.ndarray:
    """(3,) LPS mm point the views pass through: median centroid, mask centre, or volume centre."""
    if centroids is not None and len(centroids.labels):
        return np.median(centroids.points_mm, axis=0)
    if mask is not None and np.any(mask.array):
        com = ndimage.center_of_mass(np.asarray(mask.array) > 0)
        return mask.geometry.index_to_physical(np.array(com))
    return image.geometry.corners_mm().mean(axis=0)


def sample_plane(volume: Volume, axes: tuple[int, int], fixed_mm: np.ndarray, order: int):
    """Sample ``volume`` on a world-axis-aligned plane through ``fixed_mm``.

    Args:
        volume: (x, y, z) volume, any direction.
        axes: the two world axes spanned by the plane (horizontal, vertical), e.g. (1, 2).
        fixed_mm: (3,) point on the plane (LPS mm).
        order: spline order (1 image, 0 labels).

    Returns:
        (rows, cols) array with superior (larger world coordinate of ``axes[1]``) on row 0,
        and the isotropic pixel size in mm.
    """
    corners = volume.geometry.corners_mm()
    low, high = corners.min(axis=0), corners.max(axis=0)
    extent = high[list(axes)] - low[list(axes)]
    step = max(float(min(volume.geometry.spacing_mm)), float(extent.max()) / _MAX_PIXELS, 1e-3)
    h = low[axes[0]] + step * np.arange(int(extent[0] / step) + 1)
    v = high[axes[1]] - step * np.arange(int(extent[1] / step) + 1)
    points = np.broadcast_to(np.asarray(fixed_mm, np.float64), (v.size, h.size, 3)).copy()
    points[..., axes[0]] = h[None, :]
    points[..., axes[1]] = v[:, None]
    index = volume.geometry.physical_to_index(points)
    coords = np.moveaxis(index, -1, 0)
    cval = _WINDOW_HU[0] if order else 0
    output = np.float32 if order else None  # no float copy of the whole volume
    plane = ndimage.map_coordinates(
        np.asarray(volume.array), coords, output=output, order=order, cval=cval, mode="constant"
    )
    return plane, step


def render_preview(
    image: Volume, mask: Volume | None = None, centroids: Centroids | None = None, title=None
) -> Figure:
    """Figure with sagittal and coronal views, mask in colours, centroids named (e.g. ``L1``)."""
    center = _spine_point_mm(image, mask, centroids)
    colors = ListedColormap(verse_labels.label_colors())
    figure = Figure(figsize=(10, 7), dpi=100)
    for column, (axes, name) in enumerate((((1, 2), "sagittal"), ((0, 2), "coronal"))):
        ax = figure.add_subplot(1, 2, column + 1)
        ct, step = sample_plane(image, axes, center, order=1)
        ax.imshow(ct, cmap="gray", vmin=_WINDOW_HU[0], vmax=_WINDOW_HU[1], interpolation="none")
        if mask is not None:
            labels, _ = sample_plane(mask, axes, center, order=0)
            labels = np.where(labels <= 28, labels, 0).astype(np.int64)
            ax.imshow(
                np.ma.masked_equal(labels, 0),
                cmap=colors,
                vmin=-0.5,
                vmax=28.5,
                alpha=0.45,
                interpolation="none",
            )
        if centroids is not None:
            _draw_centroids(ax, image, centroids, axes, step)
        ax.set_title(f"{name} ({'y-z' if axes[0] == 1 else 'x-z'}, superior up)")
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def _draw_centroids(ax, image: Volume, centroids: Centroids, axes, step: float) -> None:
    low = image.geometry.corners_mm().min(axis=0)
    high = image.geometry.corners_mm().max(axis=0)
    for label, point in zip(centroids.labels, centroids.points_mm, strict=True):
        col = (point[axes[0]] - low[axes[0]]) / step
        row = (high[axes[1]] - point[axes[1]]) / step
        try:
            name = verse_labels.vertebra_name(int(label))
        except ValueError:
            name = str(int(label))
        ax.plot(col, row, "o", color="yellow", markersize=3)
        ax.text(col + 4, row, name, color="yellow", fontsize=7, va="center")


def write_preview(
    path, image: Volume, mask: Volume | None = None, centroids: Centroids | None = None, title=None
) -> Path:
    """Render :func:`render_preview` and write it as PNG (temporary file + rename)."""
    path = Path(path)
    figure = render_preview(image, mask, centroids, title)
    FigureCanvasAgg(figure)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path
