"""Invisible watermark: embed the FLUX.2 message in an image, read it back, decide whether it is there.

The reference (`flux2/watermark.py`) wraps invisible-watermark (`imwatermark`) with the "dwtDct" method; its call in
the CLI is commented out. We offer that method and "dwtDctSvd". Measured by `benchmarks/watermark_robustness.py`:
dwtDctSvd reads back every bit after PNG, JPEG 95/90/75 and a 0.5x resize; dwtDct is lost by JPEG with Pillow's
default 4:2:0 chroma subsampling (quality 95 included), and misreads even losslessly on smooth images, where the
coefficient it marks is no longer the block's largest after marking (0.67-0.96 bit accuracy on smooth stand-ins).

How imwatermark marks an image (0.2.0; both methods): BGR uint8 -> YUV (OpenCV) -> one-level Haar DWT of the U
channel only -> the approximation band is cut into 4x4 blocks, and block i carries bit i mod len(bits) by
quantising one value to a grid of step 36 (dwtDct: the largest non-DC coefficient of the block itself, with no DCT
in spite of the name; dwtDctSvd: the first singular value of the block's DCT). Reading needs the bit count but not
the bits; every bit is a majority vote over all blocks that carry it (about 85 blocks each at 512x512).

Two defects of `WatermarkEncoder.encode`, so we embed with imwatermark's own block coder (`encode_frame`) and do the
colour and wavelet round trip here; `WatermarkDecoder` reads our marks and theirs alike (it only looks at the
approximation band, which both write identically):
- it rebuilds the U channel with the horizontal and vertical detail bands swapped (`idwt2((ca, (v, h, d)))`),
  which transposes every 2x2 pixel block of the chroma: on textured images that costs more than the mark itself
  (about 36 dB PSNR with the swap, about 41.5 dB without, at 512 and 1024);
- it writes floats into a uint8 array (truncated, and wrapped when out of range) instead of rounding and clipping.

Tensors: the reference feeds float32 [0, 255] arrays to OpenCV, whose float YUV conversion offsets chroma by 0.5
rather than 128, so its marks, once saved as 8-bit, read back at only about 0.87-0.96 bit accuracy. We mark 8-bit
images (what is saved), which read back exactly.
"""

from dataclasses import dataclass

import cv2
import numpy as np
import pywt
from imwatermark import WatermarkDecoder
from imwatermark.dwtDctSvd import EmbedDwtDctSvd
from imwatermark.maxDct import EmbedMaxDct
from PIL import Image

FLUX2_MESSAGE = 0b001010101111111010000111100111001111010100101110  # = 0x2AFE879CF52E, 48 binary digits
# The reference builds its bit list with `bin(x)[2:]`, which drops the two leading zeros: it embeds 46 bits,
# starting 1,0,1,0,1,0,1,1. We embed the message as written (48 bits, zero-padded) by default. The two marks are
# not interchangeable: blocks cycle through the bits, so a 46-bit mark read as 48 bits (or back) is noise.
# Use REFERENCE_BITS to produce or verify a reference-compatible mark.
FLUX2_BITS: tuple[int, ...] = tuple(int(b) for b in format(FLUX2_MESSAGE, "048b"))
REFERENCE_BITS: tuple[int, ...] = tuple(int(b) for b in bin(FLUX2_MESSAGE)[2:])

METHODS = ("dwtDct", "dwtDctSvd")
_BLOCK_CODERS = {"dwtDct": EmbedMaxDct, "dwtDctSvd": EmbedDwtDctSvd}
U_CHANNEL = 1  # imwatermark marks only U: its Y scale is 0 and its channel loop never reaches V
U_SCALE = 36  # imwatermark's quantisation step for U, the same for both methods
BLOCK = 4  # imwatermark's block side, in approximation-band samples (8 pixels)
MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images (it compares the area, not each side)

# `detected` means at least 90% of the bits match. An unmarked image reads back roughly fair coin flips (chance
# accuracy 0.5); the chance that 48 fair coins match in >= 44 places is sum(C(48, k), k=44..48) / 2**48 = 7.6e-10
# (46 bits, >= 42 matches: 2.6e-9). A dwtDctSvd mark reads back 1.0 losslessly and after JPEG 95.
DETECTION_THRESHOLD = 0.9


@dataclass(frozen=True)
class WatermarkConfig:
    """Which method writes the mark and which bits it carries."""

    # "dwtDctSvd" survives JPEG 95-75 and smooth images; the reference's "dwtDct" loses the mark after JPEG 95 on
    # most images (benchmarks/watermark_robustness.py). One default for embedding and checking.
    method: str = "dwtDctSvd"
    bits: tuple[int, ...] = FLUX2_BITS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"watermark method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not self.bits or any(b not in (0, 1) for b in self.bits):
            raise ValueError(f"watermark bits must be a non-empty sequence of 0s and 1s; got {self.bits!r}")


@dataclass(frozen=True)
class WatermarkCheck:
    """What `verify` found: the fraction of bits that match, and whether that counts as the mark being there."""

    bit_accuracy: float
    detected: bool
    method: str


def _check_size(size: tuple[int, int], config: WatermarkConfig) -> None:
    width, height = size
    if width * height < MIN_PIXELS:
        raise ValueError(
            f"image is {width}x{height} ({width * height} pixels); the {config.method} watermark needs at least "
            f"{MIN_PIXELS} pixels (256x256)"
        )
    blocks = (height // (2 * BLOCK)) * (width // (2 * BLOCK))
    if blocks < len(config.bits):
        raise ValueError(
            f"image is {width}x{height}: it holds {blocks} watermark blocks of {2 * BLOCK}x{2 * BLOCK} pixels, "
            f"fewer than the {len(config.bits)} bits to embed"
        )


def _to_bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # imwatermark reads OpenCV's BGR


def _embed_bgr(bgr: np.ndarray, config: WatermarkConfig) -> np.ndarray:
    coder = _BLOCK_CODERS[config.method](list(config.bits), wmLen=len(config.bits))
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    h, w = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4  # imwatermark's crop: the Haar band needs even sides
    approx, details = pywt.dwt2(yuv[:h, :w, U_CHANNEL].astype(np.float64), "haar")
    coder.encode_frame(approx, U_SCALE)  # in place
    yuv[:h, :w, U_CHANNEL] = np.clip(np.rint(pywt.idwt2((approx, details), "haar")), 0, 255)
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)


def embed(image: Image.Image, config: WatermarkConfig = WatermarkConfig()) -> Image.Image:
    """Return a watermarked copy of an RGB image, the same size."""
    if image.mode != "RGB":
        raise ValueError(f"watermark embed needs an RGB image; got mode {image.mode!r} (use image.convert('RGB'))")
    _check_size(image.size, config)
    bgr = _embed_bgr(_to_bgr(image), config)
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]), mode="RGB")


def decode(image: Image.Image, config: WatermarkConfig = WatermarkConfig()) -> tuple[int, ...]:
    """The bits read back from an image (any mode; read as RGB), as many as `config.bits` holds."""
    _check_size(image.size, config)
    bits = WatermarkDecoder("bits", len(config.bits)).decode(_to_bgr(image), config.method)
    return tuple(int(b) for b in bits)


def verify(image: Image.Image, config: WatermarkConfig = WatermarkConfig()) -> WatermarkCheck:
    """Whether the image carries `config.bits` written with `config.method`."""
    read = decode(image, config)
    accuracy = sum(a == b for a, b in zip(read, config.bits, strict=True)) / len(config.bits)
    return WatermarkCheck(bit_accuracy=accuracy, detected=accuracy >= DETECTION_THRESHOLD, method=config.method)
