"""Where images go: a file name or a folder, never overwriting, with provenance metadata inside."""

from dataclasses import dataclass
from pathlib import Path

from flux2.provenance import image_format, save_with_provenance

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_FOLDER = Path("output")  # the reference's output folder


@dataclass(frozen=True)
class Target:
    """The folder, the file stem (None: name each image after its seed) and the suffix."""

    folder: Path
    stem: str | None
    suffix: str


def output_target(output: Path | None, fmt: str | None = None) -> Target:
    """What -o and --format ask for, checked before any model loads, so a bad -o costs nothing."""
    output = DEFAULT_FOLDER if output is None else output
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if output.is_dir() or (not output.suffix and not output.exists()):
        return Target(output, None, FORMATS[fmt or "png"])
    if not output.suffix:
        raise ValueError(f"-o {output} is an existing file: give a folder or an image file name")
    image_format(output)  # a clear error for an unknown suffix
    if fmt is not None and image_format(output) != image_format(Path("x" + FORMATS[fmt])):
        raise ValueError(f"-o {output} and --format {fmt} disagree: give one or make them match")
    return Target(output.parent, output.stem, output.suffix)


def save_image(image, record: dict, target: Target, sidecar: bool = False) -> Path:
    """Write the image with its record; the name is the -o stem or `flux2-SEED`, made unique with -1, -2, ..."""
    target.folder.mkdir(parents=True, exist_ok=True)
    path = claim_name(target.folder, target.stem or f"flux2-{record['seed']}", target.suffix)
    try:
        return save_with_provenance(image, path, record, sidecar=sidecar)
    except BaseException:
        path.unlink(missing_ok=True)  # no empty file left behind under the claimed name
        raise


def claim_name(folder: Path, stem: str, suffix: str) -> Path:
    """The first free name of stem, stem-1, stem-2, ..., created empty at once, so that two runs writing to
    the same folder never take the same name."""
    n = 0
    while True:
        candidate = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            candidate.open("xb").close()
            return candidate
        except FileExistsError:
            n += 1
