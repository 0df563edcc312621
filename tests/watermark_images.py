"""Deterministic stand-ins for generated images and photos, shared by the watermark tests and its benchmark.

Kinds: "smooth" (gradients and soft blobs: skies, skin, out-of-focus light), "textured" (plus sinusoidal texture
and noise: fabric, foliage), "shapes" (hard-edged saturated shapes on a gradient), "photo" (natural-image
statistics: 1/f noise with a spectrum like a photo's, lighting gradient, a few hard-edged objects, sensor noise),
"flat" (one colour with a faint gradient and faint noise: a studio backdrop, an almost empty render), and
"grey-smooth" / "grey-photo" (those two in greyscale, stored as RGB with R = G = B: their chroma is flat). Each is a
pure function of its kind, size and seed.
"""

from collections.abc import Iterator

import numpy as np
from PIL import Image

KINDS = ("smooth", "textured", "shapes", "photo", "flat", "grey-smooth", "grey-photo")
GREY_KINDS = ("grey-smooth", "grey-photo")
# Sizes of the unmarked set: the smallest the mark allows (256x256), generator sizes, portrait and landscape.
UNMARKED_SIZES = ((256, 256), (512, 512), (640, 384), (384, 640), (768, 512), (1024, 1024))


def synthetic(kind: str, size: int | tuple[int, int], seed: int) -> Image.Image:
    """A deterministic RGB stand-in; `size` is a side or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    if kind in GREY_KINDS:
        return synthetic(kind.removeprefix("grey-"), size, seed).convert("L").convert("RGB")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    if kind == "photo":
        img = _photo(rng, x, y)
    elif kind == "flat":
        img = rng.uniform(0.2, 0.8, 3) + 0.03 * (rng.uniform(-1, 1, 3) * x[..., None])
        img = img + rng.normal(0, 0.002, (height, width, 3))
    elif kind in ("smooth", "textured", "shapes"):
        img = _generated(kind, rng, x, y)
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def _generated(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    img = 0.5 + 0.3 * (rng.uniform(-1, 1, (1, 1, 3)) * x[..., None] + rng.uniform(-1, 1, (1, 1, 3)) * y[..., None])
    for _ in range(8):  # soft blobs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
        img += 0.25 * rng.uniform(-1, 1, 3) * blob[..., None]
    if kind == "textured":
        for _ in range(6):
            f, phase = rng.uniform(2, 40, 2), rng.uniform(0, 2 * np.pi, 3)
            img += 0.05 * np.sin(2 * np.pi * (f[0] * x[..., None] + f[1] * y[..., None]) + phase)
    if kind == "shapes":
        _paint_shapes(img, rng, x, y, 12)
    noise = {"smooth": 0.005, "textured": 0.02, "shapes": 0.01}[kind]
    return img + rng.normal(0, noise, img.shape)


def _paint_shapes(img: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, count: int) -> None:
    for _ in range(count):  # hard edges in saturated colours
        x0, y0 = rng.uniform(0, 1, 2)
        w, h = rng.uniform(0.05, 0.3, 2)
        mask = (
            (abs(x - x0) < w / 2) & (abs(y - y0) < h / 2)
            if rng.random() < 0.5
            else ((x - x0) ** 2 + (y - y0) ** 2 < (w / 2) ** 2)
        )
        img[mask] = rng.choice([0.05, 0.5, 0.95], 3)


def _pink_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Noise whose amplitude spectrum falls as 1/f, as natural images' do; unit standard deviation."""
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = np.inf
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=shape)) / f))
    return (noise - noise.mean()) / noise.std()


def _photo(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    shade = 0.45 + 0.15 * _pink_noise(rng, x.shape) + 0.2 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
    img = shade[..., None] * rng.uniform(0.6, 1.2, 3)  # a tinted light
    img += 0.06 * np.stack([_pink_noise(rng, x.shape) for _ in range(3)], axis=-1)  # colour varies, more slowly
    _paint_shapes(img, rng, x, y, 4)
    img += 0.04 * rng.uniform(0.5, 1.5) * _pink_noise(rng, x.shape)[..., None]  # texture on the objects too
    return img + rng.normal(0, 0.01, x.shape)[..., None]


def unmarked_images(count: int, first_seed: int = 1000) -> Iterator[tuple[str, Image.Image]]:
    """`count` varied unmarked images (every kind, every size in UNMARKED_SIZES), named kind-WxH-seed."""
    for i in range(count):
        kind, size, seed = (
            KINDS[i % len(KINDS)],
            UNMARKED_SIZES[(i // len(KINDS)) % len(UNMARKED_SIZES)],
            first_seed + i,
        )
        yield f"{kind}-{size[0]}x{size[1]}-{seed}", synthetic(kind, size, seed)
