"""Where images go: a file name or a folder, never overwriting, with provenance metadata inside."""

from pathlib import Path

from flux2.provenance import image_format, save_with_provenance

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_FOLDER = Path("output")  # the reference's output folder


def output_target(output: Path | None, fmt: str | None = None) -> tuple[Path, str | None, str]:
    """(folder, file stem or None for "name it after the seed", suffix) for -o and --format.

    Checked before any model loads, so a bad -o costs nothing.
    """
    output = DEFAULT_FOLDER if output is None else output
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not output.suffix or output.is_dir():
        return output, None, FORMATS[fmt or "png"]
    image_format(output)  # a clear error for an unknown suffix
    if fmt is not None and image_format(output) != image_format(Path("x" + FORMATS[fmt])):
        raise ValueError(f"-o {output} and --format {fmt} disagree: give one or make them match")
    return output.parent, output.stem, output.suffix


def save_image(image, record: dict, target: tuple[Path, str | None, str], sidecar: bool = False) -> Path:
    """Write the image with its record; the name is the -o stem or `flux2-SEED`, made unique with -1, -2, ..."""
    folder, stem, suffix = target
    path = free_name(folder, stem or f"flux2-{record['seed']}", suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_with_provenance(image, path, record, sidecar=sidecar)


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    candidate = folder / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{n}{suffix}"
        n += 1
    return candidate
