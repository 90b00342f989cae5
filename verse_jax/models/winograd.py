"""Winograd 3x3x3 convolution (stride 1, SAME zero padding) in plain JAX, for the CPU.

XLA's CPU convolution runs far below the CPU's matmul rate. The Winograd algorithm F(m, 3) turns a
3x3x3 convolution into elementwise transforms and one small matrix product per transform position,
with (m + 2)^3 / (27 m^3) of the direct method's multiplications (F(4, 3): 8x fewer).

Layout: each transform is one pass per spatial axis built from strided slices, combined with
constant coefficients (zero terms skipped, +-1 as add/subtract) and stacked on a new leading axis,
so XLA fuses every pass without gathers or transposes. The products run over the ``n^3`` positions
(``n = m + 2``) as ``(positions, tiles, cin) @ (positions, cin, cout)``. The volume is processed in
slabs of tiles inside a loop so that the transformed data (3.4x (F(4, 3)) to 8x (F(2, 3)) the
input) stays small and cache-resident instead of being materialised for the whole volume.

Gradients are a ``custom_vjp``: the input gradient is the same convolution of the output gradient
with the flipped, transposed kernel; the kernel gradient is accumulated slab by slab in the Winograd
domain (``V^T dM`` per position), so nothing but ``x`` and ``kernel`` is kept for the backward pass.

Cross-correlation convention as ``lax.conv_general_dilated`` and Flax ``nn.Conv``:
``y[p, o] = sum_{d, i} x[p + d - 1, i] * kernel[d, i, o]`` for offsets ``d`` in ``{0, 1, 2}^3``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Transform matrices of F(m, 3) (Lavin & Gray 2016): y = A^T [(G g) * (B^T d)] along one axis,
# d the m + 2 inputs of a tile, g the 3 kernel taps, y the m outputs (cross-correlation).
_TRANSFORMS: dict[int, tuple[list, list, list]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

SUPPORTED_TILES = tuple(sorted(_TRANSFORMS))

# Tiles per slab: keeps the transformed slab (n^3 * tiles * channels floats) cache-sized; 48-96
# measured best for 64 channels (256: 1.2x, whole volume: 2x the CPU time).
SLAB_TILES = 64


def transform_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(B^T, G, A^T)`` of F(tile, 3): shapes (n, n), (n, 3), (tile, n), n = tile + 2."""
    if tile not in _TRANSFORMS:
        raise ValueError(f"winograd tile must be one of {SUPPORTED_TILES}, got {tile!r}")
    return tuple(np.array(m, np.float64) for m in _TRANSFORMS[tile])


def _combine(coefficients, terms):
    """Sum of ``c * t`` over the nonzero coefficients; +-1 become add/subtract."""
    total = None
    for c, t in zip(coefficients, terms, strict=True):
        c = float(c)
        if c == 0.0:
            continue
        if total is None:
            total = t if c == 1.0 else (-t if c == -1.0 else t * c)
        elif c in (1.0, -1.0):
            total = total + t if c == 1.0 else total - t
        else:
            total = total + t * c
    return total


def _tile_pass(d, matrix, step, axis, num_tiles):
    """Transform the tiles along one axis: (..., L, ...) -> (rows, ..., num_tiles, ...).

    Tile ``t`` holds elements ``t * step + j``, ``j < matrix.shape[1]``; its transform row ``i`` is
    ``sum_j matrix[i, j] * d[t * step + j]``, stacked on a new leading axis.
    """
    span = step * (num_tiles - 1) + 1
    slices = [
        lax.slice_in_dim(d, j, j + span, stride=step, axis=axis) for j in range(matrix.shape[1])
    ]
    return jnp.stack([_combine(row, slices) for row in matrix], axis=0)


def _output_pass(mm, at, axis):
    """One axis of the output transform: (n, rest...) -> rest with a new axis of size m at ``axis``.

    ``axis`` is right after the matching tile axis, so the final reshape reassembles the volume.
    """
    terms = [mm[i] for i in range(mm.shape[0])]
    return jnp.stack([_combine(row, terms) for row in at], axis=axis)


def _kron3(matrix):
    """Kronecker cube ``M (x) M (x) M`` of a (r, c) matrix as float32 (r^3, c^3)."""
    m = np.asarray(matrix, np.float64)
    return np.kron(np.kron(m, m), m).astype(np.float32)


def transform_kernel(kernel: jax.Array, tile: int = 4) -> jax.Array:
    """Winograd-domain kernel ``G g G^T`` along each axis.

    Args:
        kernel: (3, 3, 3, cin, cout), Flax ``nn.Conv`` layout (x, y, z taps).
        tile: output tile size m of F(m, 3).

    Returns:
        (n^3, cin, cout), n = tile + 2, positions in (x, y, z) row-major order.
    """
    _, g, _ = transform_matrices(tile)
    cin, cout = kernel.shape[3:]
    flat = kernel.reshape(27, cin * cout)
    u = jnp.dot(jnp.asarray(_kron3(g), kernel.dtype), flat, precision=lax.Precision.HIGHEST)
    return u.reshape(-1, cin, cout)


