"""Images and masks for inpainting, outpainting and image-to-image: sizes, soft masks, crops and compositing.

Masks are white where the image is to be regenerated and black where it is kept. Everything here is plain PIL
and torch on small tensors; the pipeline does the model work.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from flux2.sampling import PIXELS_PER_TOKEN

WORK_PIXELS = 1024**2  # diffusers' inpaint cap: larger images are edited at about 1 MP and scaled back
MASK_MODES = ("L", "1", "I", "I;16", "F")  # single-channel PIL modes
ASPECT_TOLERANCE = 0.02  # a mask may differ in size from its image, not in shape


def check_strength(strength: float) -> float:
    if not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def working_size(width: int, height: int, max_pixels: int = WORK_PIXELS) -> tuple[int, int]:
    """The size the model edits at: scaled down to `max_pixels` if larger (aspect kept), floored to 16 px."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w, h = (int(side * scale) // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN for side in (width, height))
    if w < PIXELS_PER_TOKEN or h < PIXELS_PER_TOKEN:
        raise ValueError(f"image is {width}x{height} px: both sides must be at least {PIXELS_PER_TOKEN} px")
    return w, h


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask as black/white "L" at `size`: regenerate where it is at least half white (diffusers' rule).

    It must be one channel; another size is resized if its shape matches the image's.
    """
    if mask.mode not in MASK_MODES:
        raise ValueError(
            f"mask must be a single-channel (greyscale) image, got mode {mask.mode!r}: white marks what to "
            "regenerate, black what to keep (convert with image.convert('L'))"
        )
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        if abs(mw / mh - w / h) > ASPECT_TOLERANCE * (w / h):
            raise ValueError(f"mask is {mw}x{mh} px but the image is {w}x{h} px: give a mask of the image's shape")
        mask = mask.resize(size, Image.Resampling.NEAREST)
    grey = np.asarray(mask.convert("F") if mask.mode in ("I", "I;16", "F") else mask.convert("L"), dtype=np.float32)
    top = 255.0 if mask.mode != "F" else 1.0
    return Image.fromarray(np.where(grey >= top / 2, 255, 0).astype(np.uint8), mode="L")


def feathered(mask: Image.Image, radius: float) -> Image.Image:
    """A soft edge `radius` px wide or so, laid outside the mask: the mask is grown by `radius`, then blurred
    (sigma radius / 3), so all of the white area stays fully white and the kept area turns exactly black from
    about 2 x radius past the edge."""
    if not isinstance(radius, int | float) or radius < 0:
        raise ValueError(f"mask_blur must be a number of px >= 0, got {radius!r}")
    if radius == 0:
        return mask
    grown = mask.filter(ImageFilter.MaxFilter(2 * math.ceil(radius) + 1))
    return grown.filter(ImageFilter.GaussianBlur(radius / 3))


def latent_mask(mask: Image.Image, width: int, height: int) -> Tensor:
    """The mask at token resolution, packed row-major [1, h*w, 1] in [0, 1] (1 = regenerate).

    Bilinear without antialiasing, as diffusers' inpaint pipeline downsamples (each token reads the centre of its
    16 x 16 px block), so that a hard mask gives the same tokens there.
    """
    pixels = torch.from_numpy(np.asarray(mask.resize((width, height), Image.Resampling.NEAREST), np.float32) / 255)
    small = F.interpolate(pixels[None, None], size=(height // 16, width // 16), mode="bilinear")
    return small.flatten()[None, :, None]


def composite(generated: Image.Image, source: Image.Image, mask: Image.Image) -> Image.Image:
    """The generated image where the mask is white, the source exactly where it is black, blended between."""
    return Image.composite(generated.convert("RGB"), source.convert("RGB"), mask)


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.right, self.bottom


def mask_box(mask: Image.Image, padding: int) -> Box | None:
    """The mask's bounding box grown by `padding` px on every side, within the image; None for an empty mask."""
    if padding < 0:
        raise ValueError(f"crop padding must be >= 0 px, got {padding}")
    bbox = mask.getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    width, height = mask.size
    left, top = max(0, left - padding), max(0, top - padding)
    return Box(left, top, min(width, right + padding), min(height, bottom + padding))


def outpaint_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int
) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas (the new border repeats its edge pixels) and the mask of the new border."""
    margins = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in margins.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"outpaint margin {name} must be a whole number of px >= 0, got {value!r}")
    width, height = image.width + left + right, image.height + top + bottom
    if width % PIXELS_PER_TOKEN or height % PIXELS_PER_TOKEN:
        raise ValueError(
            f"outpainting {image.width}x{image.height} by left {left}, right {right}, top {top}, bottom {bottom} "
            f"gives {width}x{height} px: both sides must be multiples of {PIXELS_PER_TOKEN} (change the margins)"
        )
    if left + right + top + bottom == 0:
        raise ValueError("outpaint needs at least one margin > 0 (left, right, top or bottom)")
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = ImageOps.expand(Image.new("L", image.size, 0), border=(left, top, right, bottom), fill=255)
    return Image.fromarray(pixels), mask
