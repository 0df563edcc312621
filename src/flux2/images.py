"""Image files and PIL conversions: opening an image file with an error that says what is wrong, PIL images to and
from [-1, 1] tensors, pixel caps and side-by-side joins.

File reading lives here so that sampling.py, which prepares reference images with these conversions, stays free
of file I/O. torch is imported where a tensor is made: the CLI opens and checks images before torch loads.
"""

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from torch import Tensor

ImageInput = Image.Image | str | Path  # an image in memory, or its file


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """An RGB image from a file, with an error that names `what` when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as err:
        raise ValueError(f"{what} ({path}) is not a readable image: {err}") from err


def image_to_tensor(img: Image.Image) -> "Tensor":
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    import torch

    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def tensor_to_image(pixels: "Tensor") -> Image.Image:
    """[3, H, W] in [-1, 1] -> uint8 RGB image; truncation (not rounding), as the reference converts."""
    x = pixels.detach().float().clamp(-1, 1).permute(1, 2, 0)
    return Image.fromarray((127.5 * (x + 1.0)).byte().cpu().numpy())


def cap_pixels(img: Image.Image, k: int) -> Image.Image:
    """Downscale (LANCZOS, floor sizes) so that width * height <= k; smaller images are returned unchanged."""
    w, h = img.size
    if w * h <= k:
        return img
    s = math.sqrt(k / (w * h))
    return img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)


def concatenate_images(images: list[Image.Image]) -> Image.Image:
    """Side by side on a white background, vertically centred (used for prompt upsampling inputs)."""
    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, (height - im.height) // 2))
        x += im.width
    return canvas


def open_image_input(img: ImageInput, what: str) -> Image.Image:
    """An RGB image (a palette or RGBA image given in memory is converted, as files are)."""
    return img.convert("RGB") if isinstance(img, Image.Image) else open_image(img, what)


def open_mask(mask: ImageInput) -> Image.Image:
    """A mask as given: a PIL image, or a file opened without conversion (its mode is checked later)."""
    if isinstance(mask, Image.Image):
        return mask
    path = Path(mask)
    if not path.is_file():
        raise ValueError(f"mask not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened
    except OSError as err:
        raise ValueError(f"mask ({path}) is not a readable image: {err}") from err


def image_sha256(img: Image.Image) -> str:
    rgb = img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()
