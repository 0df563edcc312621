"""How well the invisible watermark survives saving, editing and cropping, what it costs, and how often it is found
where it is not.

For each method (`--methods`; default all of flux2.watermark.METHODS) and each image, the image is marked with the
48-bit FLUX.2 message (`flux2.watermark.embed`), attacked, and checked with `flux2.watermark.verify`:

  png           PNG round trip (lossless)
  jpeg95        JPEG quality 95, Pillow's default 4:2:0 chroma subsampling (what flux2.provenance writes)
  jpeg95-444    JPEG quality 95 without chroma subsampling
  jpeg90 / jpeg75 / jpeg50    JPEG at that quality, 4:2:0
  webp80        WebP quality 80 (lossy)
  bright+5 / bright-5 / bright+10 / bright-10    brightness scaled by 1.05 / 0.95 / 1.10 / 0.90 (Pillow's
                ImageEnhance.Brightness, what photo apps' exposure sliders do), saved as PNG
  crop5 / crop10    5% / 10% of the width and height cut from every side (the image gets smaller: 0.81x the area
                at 10%), not resized back
  rot90         a quarter turn
  half          downscale to 0.5x (Lanczos), then upscale back to the original size (bicubic) for reading

Images (tests/watermark_images.py): deterministic stand-ins for generated images and photos, seeds `--seeds` at
sides `--sizes`: "smooth", "textured", "shapes", "photo" (1/f noise with objects: a worst case of texture), "flat",
and greyscale "grey-smooth" and "grey-photo"; plus any `--image` files at their own size (greyscale files are
converted to RGB). PSNR is of the marked image against the original; `stock` is the PSNR of imwatermark's own
`WatermarkEncoder.encode` for its methods (it swaps two wavelet detail bands; see flux2/watermark.py). Times are
the median of `--repeats` runs of `embed`, and of `verify` on the marked image, on this machine's CPU.

False positives: `verify` with each method's config on `--unmarked` unmarked images (every kind, sizes 256x256 to
1024x1024, seeds 1000 on): how many are detected, and the highest bit accuracy seen (chance: about 0.5).

  python benchmarks/watermark_robustness.py                  # full table on stdout (about 10 min on 2 cores)
  python benchmarks/watermark_robustness.py --quick          # 512 px, one seed, lumaTile and dwtDctSvd
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
from PIL import Image, ImageEnhance

from flux2.watermark import DETECTION_THRESHOLD, METHODS, WatermarkConfig, embed, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from watermark_images import GREY_KINDS, KINDS, synthetic, unmarked_images  # noqa: E402

Attack = Callable[[Image.Image], Image.Image]


def _saved(image: Image.Image, **options) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, **options)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _jpeg(quality: int, subsampling: int = 2) -> Attack:
    return lambda image: _saved(image, format="JPEG", quality=quality, subsampling=subsampling)  # 2 = 4:2:0


def _brightness(factor: float) -> Attack:
    return lambda image: _saved(ImageEnhance.Brightness(image).enhance(factor), format="PNG")


def _crop(fraction: float) -> Attack:
    def attack(image: Image.Image) -> Image.Image:
        dx, dy = round(image.width * fraction), round(image.height * fraction)
        return image.crop((dx, dy, image.width - dx, image.height - dy))

    return attack


def _half(image: Image.Image) -> Image.Image:
    w, h = image.size
    small = image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    return small.resize((w, h), Image.Resampling.BICUBIC)


ATTACKS: dict[str, Attack] = {
    "png": lambda image: _saved(image, format="PNG"),
    "jpeg95": _jpeg(95),
    "jpeg95-444": _jpeg(95, subsampling=0),
    "jpeg90": _jpeg(90),
    "jpeg75": _jpeg(75),
    "jpeg50": _jpeg(50),
    "webp80": lambda image: _saved(image, format="WEBP", quality=80),
    "bright+5": _brightness(1.05),
    "bright-5": _brightness(0.95),
    "bright+10": _brightness(1.10),
    "bright-10": _brightness(0.90),
    "crop5": _crop(0.05),
    "crop10": _crop(0.10),
    "rot90": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "half": _half,
}


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
    grey: bool
    size: str
    method: str
    psnr_db: float
    stock_psnr_db: float | None  # imwatermark's own encoder; None for lumaTile (ours only)
    embed_ms: float
    verify_ms: float
    accuracy: dict[str, float]
    detected: dict[str, bool]


def measure(name: str, image: Image.Image, grey: bool, method: str, repeats: int) -> Row:
    config = WatermarkConfig(method=method)
    marked = embed(image, config)
    checks = {attack: verify(fn(marked), config) for attack, fn in ATTACKS.items()}
    return Row(
        image=name,
        grey=grey,
        size=f"{image.width}x{image.height}",
        method=method,
        psnr_db=psnr(image, marked),
        stock_psnr_db=None if method == "lumaTile" else psnr(image, stock_embed(image, method)),
        embed_ms=median_ms(lambda: embed(image, config), repeats),
        verify_ms=median_ms(lambda: verify(marked, config), repeats),
        accuracy={a: c.bit_accuracy for a, c in checks.items()},
        detected={a: c.detected for a, c in checks.items()},
    )


@dataclass
class FalsePositives:
    method: str
    images: int
    detected: int
    highest_accuracy: float
    highest_on: str
    mean_accuracy: float  # 48 fair coins: about 0.56 (the better of the two polarities)
    verify_ms: float  # median over the set: for lumaTile, a miss also reads the dwtDctSvd mark


def false_positives(method: str, count: int) -> FalsePositives:
    config = WatermarkConfig(method=method)
    found, times = [], []
    for name, image in unmarked_images(count):
        start = time.perf_counter()
        check = verify(image, config)
        times.append((time.perf_counter() - start) * 1e3)
        found.append((check.bit_accuracy, name, check.detected))
    highest = max(found)
    detected, mean = sum(d for _, _, d in found), statistics.mean(a for a, _, _ in found)
    return FalsePositives(method, count, detected, highest[0], highest[1], mean, statistics.median(times))


def images(args: argparse.Namespace) -> list[tuple[str, Image.Image, bool]]:
    found = [
        (f"{kind}-{seed}", synthetic(kind, size, seed), kind in GREY_KINDS)
        for size in args.sizes
        for kind in KINDS
        for seed in args.seeds
    ]
    for path in args.image:
        with Image.open(path) as image:
            found.append((Path(path).name, image.convert("RGB"), image.mode in ("L", "LA", "I", "I;16")))
    return found


def format_table(rows: list[Row]) -> str:
    head = f"{'image':<15} {'size':>9} {'method':<9} {'PSNR':>5} {'stock':>5} {'embed':>5} {'verify':>6} "
    head += " ".join(f"{a:>10}" for a in ATTACKS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r.accuracy[a]:>9.2f}{'+' if r.detected[a] else ' '}" for a in ATTACKS)
        stock = f"{r.stock_psnr_db:>5.1f}" if r.stock_psnr_db is not None else f"{'-':>5}"
        lines.append(
            f"{r.image:<15} {r.size:>9} {r.method:<9} {r.psnr_db:>5.1f} {stock} {r.embed_ms:>5.0f} {r.verify_ms:>6.0f} "
            + cells
        )
    lines.append(
        f"bit accuracy per attack; '+' = detected (>= {DETECTION_THRESHOLD}); PSNR dB (ours, stock imwatermark); ms"
    )
    return "\n".join(lines)


def format_summary(rows: list[Row]) -> str:
    lines = ["detected / images (lowest bit accuracy), per method and image group"]
    lines.append(f"{'method':<9} {'images':<7} {'PSNR dB':<11} " + " ".join(f"{a:>11}" for a in ATTACKS))
    for method in dict.fromkeys(r.method for r in rows):
        for label, grey in (("colour", False), ("grey", True)):
            group = [r for r in rows if r.method == method and r.grey == grey]
            if not group:
                continue
            cells = " ".join(
                f"{sum(r.detected[a] for r in group)}/{len(group)} ({min(r.accuracy[a] for r in group):.2f})".rjust(11)
                for a in ATTACKS
            )
            psnrs = f"{min(r.psnr_db for r in group):.1f}-{max(r.psnr_db for r in group):.1f}"
            lines.append(f"{method:<9} {label:<7} {psnrs:<11} {cells}")
    return "\n".join(lines)


def format_timing(rows: list[Row]) -> str:
    lines = ["median ms (embed / verify), per method and size"]
    for method in dict.fromkeys(r.method for r in rows):
        for size in dict.fromkeys(r.size for r in rows):
            group = [r for r in rows if r.method == method and r.size == size]
            if group:
                embed_ms = statistics.median(r.embed_ms for r in group)
                verify_ms = statistics.median(r.verify_ms for r in group)
                lines.append(f"{method:<9} {size:>9}  {embed_ms:6.0f} / {verify_ms:6.0f}")
    return "\n".join(lines)


def format_false_positives(found: list[FalsePositives]) -> str:
    lines = ["false positives: unmarked images detected (highest bit accuracy seen, on which image; mean; verify ms)"]
    for f in found:
        lines.append(
            f"{f.method:<9} {f.detected}/{f.images} ({f.highest_accuracy:.2f} on {f.highest_on}; "
            f"mean {f.mean_accuracy:.3f}; {f.verify_ms:.0f} ms)"
        )
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
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to measure")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="sides of the synthetic images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one synthetic image per kind and seed")
    p.add_argument("--image", nargs="*", default=[], help="real photos, measured at their own size")
    p.add_argument("--unmarked", type=int, default=210, help="unmarked images for the false-positive count")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of embed and verify per image")
    p.add_argument("--quick", action="store_true", help="512 px, seed 0, lumaTile and dwtDctSvd, 1 timed run")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout (the table goes to stderr)")
    args = p.parse_args(argv)
    if args.unmarked < 1:
        p.error(f"--unmarked must be at least 1; got {args.unmarked}")
    if args.quick:
        args.sizes, args.seeds, args.repeats = [512], [0], 1
        args.methods = [m for m in args.methods if m in ("lumaTile", "dwtDctSvd")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [
        measure(name, image, grey, method, args.repeats)
        for name, image, grey in images(args)
        for method in args.methods
    ]
    fps = [false_positives(method, args.unmarked) for method in args.methods]
    report = "\n\n".join([format_table(rows), format_summary(rows), format_timing(rows), format_false_positives(fps)])
    if args.json:
        print(report, file=sys.stderr)
        found = {"environment": environment(), "attacks": list(ATTACKS), "rows": [asdict(r) for r in rows]}
        print(json.dumps({**found, "false_positives": [asdict(f) for f in fps]}))
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