def _input_transform(slab, tile, tiles):
    """(1, tx*m+2, ty*m+2, tz*m+2, c) -> (n^3, tx*ty*tz, c), positions (x, y, z) row-major."""
    bt, _, _ = transform_matrices(tile)
    d = slab
    for k in (2, 1, 0):  # (nz, 1, X, Y, tz, c) -> (ny, nz, 1, X, ty, tz, c) -> (nx, ny, nz, ...)
        d = _tile_pass(d, bt, tile, axis=3, num_tiles=tiles[k])
    return d.reshape(-1, math.prod(tiles), slab.shape[-1])


def _output_transform(mm, tile, tiles):
    """(n^3, tx*ty*tz, c) -> (1, tx*m, ty*m, tz*m, c)."""
    _, _, at = transform_matrices(tile)
    n = tile + 2
    mm = mm.reshape(n, n, n, 1, *tiles, mm.shape[-1])
    for k in range(3):  # (ny, nz, 1, tx, m, ty, tz, c) -> (nz, 1, tx, m, ty, m, tz, c) -> ...
        mm = _output_pass(mm, at, axis=4 + k)
    return mm.reshape(1, *(t * tile for t in tiles), mm.shape[-1])


def _grad_output_transform(dy, tile, tiles):
    """Adjoint of the output transform: (1, tx*m, ty*m, tz*m, c) -> (n^3, tiles, c)."""
    _, _, at = transform_matrices(tile)
    d = dy
    for k in (2, 1, 0):
        d = _tile_pass(d, at.T, tile, axis=3, num_tiles=tiles[k])
    return d.reshape(-1, math.prod(tiles), dy.shape[-1])


def _slab_plan(tiles):
    """Tiles per slab along x and y, ``(cx, cy)``: divisors of ``tiles[:2]``, ~``SLAB_TILES``."""
    tx, ty, tz = tiles
    if ty * tz >= SLAB_TILES:
        fits = [c for c in range(2, ty + 1) if ty % c == 0 and c * tz <= SLAB_TILES]
        return 1, max(fits, default=1)
    return max(c for c in range(1, tx + 1) if tx % c == 0 and c * ty * tz <= SLAB_TILES), ty


