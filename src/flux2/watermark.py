"""Invisible watermark: embed the FLUX.2 message in an image, read it back, decide whether it is there.

Three methods. "lumaTile" (ours, the default) is described below. "dwtDct" and "dwtDctSvd" are invisible-watermark's
(`imwatermark`): the reference (`flux2/watermark.py`) uses dwtDct (its call in the CLI is commented out), and
dwtDctSvd was our default before lumaTile; `verify` with the default config still finds dwtDctSvd marks.

lumaTile: the mark is a ±1 pattern on a grid of 2x2-pixel cells, smoothed, added to luma (R, G and B move together,
so greyscale images stay grey and a flat chroma does not matter). The pattern is one 64x64-pixel tile repeated over
the image; each tile's 1024 cells are dealt out to the bits (21-22 cells a bit for 48 bits, chip signs from a fixed
seed), and a bit's cells carry its sign. The strength follows the image: a local-contrast mask puts up to 3.3x more
of the mark in texture than in flat areas, scaled so that the mark costs a set PSNR (42 dB by default; flat images
get the mark evenly). Reading: high-pass the luma (so the picture itself interferes less), divide by the local
contrast, fold the image onto one tile (sum all 64x64 windows), and correlate with each bit's pattern at all 4096
cyclic offsets and 4 rotations by FFT; the offset and rotation where the bits' correlations are strongest overall
(a rule that does not look at the expected bits) is where the tile sits, and each bit is the sign there. So a crop
(any offset), a quarter turn, and a brightness change (correlation signs do not care about scale) keep the mark.

Measured by `benchmarks/watermark_robustness.py` on 28 stand-ins at 512 and 1024 px (generated-image-like,
photo-like, flat, and greyscale): lumaTile reads back every bit after PNG, JPEG 95/90/75/50, WebP 80, brightness
±5/±10%, a 5% or 10% crop per side, a quarter turn and a 0.5x resize, at 41.2-41.9 dB PSNR, embedding in about
12 ms (512) / 95 ms (1024) and verifying in 40 / 90 ms on 2 CPU cores. Limits: at the 256x256 minimum a full-frame
texture (the "photo" stand-in) keeps only 0.88 of the bits after a 10% crop; scaling without restoring the size,
other angles, mirroring, and crops under 128 px a side are not covered. At 42 dB the mark is a fine luma grain that
an attentive eye can see on a smooth gradient at 1:1; raise `psnr_db` (45 dB: JPEG 50 and WebP 80 start to
cost bits) where that matters more than sturdiness.

dwtDct and dwtDctSvd (imwatermark 0.2.0): BGR uint8 -> YUV (OpenCV) -> one-level Haar DWT of the U channel only ->
the approximation band is cut into 4x4 blocks, and block i carries bit i mod len(bits) by quantising one value to a
grid of step 36 (dwtDct: the largest non-DC coefficient of the block, with no DCT in spite of the name; dwtDctSvd:
the first singular value of the block's DCT). dwtDctSvd survives PNG, JPEG 95-75 and a 0.5x resize on colour
images. Any crop moves its fixed block grid and loses it; JPEG 50 loses it on most images; on greyscale images
(flat chroma, which JPEG and WebP smooth away) JPEG 75 and WebP 80 do; and a brightness change moves the quantised
values, which reads back as noise or, where every block moves by about half a step, as every bit inverted. dwtDct
is lost by JPEG with Pillow's default 4:2:0 chroma subsampling (quality 95 included) and misreads even
losslessly on smooth images. We embed with imwatermark's block coder (`encode_frame`) and do the colour and wavelet
round trip here, because `WatermarkEncoder.encode` rebuilds U with the horizontal and vertical detail bands swapped
(about 36 dB PSNR instead of 41.5 on textured images) and truncates floats into uint8; `WatermarkDecoder` reads
our marks and theirs alike. The reference feeds float32 [0, 255] tensors to OpenCV, whose float YUV conversion
offsets chroma by 0.5 rather than 128, so its marks, saved as 8-bit, read back at only 0.87-0.96; we mark 8-bit.

Detection: `detected` means at least 90% of the bits match the message or its inverse (an inverted pattern is what
a brightness change leaves of a dwtDctSvd mark). An unmarked image reads back fair coin flips: for lumaTile the
offset and rotation are chosen without looking at the message, so one 48-bit word is compared. 48 fair coins
match in >= 44 places with probability sum(C(48, k), k=44..48) / 2**48 = 7.6e-10 (46 bits, >= 42: 2.6e-9); both
polarities double it, and the default check (lumaTile, then dwtDctSvd) makes four comparisons: at most 3.0e-9 an
image. Measured on the benchmark's 210 unmarked images (every kind, 256x256 to 1024x1024): none detected by any
method (for lumaTile: the default check, both marks); the highest bit accuracy seen was 0.73 (lumaTile), 0.69
(dwtDctSvd, dwtDct), and the means, 0.56-0.57, are close to the 0.558 that 48 fair coins give.
"""

