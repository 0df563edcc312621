"""`flux2 info IMAGE`: what made an image (its provenance record), whether it carries the watermark, and its C2PA
Content Credentials (ours or another tool's) with their validation."""

import argparse
import json
from pathlib import Path

from flux2.cli.options import add_model_options
from flux2.provenance import read_exif_tags, read_provenance

SHOWN_FIELDS = ("software", "model", "prompt", "upsampled_prompt", "negative_prompt", "seed", "num_steps",
                "guidance", "width", "height", "references", "watermark", "safety", "note")  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="an image's provenance metadata, watermark and C2PA check",
        description="Show the record stored in an image by flux2 (or its IMAGE.json sidecar) and check the "
        "invisible watermark and the C2PA manifest (Content Credentials).",
        epilog="example: flux2 info output/flux2-7.png --json",
    )  # fmt: skip
    p.add_argument("image", type=Path, nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    rerun = p.add_argument_group("make the image again from its record")
    rerun.add_argument("--rerun", action="store_true", help="generate the image again with the recorded settings")
    rerun.add_argument("-o", "--output", type=Path, help="--rerun: image file, or a folder (default: output/)")
    rerun.add_argument("--source", type=Path, help="--rerun of an edit: its source image (checked against the record)")
    rerun.add_argument("--mask", type=Path, help="--rerun of an inpainting: its mask (checked against the record)")
    add_model_options(p, model=False)  # --rerun: where the recorded model's weights are, and how it runs here
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.rerun:
        return rerun(args)
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
        "content_credentials": _content_credentials(path),
    }


def _content_credentials(path: Path) -> dict | None:
    """The C2PA manifest and its validation (None: the file has none)."""
    from dataclasses import asdict

    from flux2.content_credentials import read_credentials

    try:
        found = read_credentials(path)
    except ImportError:
        return {"state": "not checked", "verdict": "not checked: the c2pa-python package is not installed"}
    return None if found is None else asdict(found)


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
    return "\n".join(lines + _credentials_lines(found["content_credentials"]))


def _credentials_lines(found: dict | None) -> list[str]:
    """The C2PA manifest: validation, signer, actions, model, generator, ingredients."""
    if found is None:
        return ["  C2PA manifest     none"]
    lines = [f"  C2PA manifest     {found['verdict']}"]
    if found.get("signer") or found.get("issuer"):
        issuer = f", issued by {found['issuer']}" if found.get("issuer") else ""
        lines.append(f"    signer          {found.get('signer') or '?'}{issuer} ({found.get('algorithm')})")
    for action in found.get("actions", ()):
        source = (action["digital_source_type"] or "").rsplit("/", 1)[-1]
        details = ", ".join(filter(None, [source, action["software_agent"] and f"by {action['software_agent']}"]))
        lines.append(f"    action          {action['action']}" + (f" ({details})" if details else ""))
    shown = {"model": found.get("model"), "generator": found.get("claim_generator")}
    lines += [f"    {key:15} {value}" for key, value in shown.items() if value]
    for item in found.get("ingredients", ()):
        digest = f", sha256 {item['sha256']}" if item["sha256"] else ""
        lines.append(f"    ingredient      {item['title']} ({item['relationship']}{digest})")
    return lines


# ---------------------------------------------------------------------------------------------- --rerun

# What a record names but cannot give back: only a hash (or a file name) of it is stored.
NOT_STORED = {
    "references": "the reference images (the record holds only their sha256)",
    "source": "the source image (the record holds only its sha256: give it with --source)",
    "loras": "the LoRA files (the record holds only their names and sha256)",
    "ip_adapter_scale": "the IP-Adapter images (the record holds none of them)",
}


def rerun(args: argparse.Namespace) -> int:
    """Each image made again from its record; everything is checked before any model loads."""
    from flux2.cli.generate import report
    from flux2.cli.output import output_target
    from flux2.cli.run import generate_and_save

    target = output_target(args.output)
    records = [read_record(path) for path in args.image]
    requests = [
        rerun_request(path, record, args.source, args.mask) for path, record in zip(args.image, records, strict=True)
    ]
    pipes, status = {}, 0
    for request, record in zip(requests, records, strict=True):
        key = (request.resolved_for, record.get("watermark") is not None)
        if key not in pipes:  # one load per model (and watermark) however many images
            pipes[key] = open_pipeline_for(args, *key)
        result = generate_and_save(pipes[key], target, request, sidecar=False, show_progress=not args.json)
        report(result, as_json=args.json)
        status = status or (130 if result.cancelled else 0)
    return status


