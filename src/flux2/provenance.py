"""Provenance metadata: every saved image says what made it, and it can be read back.

PNG: a `flux2` text chunk with the full record as JSON, plus readable `Software`, `Description` chunks and the
reference's EXIF tags. JPEG / WebP: EXIF Software and Make (the reference's values) and the record as JSON in
the Exif UserComment. A JSON sidecar (`image.png.json`) survives tools that strip metadata. Every format also
carries signed C2PA Content Credentials (flux2.content_credentials).
"""

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from flux2 import __version__
from flux2.content_credentials import SigningSettings, embed_credentials

SOFTWARE = "AI generated;flux2"  # the reference's EXIF Software value
MAKE = "Black Forest Labs"  # the reference's EXIF Make value
RECORD_KEY = "flux2"

EXIF_MAKE, EXIF_SOFTWARE, EXIF_IFD = 0x010F, 0x0131, 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\0"  # Exif character-code prefix, then UTF-16 text (with a byte-order mark)

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# A JPEG Exif segment holds at most 64 KiB; a record too long for it (very long prompts) goes to the sidecar,
# and the Exif keeps it without the prompt texts, marked as truncated.
MAX_EXIF_RECORD = 60_000
LONG_FIELDS = ("prompt", "upsampled_prompt", "negative_prompt")
ESSENTIAL_FIELDS = ("software", "version", "model", "seed", "num_steps", "guidance", "width", "height")


def provenance(record: dict) -> dict:
    """The record as stored: the generation record plus who wrote it."""
    return {"software": "flux2", "version": __version__, **record}


def _user_comment(record: dict) -> bytes:
    return USER_COMMENT_UNICODE + json.dumps(record, ensure_ascii=False).encode("utf-16")


def _exif(record: dict) -> tuple[Image.Exif, bool]:
    """The Exif block, and whether the record had to be shortened to fit it."""
    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = SOFTWARE
    exif[EXIF_MAKE] = MAKE
    comment = _user_comment(record)
    truncated = len(comment) > MAX_EXIF_RECORD
    if truncated:  # without the prompt texts, and if still too long (many references), the bare essentials
        comment = _user_comment({**{k: v for k, v in record.items() if k not in LONG_FIELDS}, "truncated": True})
        if len(comment) > MAX_EXIF_RECORD:
            comment = _user_comment({k: record.get(k) for k in ESSENTIAL_FIELDS} | {"truncated": True})
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = comment
    return exif, truncated


def _png_info(record: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECORD_KEY, json.dumps(record, ensure_ascii=False))
    info.add_text("Software", f"{SOFTWARE} {record.get('version', '')}".strip())
    if record.get("prompt") is not None:
        info.add_itxt("Description", record["prompt"])
    return info


def image_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot save {path.name}: the file name must end in one of {', '.join(FORMATS)}")
    return fmt


def save_with_provenance(
    image: Image.Image,
    path: str | Path,
    record: dict,
    *,
    quality: int = 95,
    sidecar: bool = False,
    credentials: SigningSettings | None = None,
) -> Path:
    """Write image to path (format from the suffix) with the record embedded and signed C2PA Content Credentials
    (`credentials`, default: from the FLUX2_C2PA* variables; see flux2.content_credentials); optionally a JSON
    sidecar."""
    path = Path(path)
    fmt = image_format(path)
    stored = provenance(record)
    exif, truncated = _exif(stored)
    encoded = io.BytesIO()
    if fmt == "PNG":  # PNG text chunks have no size limit: the full record is always in the file
        image.save(encoded, format=fmt, pnginfo=_png_info(stored), exif=exif)
    else:
        image.convert("RGB").save(encoded, format=fmt, quality=quality, exif=exif)
        sidecar = sidecar or truncated
    path.write_bytes(embed_credentials(encoded.getvalue(), fmt, stored, path.name, credentials))
    if sidecar:
        sidecar_path(path).write_text(json.dumps(stored, indent=2, ensure_ascii=False))
    return path


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_provenance(path: str | Path) -> dict | None:
    """The stored record from the image's metadata, else from its sidecar; None if there is neither."""
    path = Path(path)
    with Image.open(path) as image:
        record = _from_png_text(image) or _from_exif(image)
    if (record is None or record.get("truncated")) and sidecar_path(path).is_file():
        record = json.loads(sidecar_path(path).read_text())
    return record


def read_exif_tags(path: str | Path) -> dict[str, str]:
    """The reference's two EXIF tags, as written by the reference CLI and by us."""
    with Image.open(path) as image:
        exif = image.getexif()
    return {"Software": exif.get(EXIF_SOFTWARE), "Make": exif.get(EXIF_MAKE)}


def _from_png_text(image: Image.Image) -> dict | None:
    text = getattr(image, "text", {}) or {}
    try:
        return json.loads(text[RECORD_KEY]) if RECORD_KEY in text else None
    except ValueError:  # a damaged chunk: fall back to the Exif copy or the sidecar
        return None


def _from_exif(image: Image.Image) -> dict | None:
    comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if not isinstance(comment, bytes) or not comment.startswith(USER_COMMENT_UNICODE):
        return None
    try:
        return json.loads(comment[len(USER_COMMENT_UNICODE) :].decode("utf-16"))
    except ValueError:
        return None
