"""Tiled autoencoder decode and encode: large images in overlapping tiles, blended without seams.

Peak memory is one tile's activations plus the output canvas, instead of the whole image's activations.
The tiles overlap; in each overlap the two tiles are mixed with linear ramps (weights summing to 1), so
there is no visible border.

Not exact, as diffusers' tiled VAE is not: each tile's GroupNorm statistics (most of the difference) and its
mid-block attention see only that tile. On random weights a tiled decode is 0.6-0.7 relative L2 from the whole
one (`tests/test_tiling.py`); larger tiles help more than more overlap; real weights are unmeasured. So the
automatic rule tiles only images too large to decode whole on most machines.

    image = decode(ae, z)                    # tiled only above config.auto_above_pixels
    image = decode(ae, z, tiling=True)       # always tiled, default TilingConfig
    image = decode(ae, z, TilingConfig(32, 8, auto_above_pixels=0))
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flux2.autoencoder import PATCH, AutoEncoder


@dataclass(frozen=True)
class TilingConfig:
    """Sizes in latent cells (one cell = `ae.size_multiple` = 16 px of image)."""

    tile_latent: int = 64  # 1024 px tiles
    overlap_latent: int = 16  # 256 px blended between neighbours
    # Whole decode up to 8 MP (e.g. 2896²); above, the real-width decode's activations pass ten-odd GiB.
    auto_above_pixels: int = 2**23

    def __post_init__(self):
        if self.tile_latent < 1 or not 0 <= self.overlap_latent < self.tile_latent:
            raise ValueError(
                f"TilingConfig: need tile_latent >= 1 and 0 <= overlap_latent < tile_latent, "
                f"got tile_latent={self.tile_latent}, overlap_latent={self.overlap_latent}"
            )


Tiling = TilingConfig | bool | None  # None: automatic by size; True/False: forced on/off


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, n): a fixed stride, the last tile flush with the end (so it may overlap more)."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return [*starts, n - tile]


def ramp(length: int, start: int, n: int, overlap: int) -> Tensor:
    """1-D blend weights of a tile [start, start + length) on an axis of size n: rising over `overlap`
    at inner edges, flat at the image's own edges. Strictly positive, so the weight sum never vanishes."""
    w = torch.ones(length)
    if overlap > 0:
        up = (torch.arange(overlap) + 0.5) / overlap
        if start > 0:
            w[:overlap] = up
        if start + length < n:
            w[-overlap:] = torch.minimum(w[-overlap:], up.flip(0))
    return w


def blend_tiles(
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    in_tile: int,
    in_overlap: int,
    scale: float,
    out_channels: int,
    blend: bool = True,
) -> Tensor:
    """Apply `run` to overlapping tiles of x [B, C, H, W] (tile and overlap in x's pixels); each output tile is
    `scale` times its input tile. The outputs are blended into one canvas; blend=False pastes them instead
    (later tiles overwrite: the seams the blending removes, kept as a negative control for tests)."""
    b, _, h, w = x.shape
    out_h, out_w = round(h * scale), round(w * scale)
    canvas = total = None
    for top in tile_starts(h, in_tile, in_overlap):
        for left in tile_starts(w, in_tile, in_overlap):
            tile = run(x[:, :, top : top + in_tile, left : left + in_tile])
            th, tw = tile.shape[-2:]
            t, lft, ov = round(top * scale), round(left * scale), round(in_overlap * scale)
            if canvas is None:  # fp32 sums whatever the AE's dtype: the canvas is only 3 (or 4·z) channels
                canvas = torch.zeros(b, out_channels, out_h, out_w, device=tile.device)
                total = torch.zeros(1, 1, out_h, out_w, device=tile.device)
            region = (slice(None), slice(None), slice(t, t + th), slice(lft, lft + tw))
            if not blend:
                canvas[region] = tile
                continue
            weight = ramp(th, t, out_h, ov)[:, None] * ramp(tw, lft, out_w, ov)[None, :]
            weight = weight.to(tile.device)
            canvas[region] += tile.float() * weight
            total[region] += weight
    return (canvas if not blend else canvas / total).to(tile.dtype)


def tiled_decode(ae: AutoEncoder, z: Tensor, config: TilingConfig, blend: bool = True) -> Tensor:
    """z: normalised latents [B, 4·z, h, w] -> image [B, 3, 16h, 16w], decoded tile by tile."""
    scale = ae.size_multiple
    return blend_tiles(ae.decode, z, config.tile_latent, config.overlap_latent, scale, ae.params.out_ch, blend)


def tiled_encode(ae: AutoEncoder, x: Tensor, config: TilingConfig) -> Tensor:
    """x: image [B, 3, H, W] (multiples of 16) -> normalised latents [B, 4·z, H/16, W/16], tile by tile.

    Tiles start on multiples of 16 px, so each tile's latents land on whole latent cells. Each tile is
    normalised by `ae.encode`; the normalisation is per-channel affine and the blend weights sum to 1, so
    blending normalised latents equals normalising blended ones."""
    ae._check_image(x)
    m = ae.size_multiple
    channels = PATCH * PATCH * ae.params.z_channels
    return blend_tiles(ae.encode, x, config.tile_latent * m, config.overlap_latent * m, 1 / m, channels)


def use_tiling(pixels: int, tiling: Tiling) -> TilingConfig | None:
    """The config to tile with, or None for a whole decode/encode. pixels: image height × width.
    A TilingConfig is automatic by its own threshold; True forces the default config (to force a custom one,
    call `tiled_decode` / `tiled_encode`)."""
    if tiling is False:
        return None
    config = tiling if isinstance(tiling, TilingConfig) else TilingConfig()
    return config if tiling is True or pixels > config.auto_above_pixels else None


def decode(ae: AutoEncoder, z: Tensor, tiling: Tiling = None) -> Tensor:
    """`ae.decode`, tiled when `tiling` asks for it (None: only above auto_above_pixels)."""
    config = use_tiling(z.shape[-2] * z.shape[-1] * ae.size_multiple**2, tiling)
    return ae.decode(z) if config is None else tiled_decode(ae, z, config)


def encode(ae: AutoEncoder, x: Tensor, tiling: Tiling = None) -> Tensor:
    """`ae.encode`, tiled when `tiling` asks for it (None: only above auto_above_pixels)."""
    config = use_tiling(x.shape[-2] * x.shape[-1], tiling)
    return ae.encode(x) if config is None else tiled_encode(ae, x, config)
