"""Where images go: a file name or a folder, checked before any model loads, never overwriting, with provenance
metadata inside; an image that cannot be saved where asked is saved elsewhere rather than lost."""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flux2.provenance import image_format, save_with_provenance

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_FOLDER = Path("output")  # the reference's output folder
RESCUE_SUFFIX = ".png"  # PIL always writes PNG, and its text chunk holds the whole record


@dataclass(frozen=True)
class Target:
    """The folder, the file stem (None: name each image after its seed) and the suffix."""

    folder: Path
    stem: str | None
    suffix: str


@dataclass(frozen=True)
class Saved:
    """Where one image went; `problem` says why it is not where it was asked to go (empty when it is)."""

    path: Path
    problem: str = ""


def output_target(output: Path | None, fmt: str | None = None, flag: str = "-o") -> Target:
    """What -o and --format ask for, checked before any model loads, so a bad -o costs nothing: the folder exists
    or can be made, and a file can be written in it. Nothing is created here."""
    output = DEFAULT_FOLDER if output is None else output
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if output.is_dir() or (not output.suffix and not output.exists()):
        target = Target(output, None, FORMATS[fmt or "png"])
    else:
        target = _file_target(output, fmt)
    check_writable(target.folder, f"{flag} {output}")
    return target


def _file_target(output: Path, fmt: str | None) -> Target:
    if not output.suffix:
        raise ValueError(f"-o {output} is an existing file: give a folder or an image file name")
    image_format(output)  # a clear error for an unknown suffix
    if fmt is not None and image_format(output) != image_format(Path("x" + FORMATS[fmt])):
        raise ValueError(f"-o {output} and --format {fmt} disagree: give one or make them match")
    if output.exists() and not output.is_file():
        raise ValueError(f"-o {output} exists and is not a file: give another name")
    return Target(output.parent, output.stem, output.suffix)


def check_writable(folder: Path, what: str) -> None:
    """The folder exists, or its nearest existing parent is a folder, and a file can be created there (tried,
    then removed: permissions alone do not tell, e.g. for root or in /proc). `what` names the option and value."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder: choose another output path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".flux2-write-test-", dir=existing)
    except OSError as err:
        raise ValueError(
            f"{what}: cannot create files in {existing} ({err.strerror or err}): choose a folder you can write to"
        ) from None
    os.close(handle)
    os.unlink(probe)


def save_image(image, record: dict, target: Target, sidecar: bool = False) -> Path:
    """Write the image with its record; the name is the -o stem or `flux2-SEED`, made unique with -1, -2, ..."""
    target.folder.mkdir(parents=True, exist_ok=True)
    path = claim_name(target.folder, target.stem or f"flux2-{record['seed']}", target.suffix)
    try:
        return save_with_provenance(image, path, record, sidecar=sidecar)
    except BaseException:
        path.unlink(missing_ok=True)  # no empty file left behind under the claimed name
        raise


def save_or_rescue(image, record: dict, target: Target, sidecar: bool = False) -> Saved:
    """`save_image`; when that fails (the disk filled up, the folder went away), the image is saved as
    `flux2-SEED.png` in the current folder, else in the system's temporary folder, and `problem` says why."""
    try:
        return Saved(save_image(image, record, target, sidecar))
    except Exception as err:
        problem = f"could not save in {target.folder} ({_reason(err)})"
    for folder in rescue_folders(target.folder):
        try:
            return Saved(save_image(image, record, Target(folder, None, RESCUE_SUFFIX), sidecar), problem)
        except Exception:
            continue
    raise OSError(f"{problem}, nor in {' or '.join(map(str, rescue_folders(target.folder)))}: the image is lost")


def rescue_folders(failed: Path) -> list[Path]:
    """Where an image goes when its folder fails: the current folder, then the temporary folder."""
    candidates = [Path.cwd(), Path(tempfile.gettempdir())]
    return [folder for folder in candidates if folder.resolve() != failed.resolve()]


def _reason(err: Exception) -> str:
    return f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.strerror else str(err) or repr(err)


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
