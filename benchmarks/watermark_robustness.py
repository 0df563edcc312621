"""How well the invisible watermark survives saving and resizing, what it costs in PSNR, and how long it takes.

For each method (dwtDct, the reference's; dwtDctSvd), each image and each size, the image is marked with the 48-bit
FLUX.2 message (`flux2.watermark.embed`), attacked, and read back with `flux2.watermark.verify`:

  png         PNG round trip (lossless)
  jpeg95      JPEG quality 95, Pillow's default 4:2:0 chroma subsampling (what flux2.provenance writes)
  jpeg95-444  JPEG quality 95 without chroma subsampling (the mark lives in chroma, so this is the kinder case)
  jpeg90      JPEG quality 90, 4:2:0
  jpeg75      JPEG quality 75, 4:2:0
  half        downscale to 0.5x (Lanczos), then, for decoding, upscale back to the original size (bicubic): the
              blocks sit on a fixed pixel grid, so a detector that knows the original size restores it first

Images: synthetic stand-ins for generated images, deterministic per seed ("smooth": gradients and soft blobs;
"textured": plus sinusoidal texture and noise; "shapes": hard-edged saturated shapes on a gradient), at each size;
plus any `--image` files at their own size. PSNR is of the marked image against the original; `stock` is the PSNR
of imwatermark's own `WatermarkEncoder.encode`, which swaps two wavelet detail bands (see `flux2/watermark.py`).
Times are the median of `--repeats` runs of `embed` and of `decode` (on the marked image), on this machine's CPU.

  python benchmarks/watermark_robustness.py                  # table on stdout
  python benchmarks/watermark_robustness.py --json           # table on stderr, one JSON line on stdout
  python benchmarks/watermark_robustness.py --image photo.jpg --sizes 512
"""

import argparse
import importlib.metadata
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from imwatermark import WatermarkEncoder
from PIL import Image

from flux2.watermark import METHODS, WatermarkConfig, decode, embed, verify

KINDS = ("smooth", "textured", "shapes")


def _jpeg(quality: int, subsampling: int = 2) -> Callable[[Image.Image], Image.Image]:
    def attack(image: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality, subsampling=subsampling)  # 2 = 4:2:0, Pillow's default
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    return attack


def _png(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _half(image: Image.Image) -> Image.Image:
    w, h = image.size
    small = image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    return small.resize((w, h), Image.Resampling.BICUBIC)


ATTACKS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "png": _png,
    "jpeg95": _jpeg(95),
    "jpeg95-444": _jpeg(95, subsampling=0),
    "jpeg90": _jpeg(90),
    "jpeg75": _jpeg(75),
    "half": _half,
}


def synthetic(kind: str, size: int, seed: int) -> Image.Image:
    """A deterministic stand-in for a generated image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.3 * (rng.uniform(-1, 1, (1, 1, 3)) * x[..., None] + rng.uniform(-1, 1, (1, 1, 3)) * y[..., None])
    for _ in range(8):  # soft blobs: out-of-focus light, skin, sky
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
        img += 0.25 * rng.uniform(-1, 1, 3) * blob[..., None]
    if kind == "textured":
        for _ in range(6):  # fabric, foliage
            f, phase = rng.uniform(2, 40, 2), rng.uniform(0, 2 * np.pi, 3)
            img += 0.05 * np.sin(2 * np.pi * (f[0] * x[..., None] + f[1] * y[..., None]) + phase)
    if kind == "shapes":
        for _ in range(12):  # hard edges in saturated colours
            x0, y0 = rng.uniform(0, 1, 2)
            w, h = rng.uniform(0.05, 0.3, 2)
            mask = (
                (abs(x - x0) < w / 2) & (abs(y - y0) < h / 2)
                if rng.random() < 0.5
                else ((x - x0) ** 2 + (y - y0) ** 2 < (w / 2) ** 2)
            )
            img[mask] = rng.choice([0.05, 0.5, 0.95], 3)
    noise = {"smooth": 0.005, "textured": 0.02, "shapes": 0.01}[kind]
    img += rng.normal(0, noise, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def stock_embed(image: Image.Image, method: str) -> Image.Image:
    """imwatermark's own encoder, as the reference calls it (RGB reversed to BGR and back)."""
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", list(WatermarkConfig().bits))
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    return Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, method)[:, :, ::-1]))


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class Row:
    image: str
    size: str
    method: str
    psnr_db: float
    stock_psnr_db: float
    embed_ms: float
    decode_ms: float
    accuracy: dict[str, float]
    detected: dict[str, bool]