def _slab_loop(compute, merge, init, batch, tiles, plan):
    """Folds ``carry = merge(carry, start, compute(start))`` over all slabs, in a loop.

    ``start = (b, x0, y0)`` is the slab's first tile. (Two independent slabs per step, for
    XLA:CPU to run on two cores, measured no faster: the loop body runs its ops one by one.)
    """
    cx, cy = plan
    ncx, ncy = tiles[0] // cx, tiles[1] // cy
    count = batch * ncx * ncy

    def step(j, carry):
        b, r = j // (ncx * ncy), j % (ncx * ncy)
        start = (b, (r // ncy) * cx, (r % ncy) * cy)
        return merge(carry, start, compute(start))

    if count == 1:
        return step(0, init)
    return lax.fori_loop(0, count, step, init)


def _conv_padded(xp, u, tile, tiles):
    """Winograd convolution of a padded input, whole tiles only.

    Args:
        xp: (b, tx*m+2, ty*m+2, tz*m+2, cin), zero border of one voxel low, rest high.
        u: (n^3, cin, cout) transformed kernel.
        tile: m.
        tiles: (tx, ty, tz).

    Returns:
        (b, tx*m, ty*m, tz*m, cout).
    """
    batch, cin, cout = xp.shape[0], xp.shape[-1], u.shape[-1]
    cx, cy = plan = _slab_plan(tiles)
    sub = (cx, cy, tiles[2])
    slab_shape = (1, cx * tile + 2, cy * tile + 2, xp.shape[3], cin)

    def compute(start):
        b, x0, y0 = start
        slab = lax.dynamic_slice(xp, (b, x0 * tile, y0 * tile, 0, 0), slab_shape)
        mm = jnp.matmul(_input_transform(slab, tile, sub), u, precision=lax.Precision.HIGHEST)
        return _output_transform(mm, tile, sub)

    def merge(out, start, y):
        b, x0, y0 = start
        return lax.dynamic_update_slice(out, y, (b, x0 * tile, y0 * tile, 0, 0))

    shape = (batch, *(t * tile for t in tiles), cout)
    return _slab_loop(compute, merge, jnp.zeros(shape, xp.dtype), batch, tiles, plan)


def _kernel_grad_padded(xp, dyp, tile, tiles):
    """Winograd-domain kernel gradient: sum over slabs of ``V^T dM``, (n^3, cin, cout).

    Args:
        xp: padded input as in ``_conv_padded``.
        dyp: (b, tx*m, ty*m, tz*m, cout) output gradient, zero beyond the true output.
        tile: m.
        tiles: (tx, ty, tz).
    """
    cin, cout = xp.shape[-1], dyp.shape[-1]
    cx, cy = plan = _slab_plan(tiles)
    sub = (cx, cy, tiles[2])
    x_shape = (1, cx * tile + 2, cy * tile + 2, xp.shape[3], cin)
    dy_shape = (1, cx * tile, cy * tile, dyp.shape[3], cout)

    def compute(start):
        b, x0, y0 = start
        slab = lax.dynamic_slice(xp, (b, x0 * tile, y0 * tile, 0, 0), x_shape)
        dslab = lax.dynamic_slice(dyp, (b, x0 * tile, y0 * tile, 0, 0), dy_shape)
        v = _input_transform(slab, tile, sub)
        dm = _grad_output_transform(dslab, tile, sub)
        dims = (((1,), (1,)), ((0,), (0,)))
        return lax.dot_general(v, dm, dims, precision=lax.Precision.HIGHEST)

    def merge(acc, start, du):
        del start
        return acc + du

    init = jnp.zeros(((tile + 2) ** 3, cin, cout), xp.dtype)
    return _slab_loop(compute, merge, init, xp.shape[0], tiles, plan)


def _tiles_and_pad(size, tile):
    tiles = tuple(-(-s // tile) for s in size)
    pad = [(1, t * tile + 1 - s, 0) for s, t in zip(size, tiles, strict=True)]
    return tiles, [(0, 0, 0), *pad, (0, 0, 0)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd(x, kernel, tile):
    size = x.shape[1:4]
    tiles, pad = _tiles_and_pad(size, tile)
    xp = lax.pad(x, jnp.zeros((), x.dtype), pad)
    y = _conv_padded(xp, transform_kernel(kernel, tile), tile, tiles)
    if y.shape[1:4] != size:
        y = y[:, : size[0], : size[1], : size[2], :]
    return y


def _winograd_fwd(x, kernel, tile):
    return _winograd(x, kernel, tile), (x, kernel)


def _winograd_bwd(tile, residuals, dy):
    x, kernel = residuals
    dx = _winograd(dy, jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4), tile)
    tiles, pad = _tiles_and_pad(x.shape[1:4], tile)
    xp = lax.pad(x, jnp.zeros((), x.dtype), pad)
    dy_pad = [(0, 0, 0)] + [(0, p[1] - 1, 0) for p in pad[1:4]] + [(0, 0, 0)]
    dyp = lax.pad(dy, jnp.zeros((), dy.dtype), dy_pad)
    du = _kernel_grad_padded(xp, dyp, tile, tiles)
    _, g, _ = transform_matrices(tile)
    n3, cin, cout = du.shape
    dk = jnp.dot(
        jnp.asarray(_kron3(g).T, du.dtype), du.reshape(n3, -1), precision=lax.Precision.HIGHEST
    )
    return dx, dk.reshape(kernel.shape)


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def winograd_conv3d(x: jax.Array, kernel: jax.Array, *, tile: int = 4) -> jax.Array:
    """3x3x3 convolution, stride 1, SAME zero padding, no bias, by Winograd F(tile, 3).

    Equal to ``lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=
    ("NDHWC", "DHWIO", "NDHWC"))`` up to rounding: F(2, 3) ~1e-7 and F(4, 3) ~3e-5 of the largest
    output magnitude, forward and gradients. Differentiable (``custom_vjp``) in ``x`` and
    ``kernel``. Computes in float32 at least (bfloat16 inputs are upcast, the result cast back).

    Args:
        x: (batch, x, y, z, cin), any spatial size >= 1.
        kernel: (3, 3, 3, cin, cout), Flax ``nn.Conv`` layout.
        tile: output tile size m, 2 or 4 (F(2, 3) is more exact, F(4, 3) faster).

    Returns:
        (batch, x, y, z, cout) in the result dtype of ``x`` and ``kernel``.
    """
    if x.ndim != 5:
        raise ValueError(f"winograd_conv3d expects x of shape (b, x, y, z, cin), got {x.shape}")
    if kernel.ndim != 5 or kernel.shape[:3] != (3, 3, 3):
        raise ValueError(f"winograd_conv3d expects kernel (3, 3, 3, cin, cout), got {kernel.shape}")
    if kernel.shape[3] != x.shape[4]:
        raise ValueError(
            f"winograd_conv3d: x has {x.shape[4]} channels but kernel expects {kernel.shape[3]}"
        )
    transform_matrices(tile)  # validates tile
    dtype = jnp.result_type(x, kernel)
    compute = jnp.promote_types(dtype, jnp.float32)
    y = _winograd(x.astype(compute), kernel.astype(compute), tile)
    return y.astype(dtype)