from dataclasses import dataclass
from functools import cache

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

METHODS = ("lumaTile", "dwtDct", "dwtDctSvd")
DEFAULT_METHOD = "lumaTile"
PREVIOUS_DEFAULT = "dwtDctSvd"  # what flux2 marked with before lumaTile: verify with the default config finds it too
MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images (it compares the area, not each side); one rule for all

# imwatermark's methods
_BLOCK_CODERS = {"dwtDct": EmbedMaxDct, "dwtDctSvd": EmbedDwtDctSvd}
U_CHANNEL = 1  # imwatermark marks only U: its Y scale is 0 and its channel loop never reaches V
U_SCALE = 36  # imwatermark's quantisation step for U, the same for both methods
BLOCK = 4  # imwatermark's block side, in approximation-band samples (8 pixels)

# lumaTile
CELL = 2  # pixels per cell side: 4x4 cells survive JPEG 50 and a 0.5x resize too, but textured photos drown them
TILE_CELLS = 32  # cells per tile side: 1024 cells, 21-22 per bit for 48 bits
TILE = CELL * TILE_CELLS  # 64 px: also the offset search range
MIN_READ_SIDE = 2 * TILE  # 4 tiles: about 85 cells a bit; reading smaller crops is guesswork
MAX_TILE_BITS = TILE_CELLS**2 // 8  # at least 8 cells a bit in each tile
TILE_SEED = FLUX2_MESSAGE  # any fixed number: it deals the cells to bits and draws the chip signs
SMOOTHING = 0.7  # px, Gaussian: rounds the cells' corners, which JPEG would spend its bits on
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as OpenCV and Pillow compute Y
MASK_FLOOR, MASK_CEILING, MASK_SLOPE = 0.6, 2.0, 1 / 8  # local contrast (std in 9x9 px) -> relative strength
HIGH_PASS = 1.0  # px, Gaussian subtracted before reading: removes most of the picture, keeps most of the mark
RESIDUAL_CLIP = 2.0  # local-contrast units: an edge counts no more than a few pixels of mark

# `detected` needs 90% of the bits (see the module docstring for the false-positive probability).
DETECTION_THRESHOLD = 0.9


@dataclass(frozen=True)
class WatermarkConfig:
    """Which method writes the mark, which bits it carries, and (lumaTile) how strong it is."""

    # lumaTile survives JPEG 50, WebP 80, brightness changes, crops and quarter turns, greyscale images included;
    # dwtDctSvd survives JPEG 75 on colour images; dwtDct is the reference's (benchmarks/watermark_robustness.py).
    method: str = DEFAULT_METHOD
    bits: tuple[int, ...] = FLUX2_BITS
    psnr_db: float = 42.0  # lumaTile: the mark's size as the PSNR it costs; lower is sturdier and more visible

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"watermark method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not self.bits or any(b not in (0, 1) for b in self.bits):
            raise ValueError(f"watermark bits must be a non-empty sequence of 0s and 1s; got {self.bits!r}")
        if self.method == "lumaTile" and len(self.bits) > MAX_TILE_BITS:
            raise ValueError(f"watermark bits: lumaTile carries at most {MAX_TILE_BITS}; got {len(self.bits)}")
        if not 30.0 <= self.psnr_db <= 60.0:
            raise ValueError(f"watermark psnr_db must be between 30 and 60 dB; got {self.psnr_db}")


@dataclass(frozen=True)
class WatermarkCheck:
    """What `verify` found: the fraction of bits that match (the message, or its inverse if `inverted`), whether
    that counts as the mark being there, and which method's mark was read."""

    bit_accuracy: float
    detected: bool
    method: str
    inverted: bool = False


