"""`flux2 info IMAGE`: what made an image (its provenance record) and whether it carries the watermark."""

import argparse
import json
from pathlib import Path

from flux2.provenance import read_exif_tags, read_provenance

SHOWN_FIELDS = ("software", "model", "prompt", "upsampled_prompt", "negative_prompt", "seed", "num_steps",
                "guidance", "width", "height", "references", "watermark", "safety", "note")  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="an image's provenance metadata and watermark check",
        description="Show the record stored in an image by flux2 (or its IMAGE.json sidecar) and check the "
        "invisible watermark.", epilog="example: flux2 info output/flux2-7.png --json",
    )  # fmt: skip
    p.add_argument("image", type=Path, nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for path in args.image:
        found = inspect(path)
        print(json.dumps(found) if args.json else summary(found))
    return 0


def inspect(path: Path) -> dict:
    from PIL import Image

    from flux2.images import open_image

    image = open_image(path, "image")  # a clear error for a missing or unreadable file
    with Image.open(path) as opened:
        file_format = opened.format
    record = read_provenance(path)
    return {
        "path": str(path),
        "format": file_format,
        "size": list(image.size),
        "exif": read_exif_tags(path),
        "record": record,
        "watermark": _watermark(image, record),
    }


def _watermark(image, record: dict | None) -> dict:
    """Check with the method the record names, else with each known method."""
    from flux2.watermark import METHODS, MIN_PIXELS, WatermarkConfig, verify

    if image.width * image.height < MIN_PIXELS:
        return {"detected": False, "reason": f"image under {MIN_PIXELS} pixels: too small to carry the mark"}
    named = (record or {}).get("watermark")
    methods = [named] if named in METHODS else list(METHODS)
    checks = [verify(image, WatermarkConfig(method=method)) for method in methods]
    best = max(checks, key=lambda check: check.bit_accuracy)
    return {"detected": best.detected, "method": best.method, "bit_accuracy": round(best.bit_accuracy, 4)}


def summary(found: dict) -> str:
    width, height = found["size"]
    lines = [f"{found['path']}: {width}x{height} {found['format']}"]
    record = found["record"]
    if record is None:
        lines.append("  no flux2 record (neither in the file nor in a sidecar)")
    else:
        lines += [f"  {key:17} {record[key]}" for key in SHOWN_FIELDS if record.get(key) not in (None, "", [])]
    exif = {key: value for key, value in found["exif"].items() if value}
    if exif:
        lines.append("  exif              " + ", ".join(f"{key}={value}" for key, value in exif.items()))
    mark = found["watermark"]
    if "reason" in mark:
        lines.append(f"  invisible mark    not checked: {mark['reason']}")
    else:
        verdict = "present" if mark["detected"] else "not found"
        lines.append(f"  invisible mark    {verdict} ({mark['method']}, {mark['bit_accuracy']:.0%} of bits match)")
    return "\n".join(lines)
