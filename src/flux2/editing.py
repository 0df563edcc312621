"""Images and masks for inpainting, outpainting and image-to-image: sizes, soft masks, crops and compositing.

Masks are white where the image is to be regenerated and black where it is kept. Everything here is plain PIL,
and torch on small tensors (imported where used: the CLI checks masks before torch loads); the pipeline does the
model work.
"""

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

from flux2.images import image_sha256, open_image_input, open_mask
from flux2.params import PIXELS_PER_TOKEN
from flux2.request import GenerationRequest

if TYPE_CHECKING:
    from torch import Tensor

# A masked crop (crop_padding) is edited larger than it is, so the model paints it with the detail of a whole
# image; but at most 4x per side: a 40 px mask scaled to the 1 MP working size took minutes and gave no better
# pixels once scaled back.
CROP_MAX_UPSCALE = 4.0
MASK_WHITE = {"1": 255, "L": 255, "I;16": 65535, "I": 65535, "F": 1.0}  # single-channel modes and their white
MAX_CROP_ASPECT = 4  # a crop around a thin mask is widened to at most this aspect ratio


def working_size(width: int, height: int, max_pixels: int, upscale: bool = False) -> tuple[int, int]:
    """The size the model edits at: scaled down to `max_pixels` if larger (and, with `upscale`, for a crop, up
    towards it, at most CROP_MAX_UPSCALE per side), aspect kept, floored to 16 px."""
    scale = math.sqrt(max_pixels / (width * height))
    scale = min(scale, CROP_MAX_UPSCALE) if upscale else min(1.0, scale)
    w, h = (int(side * scale) // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN for side in (width, height))
    if w < PIXELS_PER_TOKEN or h < PIXELS_PER_TOKEN:
        raise ValueError(f"image is {width}x{height} px: both sides must be at least {PIXELS_PER_TOKEN} px")
    return w, h


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """The one mask rule (Python API, CLI, studio): a mask of the image's size, or of its aspect ratio within a
    pixel of rounding (a half-size mask of an odd-sized image), is resized to the image; another shape is refused.
    """
    (mw, mh), (w, h) = mask_size, image_size
    if (mw, mh) == (w, h):
        return
    # Scaled to the image's width (or height), the mask's other side must land within a pixel of the image's.
    if min(mw, mh) < 1 or (abs(mh * w / mw - h) > 1 and abs(mw * h / mh - w) > 1):
        raise ValueError(
            f"mask is {mw}x{mh} px but the image is {w}x{h} px: give a mask of the image's size or of its aspect "
            "ratio (it is then resized to the image)"
        )


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask as black/white "L" at `size`: regenerate where it is at least half white (diffusers' rule).

    It must be one channel, of the image's size or aspect ratio (`check_mask_size`); it is resized to `size`.
    """
    mask = _single_channel(mask)
    if mask.size != size:
        check_mask_size(mask.size, size)
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
    if radius == 0:
        return mask
    size = 2 * math.ceil(radius / 2) + 1  # move the edge by half the radius, then blur across the other half
    moved = mask.filter(ImageFilter.MinFilter(size) if inward else ImageFilter.MaxFilter(size))
    soft = moved.filter(ImageFilter.GaussianBlur(radius / 6))
    return ImageChops.darker(soft, mask) if inward else ImageChops.lighter(soft, mask)


def latent_mask(mask: Image.Image, width: int, height: int) -> "Tensor":
    """The mask at token resolution, packed row-major [1, h*w, 1] in [0, 1] (1 = regenerate).

    Bilinear without antialiasing, as diffusers' inpaint pipeline downsamples (each token reads the centre of its
    16 x 16 px block), so that a hard mask gives the same tokens there.
    """
    import torch
    import torch.nn.functional as F

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
    """The image on a larger canvas (the new border repeats its edge pixels) and the mask of the new border.
    The margins are checked by flux2.request (whole px >= 0, at least one above 0)."""
    width, height = image.width + left + right, image.height + top + bottom
    if width % PIXELS_PER_TOKEN or height % PIXELS_PER_TOKEN:
        raise ValueError(
            f"outpainting {image.width}x{image.height} by left {left}, right {right}, top {top}, bottom {bottom} "
            f"gives {width}x{height} px: both sides must be multiples of {PIXELS_PER_TOKEN} (change the margins)"
        )
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = ImageOps.expand(Image.new("L", image.size, 0), border=(left, top, right, bottom), fill=255)
    return Image.fromarray(pixels), mask


@dataclass(frozen=True)
class EditSource:
    """Where image-to-image and inpainting start, and how an inpainted region goes back into its source."""

    mode: str  # "img2img" | "inpaint" | "outpaint"
    image: Image.Image  # the source as given
    work: Image.Image  # the region being edited, at the size the model runs at
    strength: float
    as_reference: bool = False  # the clean source also conditions the model (reference tokens, t = 10)
    work_mask: Image.Image | None = None  # soft mask at the working size (inpainting), white = regenerate
    mask: Image.Image | None = None  # soft mask at the source's size, for the pixel composite
    region: Box | None = None  # the crop being edited, in source pixels (None: all of it)
    settings: dict = field(default_factory=dict)  # how the edit was set up, for the record

    @property
    def output_size(self) -> tuple[int, int]:
        return self.image.size if self.mask is not None else self.work.size

    def paste(self, generated: Image.Image) -> Image.Image:
        """Inpainting: the generated region scaled back into the source, the kept pixels exactly the source's."""
        if self.mask is None:
            return generated
        region = self.region or Box(0, 0, *self.image.size)
        placed = self.image.convert("RGB")
        placed.paste(generated.resize(region.size, Image.Resampling.LANCZOS), region.as_tuple()[:2])
        return composite(placed, self.image, self.mask)


def edit_source(request: GenerationRequest) -> EditSource:
    """How an edit's source image is prepared: the working region and size, the soft masks, the record."""
    image = open_image_input(request.image, "source image")
    if request.mode == "img2img":
        work = image.resize(working_size(*image.size, request.max_pixels), Image.Resampling.LANCZOS)
        return EditSource("img2img", image, work, request.strength, settings={"max_pixels": request.max_pixels})
    if request.mode == "inpaint":
        hard = binary_mask(open_mask(request.mask), image.size)
        settings = {"mask": image_sha256(hard), "mask_blur": request.mask_blur, "crop_padding": request.crop_padding}
        return _masked_source(request, image, hard, settings)
    margins = {"left": request.left, "right": request.right, "top": request.top, "bottom": request.bottom}
    canvas, mask = outpaint_canvas(image, **margins)
    return _masked_source(request, canvas, mask, {"original": image_sha256(image), **margins,
                                                  "mask_blur": request.mask_blur})  # fmt: skip


def _masked_source(request: GenerationRequest, source: Image.Image, hard: Image.Image, settings: dict) -> EditSource:
    """Inpainting and outpainting: the region to edit (the mask's box with `crop_padding`), scaled to the
    working size, with the mask softened outward for the latents and inward for the final composite."""
    blur, region = request.mask_blur, None
    if request.crop_padding is not None:  # the box holds the whole soft edge
        region = mask_box(hard, request.crop_padding + math.ceil(2 * blur))
    box = region or Box(0, 0, *source.size)
    work_size = working_size(*box.size, request.max_pixels, upscale=region is not None)
    work = source.crop(box.as_tuple()).resize(work_size, Image.Resampling.LANCZOS)
    work_hard = hard.crop(box.as_tuple()).resize(work_size, Image.Resampling.NEAREST)
    settings = {**settings, "source_as_reference": request.source_as_reference, "work_size": list(work_size)}
    return EditSource(request.mode, source, work, request.strength, request.source_as_reference,
                   feathered(work_hard, blur * work_size[0] / box.size[0]), feathered(hard, blur, inward=True),
                   region, settings)  # fmt: skip