def measure(name: str, image: Image.Image, method: str, repeats: int) -> Row:
    config = WatermarkConfig(method=method)
    marked = embed(image, config)
    checks = {attack: verify(fn(marked), config) for attack, fn in ATTACKS.items()}
    return Row(
        image=name,
        size=f"{image.width}x{image.height}",
        method=method,
        psnr_db=psnr(image, marked),
        stock_psnr_db=psnr(image, stock_embed(image, method)),
        embed_ms=median_ms(lambda: embed(image, config), repeats),
        decode_ms=median_ms(lambda: decode(marked, config), repeats),
        accuracy={a: c.bit_accuracy for a, c in checks.items()},
        detected={a: c.detected for a, c in checks.items()},
    )


def images(args: argparse.Namespace) -> list[tuple[str, Image.Image]]:
    found = [
        (f"{kind}-{seed}", synthetic(kind, size, seed)) for size in args.sizes for kind in KINDS for seed in args.seeds
    ]
    found += [(Path(p).name, Image.open(p).convert("RGB")) for p in args.image]
    return found


def format_table(rows: list[Row]) -> str:
    head = f"{'image':<16} {'size':>9} {'method':<9} {'PSNR':>5} {'stock':>5} {'embed':>6} {'decode':>6}  "
    head += " ".join(f"{a:>10}" for a in ATTACKS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r.accuracy[a]:>9.2f}{'+' if r.detected[a] else ' '}" for a in ATTACKS)
        lines.append(
            f"{r.image:<16} {r.size:>9} {r.method:<9} {r.psnr_db:>5.1f} {r.stock_psnr_db:>5.1f} "
            f"{r.embed_ms:>6.0f} {r.decode_ms:>6.0f}  {cells}"
        )
    lines.append("bit accuracy per attack; '+' = detected (>= 0.9); PSNR dB (ours, stock imwatermark); times ms")
    return "\n".join(lines + ["", format_summary(rows)])


def format_summary(rows: list[Row]) -> str:
    lines = ["detected / images (lowest bit accuracy), per method and size"]
    for method in METHODS:
        for size in dict.fromkeys(r.size for r in rows):
            group = [r for r in rows if r.method == method and r.size == size]
            cells = " ".join(
                f"{sum(r.detected[a] for r in group)}/{len(group)} ({min(r.accuracy[a] for r in group):.2f})".rjust(11)
                for a in ATTACKS
            )
            psnrs = [r.psnr_db for r in group]
            lines.append(f"{method:<9} {size:>9}  PSNR {min(psnrs):.1f}-{max(psnrs):.1f}  {cells}")
    return "\n".join(lines)


def environment() -> dict:
    versions = {p: importlib.metadata.version(p) for p in ("invisible-watermark", "opencv-python", "Pillow", "numpy")}
    return {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        **versions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="sides of the synthetic images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one synthetic image per kind and seed")
    p.add_argument("--image", nargs="*", default=[], help="real photos, measured at their own size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of embed and decode per image")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout (the table goes to stderr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [measure(name, image, method, args.repeats) for name, image in images(args) for method in METHODS]
    table = format_table(rows)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({"environment": environment(), "attacks": list(ATTACKS), "rows": [asdict(r) for r in rows]}))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
