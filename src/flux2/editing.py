"""Images and masks for inpainting, outpainting and image-to-image: sizes, soft masks, crops and compositing.

Masks are white where the image is to be regenerated and black where it is kept. Everything here is plain PIL
and torch on small tensors; the pipeline does the model work.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageFilter, ImageOps
from torch import Tensor

from flux2.sampling import PIXELS_PER_TOKEN

WORK_PIXELS = 1024**2  # diffusers' inpaint cap: larger images are edited at about 1 MP and scaled back
MASK_WHITE = {"1": 255, "L": 255, "I;16": 65535, "I": 65535, "F": 1.0}  # single-channel modes and their white
ASPECT_TOLERANCE = 0.02  # a mask may differ in size from its image, not in shape
MAX_CROP_ASPECT = 4  # a crop around a thin mask is widened to at most this aspect ratio


def check_strength(strength: float) -> float:
    if not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def working_size(width: int, height: int, max_pixels: int = WORK_PIXELS, upscale: bool = False) -> tuple[int, int]:
    """The size the model edits at: scaled down to `max_pixels` if larger (and up to it with `upscale`, for a
    crop), aspect kept, floored to 16 px."""
    scale = math.sqrt(max_pixels / (width * height))
    scale = scale if upscale else min(1.0, scale)
    w, h = (int(side * scale) // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN for side in (width, height))
    if w < PIXELS_PER_TOKEN or h < PIXELS_PER_TOKEN:
        raise ValueError(f"image is {width}x{height} px: both sides must be at least {PIXELS_PER_TOKEN} px")
    return w, h


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask as black/white "L" at `size`: regenerate where it is at least half white (diffusers' rule).

    It must be one channel; another size is resized if its shape matches the image's.
    """
    mask = _single_channel(mask)
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        if abs(mw / mh - w / h) > ASPECT_TOLERANCE * (w / h):
            raise ValueError(f"mask is {mw}x{mh} px but the image is {w}x{h} px: give a mask of the image's shape")
        mask = mask.resize(size, Image.Resampling.NEAREST)
    grey = np.asarray(mask.convert("L") if mask.mode == "1" else mask, dtype=np.float32)
    return Image.fromarray(np.where(grey >= MASK_WHITE[mask.mode] / 2, 255, 0).astype(np.uint8), mode="L")


def _single_channel(mask: Image.Image) -> Image.Image:
    """The mask's one channel; an RGB(A) or palette image whose colour channels are all equal (a grey mask saved
    as colour, as many editors do) counts as one, if fully opaque."""
    if mask.mode in MASK_WHITE:
        return mask
    if mask.mode in ("RGB", "RGBA", "P", "LA", "PA"):
        pixels = np.asarray(mask.convert("RGBA"))
        if (pixels[..., 3] == 255).all() and (pixels[..., :1] == pixels[..., 1:3]).all():
            return Image.fromarray(np.ascontiguousarray(pixels[..., 0]), mode="L")
    raise ValueError(
        f"mask must be a single-channel (greyscale) image, got mode {mask.mode!r} with colours or transparency: "
        "white marks what to regenerate, black what to keep (convert with image.convert('L'))"
    )


def feathered(mask: Image.Image, radius: float, inward: bool = False) -> Image.Image:
    """A soft edge about `radius` px wide. Outward (for the latents) the white area stays fully white and the edge
    lies in the kept area; inward (for the final composite) every black pixel stays black, so the kept pixels are
    exactly the source, and the edge lies in the regenerated area."""
    if not isinstance(radius, int | float) or radius < 0:
        raise ValueError(f"mask_blur must be a number of px >= 0, got {radius!r}")
    if radius == 0:
        return mask
    size = 2 * math.ceil(radius / 2) + 1  # move the edge by half the radius, then blur across the other half
    moved = mask.filter(ImageFilter.MinFilter(size) if inward else ImageFilter.MaxFilter(size))
    soft = moved.filter(ImageFilter.GaussianBlur(radius / 6))
    return ImageChops.darker(soft, mask) if inward else ImageChops.lighter(soft, mask)


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
    """The mask's bounding box grown by `padding` px on every side, its short side widened to at most
    MAX_CROP_ASPECT : 1 and to at least 64 px, within the image; None for an empty mask."""
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"crop_padding must be a whole number of px >= 0, got {padding!r}")
    bbox = mask.getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    width, height = mask.size
    box_w, box_h = right - left + 2 * padding, bottom - top + 2 * padding
    want_w = max(box_w, math.ceil(box_h / MAX_CROP_ASPECT), 64)
    want_h = max(box_h, math.ceil(box_w / MAX_CROP_ASPECT), 64)
    x0, x1 = _span((left + right) / 2, want_w, width)
    y0, y1 = _span((top + bottom) / 2, want_h, height)
    return Box(x0, y0, x1, y1)


def _span(centre: float, length: int, limit: int) -> tuple[int, int]:
    """[start, end) of `length` around `centre`, shifted to lie within [0, limit)."""
    length = min(length, limit)
    start = min(max(0, round(centre - length / 2)), limit - length)
    return start, start + length


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
