"""Watermark: lossless round trips read back every bit, unmarked images are not detected, the change is invisible."""

import io
from functools import cache

import cv2
import numpy as np
import pytest
import pywt
from imwatermark import WatermarkEncoder
from PIL import Image

from flux2.watermark import (
    DETECTION_THRESHOLD,
    FLUX2_BITS,
    METHODS,
    REFERENCE_BITS,
    WatermarkCheck,
    WatermarkConfig,
    decode,
    embed,
    verify,
)

SIZES = (512, 1024)
# Measured on `realistic_image` (seeds 0-2, both sizes, both methods, textured or not): 41.1-42.1 dB. imwatermark's
# own encoder, which swaps two detail bands, gives 34.8-36.2 dB on the textured ones.
MIN_PSNR_DB = 40.0


@cache
def realistic_image(size: int, seed: int = 0, textured: bool = True) -> Image.Image:
    """A stand-in for a generated image: colour gradients, soft blobs, and (if textured) sinusoidal texture and
    sensor-like noise; untextured it is smooth, with faint noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3))
    for c in range(3):
        gx, gy = rng.uniform(-1, 1, 2)
        img[..., c] = 0.5 + 0.3 * (gx * x + gy * y)
        for _ in range(6 if textured else 0):
            fx, fy, phase = rng.uniform(2, 40), rng.uniform(2, 40), rng.uniform(0, 2 * np.pi)
            img[..., c] += 0.05 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        for _ in range(8):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.02, 0.22)
            img[..., c] += 0.2 * rng.uniform(-1, 1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
    img += rng.normal(0, 0.02 if textured else 0.005, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def png_round_trip(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def u_band(image: Image.Image) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    return pywt.dwt2(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)[:, :, 1].astype(np.float64), "haar")


@cache
def marked(size: int, method: str) -> Image.Image:
    return embed(realistic_image(size), WatermarkConfig(method=method))


def test_bits() -> None:
    assert REFERENCE_BITS == tuple(int(b) for b in bin(0x2AFE879CF52E)[2:])
    assert len(REFERENCE_BITS) == 46
    assert REFERENCE_BITS[:8] == (1, 0, 1, 0, 1, 0, 1, 1)
    assert len(FLUX2_BITS) == 48
    assert FLUX2_BITS == (0, 0) + REFERENCE_BITS
    assert int("".join(map(str, FLUX2_BITS)), 2) == 0x2AFE879CF52E
    assert WatermarkConfig() == WatermarkConfig(method="dwtDctSvd", bits=FLUX2_BITS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_lossless_round_trip(size: int, method: str) -> None:
    config = WatermarkConfig(method=method)
    original = realistic_image(size)
    out = marked(size, method)
    assert out.size == original.size and out.mode == "RGB"
    assert psnr(original, out) > MIN_PSNR_DB
    restored = png_round_trip(out)
    assert decode(restored, config) == FLUX2_BITS
    assert verify(restored, config) == WatermarkCheck(bit_accuracy=1.0, detected=True, method=method)


def test_svd_reads_smooth_image() -> None:
    """dwtDctSvd reads a smooth image back exactly; dwtDct may not (see the module docstring), so it is not tested."""
    config = WatermarkConfig(method="dwtDctSvd")
    original = realistic_image(512, seed=1, textured=False)
    out = embed(original, config)
    assert psnr(original, out) > MIN_PSNR_DB
    assert decode(png_round_trip(out), config) == FLUX2_BITS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_unmarked_not_detected(size: int, method: str) -> None:
    config = WatermarkConfig(method=method)
    for image in (realistic_image(size, seed=1), Image.new("RGB", (size, size), (128, 128, 128))):
        check = verify(image, config)
        assert not check.detected and check.bit_accuracy < DETECTION_THRESHOLD


@pytest.mark.parametrize("method", METHODS)
def test_other_config_does_not_detect(method: str) -> None:
    out = marked(512, method)
    other = METHODS[1 - METHODS.index(method)]
    assert not verify(out, WatermarkConfig(method=other)).detected
    # Blocks cycle through the bits, so the 46-bit reference mark and our 48-bit mark are different marks.
    assert not verify(out, WatermarkConfig(method=method, bits=REFERENCE_BITS)).detected


def test_reads_reference_mark() -> None:
    """A mark made as the reference makes it (imwatermark's encoder, 46 bits, RGB reversed to BGR) verifies."""
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", list(REFERENCE_BITS))
    bgr = np.ascontiguousarray(np.asarray(realistic_image(512))[:, :, ::-1])
    theirs = Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1]))
    check = verify(png_round_trip(theirs), WatermarkConfig(method="dwtDct", bits=REFERENCE_BITS))
    assert check.bit_accuracy == 1.0 and check.detected


@pytest.mark.parametrize("method", METHODS)
def test_only_u_approximation_changes(method: str) -> None:
    """The mark lives in the U channel's Haar approximation band; the detail bands stay as they were (imwatermark's
    own encoder swaps the horizontal and vertical ones, a mean change of about 3.4 on these images)."""
    _, before = u_band(realistic_image(512))
    _, after = u_band(marked(512, method))
    for b, a in zip(before, after, strict=True):
        assert np.abs(a - b).mean() < 0.05


@pytest.mark.parametrize("kwargs", [{"method": "rivaGan"}, {"method": "dwtdct"}, {"bits": ()}, {"bits": (0, 2, 1)}])
def test_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="watermark"):
        WatermarkConfig(**kwargs)


def test_bad_images() -> None:
    with pytest.raises(ValueError, match="65536 pixels"):
        embed(Image.new("RGB", (255, 256)))
    with pytest.raises(ValueError, match="65536 pixels"):
        decode(Image.new("RGB", (200, 300)))
    with pytest.raises(ValueError, match="blocks"):
        embed(Image.new("RGB", (16384, 4)))  # enough pixels, but too thin for one 8x8 block
    with pytest.raises(ValueError, match="RGB"):
        embed(Image.new("RGBA", (256, 256)))
    assert embed(Image.new("RGB", (256, 256), (90, 140, 200))).size == (256, 256)  # the smallest square works