def read_record(path: Path) -> dict:
    from flux2.images import open_image

    open_image(path, "image")  # a clear error for a missing or unreadable file
    record = read_provenance(path)
    if record is None:
        raise ValueError(f"--rerun {path}: no flux2 record (neither in the file nor in a sidecar)")
    return record


def rerun_request(path: Path, record: dict, source: Path | None = None, mask: Path | None = None):
    """The request a record describes, resolved for its model; a ValueError naming what the record lacks. An
    edit's source (and mask) are given by the user and must be the ones the record names."""
    from flux2.registry import model_info
    from flux2.request import GenerationRequest

    mode = record.get("mode", "generate")
    takes = {"generate": "neither --source nor --mask", "inpaint": "--source and --mask"}.get(mode, "--source")
    if source is not None and mode == "generate" or mask is not None and mode != "inpaint":
        raise ValueError(f"--rerun {path}: a {mode} record takes {takes}")
    missing = [what for key, what in NOT_STORED.items() if record.get(key) and not (key == "source" and source)]
    if mode == "inpaint" and mask is None:
        missing.append("the mask (the record holds only its sha256: give it with --mask)")
    if record.get("truncated"):
        missing.append("the prompt (the record was shortened to fit the file's Exif; its sidecar is gone)")
    if missing:
        raise ValueError(f"--rerun {path}: cannot make it again: the record lacks {'; '.join(missing)}")
    settings = {
        "prompt": record.get("upsampled_prompt") or record["prompt"],  # what the model was given
        "negative_prompt": record.get("negative_prompt"),
        "seed": record["seed"],
        "num_steps": record["num_steps"],
        "guidance": record["guidance"],
        "true_cfg_scale": record.get("true_cfg_scale"),
        "upsample": False,
    }
    try:
        settings |= _edit_settings(record, source, mask) if mode != "generate" else _size(record)
        request = GenerationRequest.from_settings("--rerun", **settings).resolve(model_info(record["model"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"--rerun {path}: the record does not describe a run ({err})") from None
    if mode != "generate":
        _check_same_inputs(path, request, record)
    return request


def _size(record: dict) -> dict:
    return {"width": record["width"], "height": record["height"]}


def _edit_settings(record: dict, source: Path, mask: Path | None) -> dict:
    """An edit's mode and settings as recorded (flux2.editing.EditSource.settings), with the files given."""
    from flux2.images import open_image
    from flux2.request import request_params

    open_image(source, "--source")  # a clear error for a missing or unreadable file
    fields = request_params()
    kept = {
        key: value
        for key, value in (record.get("edit") or {}).items()
        if key in fields and fields[key].kind not in (object, tuple)
    }
    return {"mode": record["mode"], "strength": record["strength"], "image": str(source), **kept,
            **({"mask": str(mask)} if mask is not None else {})}  # fmt: skip


def _check_same_inputs(path: Path, request, record: dict) -> None:
    """The source and mask given are the ones the record names (their sha256), prepared as they were then."""
    from flux2.editing import edit_source
    from flux2.images import image_sha256

    prepared = edit_source(request)
    found = {"source": prepared.settings.get("original") or image_sha256(prepared.image), **prepared.settings}
    found = json.loads(json.dumps(found))  # as a record stores it (lists, floats)
    wanted = {"source": record.get("source"), **(record.get("edit") or {})}
    if differ := [key for key, value in wanted.items() if found.get(key) != value]:
        hint = (
            " (work_size: the record does not keep max_pixels other than for img2img)"
            if differ == ["work_size"]
            else ""
        )
        raise ValueError(f"--rerun {path}: --source/--mask are not what the record names: {', '.join(differ)} "
                         f"differ{hint}")  # fmt: skip


def open_pipeline_for(args: argparse.Namespace, name: str, watermark: bool):
    """The pipeline for `name` as the model options say: no upsampling (the record's prompt is what the model
    was given), no screening (the image passed it once), the watermark as the record says."""
    from flux2.cli.options import open_pipeline

    fixed = argparse.Namespace(**vars(args), upsample="none", upsample_model=None, upsample_url=None, safety="off",
                               nsfw_model=None, nsfw_threshold=None, no_watermark=not watermark)  # fmt: skip
    return open_pipeline(fixed, name)[0]