def _check_size(size: tuple[int, int], config: WatermarkConfig, reading: bool = False) -> None:
    width, height = size
    if config.method == "lumaTile" and reading:  # a crop of a marked image may be under MIN_PIXELS
        if min(width, height) < MIN_READ_SIDE:
            raise ValueError(
                f"image is {width}x{height}: reading the lumaTile watermark needs both sides >= {MIN_READ_SIDE} px"
            )
        return
    if width * height < MIN_PIXELS:
        raise ValueError(
            f"image is {width}x{height} ({width * height} pixels); the {config.method} watermark needs at least "
            f"{MIN_PIXELS} pixels (256x256)"
        )
    if config.method == "lumaTile" and min(width, height) < TILE:
        raise ValueError(f"image is {width}x{height}: the lumaTile watermark needs both sides >= {TILE} px (one tile)")
    blocks = (height // (2 * BLOCK)) * (width // (2 * BLOCK))
    if config.method != "lumaTile" and blocks < len(config.bits):
        raise ValueError(
            f"image is {width}x{height}: it holds {blocks} watermark blocks of {2 * BLOCK}x{2 * BLOCK} pixels, "
            f"fewer than the {len(config.bits)} bits to embed"
        )


# ------------------------------------------------------------------------------------------ imwatermark's methods


def _to_bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # imwatermark reads OpenCV's BGR


def _embed_block_coder(rgb: np.ndarray, config: WatermarkConfig) -> np.ndarray:
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    coder = _BLOCK_CODERS[config.method](list(config.bits), wmLen=len(config.bits))
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    h, w = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4  # imwatermark's crop: the Haar band needs even sides
    approx, details = pywt.dwt2(yuv[:h, :w, U_CHANNEL].astype(np.float64), "haar")
    coder.encode_frame(approx, U_SCALE)  # in place
    yuv[:h, :w, U_CHANNEL] = np.clip(np.rint(pywt.idwt2((approx, details), "haar")), 0, 255)
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[:, :, ::-1]


def _read_block_coder(image: Image.Image, config: WatermarkConfig) -> np.ndarray:
    bits = WatermarkDecoder("bits", len(config.bits)).decode(_to_bgr(image), config.method)
    return np.where(np.asarray(bits, dtype=bool), 1.0, -1.0)


# ------------------------------------------------------------------------------------------------------- lumaTile


@cache
def _tile_layout(n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Which bit each cell of the tile carries, and its chip sign: two [TILE_CELLS, TILE_CELLS] arrays."""
    rng = np.random.default_rng(TILE_SEED)
    owner = rng.permutation(np.arange(TILE_CELLS**2) % n_bits).reshape(TILE_CELLS, TILE_CELLS)
    return owner, rng.choice([-1.0, 1.0], (TILE_CELLS, TILE_CELLS))


def _cells_to_pixels(cells: np.ndarray, wrap: bool = False) -> np.ndarray:
    """Each cell value spread over CELL x CELL pixels, then smoothed (cyclically if `wrap`: a tile)."""
    pixels = np.kron(cells, np.ones((CELL, CELL)))
    kernel = cv2.getGaussianKernel(7, SMOOTHING)
    if not wrap:
        return cv2.sepFilter2D(pixels, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return cv2.sepFilter2D(np.pad(pixels, 3, mode="wrap"), -1, kernel, kernel)[3:-3, 3:-3]


@cache
def _bit_patterns_fft(n_bits: int) -> np.ndarray:
    """The conjugate FFT of each bit's part of the tile, [n_bits, TILE, TILE]: what reading correlates with."""
    owner, chips = _tile_layout(n_bits)
    patterns = np.stack([_cells_to_pixels(np.where(owner == k, chips, 0.0), wrap=True) for k in range(n_bits)])
    return np.conj(np.fft.fft2(patterns))


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ LUMA


def _local_contrast(y: np.ndarray) -> np.ndarray:
    mean = cv2.blur(y, (9, 9))
    return np.sqrt(np.maximum(cv2.blur(y * y, (9, 9)) - mean * mean, 0.0))


def _tile_mark(y: np.ndarray, config: WatermarkConfig) -> np.ndarray:
    """The luma change [H, W] that carries `config.bits`: the tile pattern under the contrast mask, at psnr_db."""
    h, w = y.shape
    owner, chips = _tile_layout(len(config.bits))
    reps = (-(-h // TILE), -(-w // TILE))
    signs = np.where(np.asarray(config.bits) == 1, 1.0, -1.0)
    pattern = _cells_to_pixels(np.tile(chips * signs[owner], reps))[:h, :w]
    mask = np.clip(MASK_FLOOR + MASK_SLOPE * _local_contrast(y), MASK_FLOOR, MASK_CEILING)
    mark = cv2.blur(mask, (15, 15)) * pattern  # the blur keeps the mask from drawing the picture's edges
    rms = 255.0 / 10 ** (config.psnr_db / 20)
    return mark * (rms / np.sqrt(np.mean(mark**2)))


def _embed_tile(rgb: np.ndarray, config: WatermarkConfig) -> np.ndarray:
    mark = _tile_mark(_luma(rgb), config)
    return np.clip(np.rint(rgb + mark[..., None]), 0, 255).astype(np.uint8)


def _residual(y: np.ndarray) -> np.ndarray:
    """The luma with the picture mostly taken out: high-passed, in units of local contrast, clipped."""
    r = y - cv2.GaussianBlur(y, (0, 0), HIGH_PASS)
    contrast = np.sqrt(cv2.GaussianBlur(r * r, (0, 0), 4.0)) + 1.0  # +1: flat areas, where only the mark is left
    return np.clip(r / contrast, -RESIDUAL_CLIP, RESIDUAL_CLIP)


def _fold(r: np.ndarray) -> np.ndarray:
    """Sum of every TILE x TILE window of the grid (zero-padded at the far edges): one tile, [TILE, TILE]."""
    h, w = r.shape
    padded = np.zeros((-(-h // TILE) * TILE, -(-w // TILE) * TILE))
    padded[:h, :w] = r
    return padded.reshape(padded.shape[0] // TILE, TILE, padded.shape[1] // TILE, TILE).sum(axis=(0, 2))


def _read_tile(image: Image.Image, n_bits: int) -> np.ndarray:
    """Each bit's correlation with its pattern where the tile sits: offset and quarter turn found by the summed
    squared correlations of all bits, which does not depend on the bits' values."""
    r = _residual(_luma(np.asarray(image.convert("RGB"))))
    patterns = _bit_patterns_fft(n_bits)
    best, found = -1.0, np.zeros(n_bits)
    for turns in range(4):
        corr = np.real(np.fft.ifft2(np.fft.fft2(_fold(np.rot90(r, turns)))[None] * patterns))  # [bits, dy, dx]
        energy = (corr**2).sum(axis=0)
        at = np.unravel_index(np.argmax(energy), energy.shape)
        if energy[at] > best:
            best, found = float(energy[at]), corr[:, at[0], at[1]]
    return np.sign(found)


# --------------------------------------------------------------------------------------------------------- public


def embed(image: Image.Image, config: WatermarkConfig = WatermarkConfig()) -> Image.Image:
    """Return a watermarked copy of an RGB image, the same size."""
    if image.mode != "RGB":
        raise ValueError(f"watermark embed needs an RGB image; got mode {image.mode!r} (use image.convert('RGB'))")
    _check_size(image.size, config)
    rgb = np.asarray(image)
    marked = _embed_tile(rgb, config) if config.method == "lumaTile" else _embed_block_coder(rgb, config)
    return Image.fromarray(np.ascontiguousarray(marked), mode="RGB")


def _read(image: Image.Image, config: WatermarkConfig) -> np.ndarray:
    """+1 / -1 per bit as read (0: no evidence either way)."""
    _check_size(image.size, config, reading=True)
    if config.method == "lumaTile":
        return _read_tile(image, len(config.bits))
    return _read_block_coder(image, config)


def decode(image: Image.Image, config: WatermarkConfig = WatermarkConfig()) -> tuple[int, ...]:
    """The bits read back from an image (any mode; read as RGB), as many as `config.bits` holds."""
    return tuple(int(v > 0) for v in _read(image, config))


def _check(image: Image.Image, config: WatermarkConfig) -> WatermarkCheck:
    read = _read(image, config)
    expected = np.where(np.asarray(config.bits) == 1, 1.0, -1.0)
    matches, inverse = int(np.sum(read == expected)), int(np.sum(read == -expected))
    accuracy = max(matches, inverse) / len(expected)
    return WatermarkCheck(accuracy, accuracy >= DETECTION_THRESHOLD, config.method, inverted=inverse > matches)


def verify(image: Image.Image, config: WatermarkConfig = WatermarkConfig()) -> WatermarkCheck:
    """Whether the image carries `config.bits` written with `config.method` (or inverted). With the default
    method, a mark of the previous default (dwtDctSvd) counts too; `method` says which one was found."""
    check = _check(image, config)
    if check.detected or config.method != DEFAULT_METHOD:
        return check
    try:
        previous = _check(image, WatermarkConfig(method=PREVIOUS_DEFAULT, bits=config.bits))
    except ValueError:  # too thin for dwtDctSvd's blocks: it cannot carry that mark
        return check
    return previous if previous.detected else check
