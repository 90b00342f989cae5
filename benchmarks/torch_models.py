"""PyTorch twins of the verse-jax networks, for benchmark baselines only (not used by the library).

The modules mirror `verse_jax.models` layer by layer (same convolutions, pooling, upsampling and
activations) and take their weights from a Flax parameter tree with `load_flax_params`, so that the
same weights run in both frameworks and outputs can be compared. Layout: torch's NCDHW with
D, H, W = our x, y, z. Tricubic upsampling has no torch op; it is applied as one small matrix per
axis, taken from `jax.image.resize` itself, so the two agree exactly (edge renormalisation too).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def resize_matrix(size_in: int, factor: int, method: str) -> np.ndarray:
    """(size_in * factor, size_in) matrix M with resize(v) = M @ v, as `jax.image.resize` does."""
    eye = jnp.eye(size_in, dtype=jnp.float32)
    return np.asarray(jax.image.resize(eye, (size_in * factor, size_in), method=method))


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        if self.name == "relu":
            return F.relu(x)
        if self.name == "leaky_relu":
            return F.leaky_relu(x, 0.1)
        return x


class _Block(nn.Module):
    def __init__(self, cin: int, features: int, activation: str):
        super().__init__()
        self.conv0 = nn.Conv3d(cin, features, 3, padding=1)
        self.conv1 = nn.Conv3d(features, features, 3, padding=1)
        self.act = _Act(activation)

    def forward(self, x):
        return self.act(self.conv1(self.act(self.conv0(x))))


class TorchUNetBody(nn.Module):
    """Contracting/expanding path of `verse_jax.models.unet.unet_body` (inference: no dropout)."""

    def __init__(self, cin: int, num_levels: int, filters: int, activation: str):
        super().__init__()
        self.num_levels = num_levels
        self.contracting = nn.ModuleList(
            _Block(cin if lvl == 0 else filters, filters, activation) for lvl in range(num_levels)
        )
        self.expanding = nn.ModuleList(
            _Block(filters if lvl == num_levels - 1 else 2 * filters, filters, activation)
            for lvl in range(num_levels)
        )

    def forward(self, x):
        skips = []
        for level in range(self.num_levels):
            x = self.contracting[level](x)
            if level < self.num_levels - 1:
                skips.append(x)
                x = F.avg_pool3d(x, 2)
        for level in reversed(range(self.num_levels)):
            if level < self.num_levels - 1:
                up = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
                x = torch.cat([skips[level], up], dim=1)
            x = self.expanding[level](x)
        return x


class TorchUNet(nn.Module):
    """`verse_jax.models.UNet3D` in torch: U-Net body and a 3x3x3 linear head."""

    def __init__(self, cin: int, num_levels: int, filters: int, activation: str, outputs: int):
        super().__init__()
        self.body = TorchUNetBody(cin, num_levels, filters, activation)
        self.output = nn.Conv3d(filters, outputs, 3, padding=1)

    def forward(self, x):
        return self.output(self.body(x))


class TorchSCN(nn.Module):
    """`verse_jax.models.SpatialConfigurationNet` in torch; forward returns the heatmaps only."""

    def __init__(self, crop_size, *, num_landmarks=25, filters=64, num_levels=4, downsample=4):
        super().__init__()
        self.conv0 = nn.Conv3d(1, filters, 3, padding=1)
        self.body = TorchUNetBody(filters, num_levels, filters, "leaky_relu")
        self.local_heatmaps = nn.Conv3d(filters, num_landmarks, 3, padding=1)
        self.sconv = nn.ModuleList(
            nn.Conv3d(num_landmarks if i == 0 else filters, filters, 7, padding=3) for i in range(3)
        )
        self.spatial_downsampled = nn.Conv3d(filters, num_landmarks, 7, padding=3)
        self.downsample = downsample
        self.crop_size = tuple(crop_size)
        for axis, size in zip("xyz", crop_size, strict=True):
            m = resize_matrix(size // downsample, downsample, "cubic")
            self.register_buffer(f"up_{axis}", torch.from_numpy(m.copy()))

    def forward(self, x):
        if tuple(x.shape[2:]) != self.crop_size:
            raise ValueError(f"TorchSCN built for {self.crop_size}, got {tuple(x.shape[2:])}")
        local = self.local_heatmaps(self.body(F.leaky_relu(self.conv0(x), 0.1)))
        node = F.avg_pool3d(local, self.downsample)
        for conv in self.sconv:
            node = F.leaky_relu(conv(node), 0.1)
        node = torch.tanh(self.spatial_downsampled(node))
        node = torch.einsum("bcxyz,Xx->bcXyz", node, self.up_x)
        node = torch.einsum("bcXyz,Yy->bcXYz", node, self.up_y)
        spatial = torch.einsum("bcXYz,Zz->bcXYZ", node, self.up_z)
        return local * spatial


def _copy_conv(conv: nn.Conv3d, p: dict) -> None:
    kernel = np.asarray(p["kernel"], dtype=np.float32)  # (kx, ky, kz, cin, cout)
    conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
    conv.bias.data = torch.from_numpy(np.asarray(p["bias"], dtype=np.float32).copy())


def _copy_body(body: TorchUNetBody, params: dict) -> None:
    for level in range(body.num_levels):
        for half, blocks in (("contracting", body.contracting), ("expanding", body.expanding)):
            block = params[f"{half}_level{level}"]
            _copy_conv(blocks[level].conv0, block["conv0"])
            _copy_conv(blocks[level].conv1, block["conv1"])


def load_flax_params(module: nn.Module, params: dict) -> nn.Module:
    """Copies a Flax parameter tree (`variables["params"]`) into a torch twin; returns it (eval)."""
    if isinstance(module, TorchSCN):
        _copy_conv(module.conv0, params["conv0"])
        _copy_body(module.body, params)
        _copy_conv(module.local_heatmaps, params["local_heatmaps"])
        for i, conv in enumerate(module.sconv):
            _copy_conv(conv, params[f"sconv{i}"])
        _copy_conv(module.spatial_downsampled, params["spatial_downsampled"])
    elif isinstance(module, TorchUNet):
        _copy_body(module.body, params)
        _copy_conv(module.output, params["output"])
    else:
        raise TypeError(f"no weight mapping for {type(module).__name__}")
    return module.eval()


def to_torch(x) -> torch.Tensor:
    """(b, x, y, z, c) array -> (b, c, x, y, z) float32 tensor."""
    return torch.from_numpy(
        np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 4, 1, 2, 3))
    )


def from_torch(t: torch.Tensor) -> np.ndarray:
    """(b, c, x, y, z) tensor -> (b, x, y, z, c) numpy array."""
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)
