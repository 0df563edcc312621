"""The studio's media folder: where files go, how their web URLs map to paths, and how a client's path is
confined to the folder.

Layout under the data folder:

    projects/{pid}/generated/         job outputs ({job_id}.jpg)
    projects/{pid}/thumbnails/        quarter-size previews
    projects/{pid}/uploads/           a project's uploads
    projects/{pid}/assets/elements/   element images
    uploads/                          uploads outside any project
    loras/                            LoRA files the service offers (put there by its operator; read only)
    tmp/{job_id}/                     a job's work in progress, published into place when done

A file's web URL is its path under the data folder, with a leading slash: `/projects/{pid}/generated/x.jpg`.
The app's older `/generated/{job_id}.jpg` (and `{job_id}_thumb.jpg`) URLs still lead to a job's output.
"""

import os
import re
import shutil
import uuid
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from PIL import Image

MiB = 1024 * 1024
MEDIA_ROOTS = ("projects", "uploads")  # what clients may name; tmp/ and the database are not theirs
LORA_SUFFIX = ".safetensors"
UPLOAD_KINDS = ("general", "element", "reference")  # the `type` field of POST /upload
IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}  # PIL format: suffix
# 8192 x 8192: far above anything the model takes (references are resized to at most 2024² px) and below PIL's
# decompression-bomb limit, so a small file cannot expand into gigabytes of pixels.
MAX_UPLOAD_PIXELS = 8192 * 8192

LEGACY_GENERATED = "/generated/"  # the app's own backend once served every job output from one folder
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.[A-Za-z0-9]{1,8}")  # a bare name: no path, no glob
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # "http:", "file:", "data:", also a Windows drive "C:"
_CONFINED = "paths must stay inside the data folder (under projects/ or uploads/)"


def check_safe_id(field: str, value: str) -> str:
    """An id that becomes part of a file name (project and job ids): letters, digits, '_' and '-', at most 64."""
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value):
        rule = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
        raise ValueError(f"{field} must be {rule}, got {value!r}")
    return value


class MediaStore:
    """The media files under one data folder. Every path a client sends goes through `resolve`."""

    def __init__(self, data_dir: Path | str, max_upload_bytes: int = 25 * MiB) -> None:
        if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be a positive integer, got {max_upload_bytes!r}")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.root = Path(data_dir).resolve()
        self._given_root = Path(data_dir).absolute()  # as the user wrote it, before symlinks are followed
        self.max_upload_bytes = max_upload_bytes

    # Layout.

    def project_dir(self, project_id: str) -> Path:
        return self.root / "projects" / check_safe_id("project_id", project_id)

    def generated_dir(self, project_id: str) -> Path:
        return self.project_dir(project_id) / "generated"

    def thumbnails_dir(self, project_id: str) -> Path:
        return self.project_dir(project_id) / "thumbnails"

    def uploads_dir(self, project_id: str | None) -> Path:
        return self.root / "uploads" if project_id is None else self.project_dir(project_id) / "uploads"

    def elements_dir(self, project_id: str) -> Path:
        return self.project_dir(project_id) / "assets" / "elements"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def loras_dir(self) -> Path:
        return self.root / "loras"

    def lora_files(self) -> list[Path]:
        """The LoRA files on offer, by name."""
        folder = self.loras_dir
        return sorted(p for p in folder.glob(f"*{LORA_SUFFIX}") if p.is_file()) if folder.is_dir() else []

    def lora_file(self, name: str, field: str = "loras") -> Path:
        """A LoRA on offer, by its file name; ValueError naming `field` for anything else."""
        on_offer = {path.name: path for path in self.lora_files()}
        if name not in on_offer:
            names = ", ".join(on_offer) or f"none: put {LORA_SUFFIX} files in {self.loras_dir}"
            raise ValueError(f"{field} {name!r} is not a LoRA of this service; it has {names}")
        return on_offer[name]

    # Client paths and URLs.

    def resolve(self, client_path: str, field: str = "path") -> Path:
        """The file a client means: a web URL (`/projects/...`, `/uploads/...`), a path relative to the data
        folder, or an absolute path inside it. Anything that leads elsewhere raises ValueError naming `field`
        and the value: `..`, absolute paths outside, symbolic links out, NUL bytes, URLs with a scheme."""
        if not isinstance(client_path, str) or not client_path:
            raise ValueError(f"{field} must be a non-empty path, got {client_path!r}")

        def refuse(reason: str) -> ValueError:
            return ValueError(f"{field} {client_path!r} {reason}: {_CONFINED}")

        if "\x00" in client_path:
            raise refuse("contains a NUL byte")
        if _SCHEME.match(client_path) or client_path.startswith("//"):
            raise refuse("is a URL with a scheme or host")
        if client_path.startswith(LEGACY_GENERATED):
            if (found := self.find_generated(unquote(client_path.removeprefix(LEGACY_GENERATED)))) is None:
                raise refuse("names no job output")
            return found
        relative = self._inside(client_path)
        if relative is None:
            if not client_path.startswith(tuple(f"/{root}/" for root in MEDIA_ROOTS)):
                raise refuse("is an absolute path outside the data folder")
            parts = urlsplit(client_path)
            if parts.query or parts.fragment:
                raise refuse("has a query or fragment")
            relative = unquote(parts.path).lstrip("/")  # a web URL, percent-decoded once
            if "\x00" in relative:
                raise refuse("contains a NUL byte")
        pure = PurePosixPath(relative)
        if ".." in pure.parts:
            raise refuse("goes up with '..'")
        if not pure.parts or pure.parts[0] not in MEDIA_ROOTS:
            raise refuse("is not under projects/ or uploads/")
        resolved = (self.root / pure).resolve()
        if not resolved.is_relative_to(self.root / pure.parts[0]):
            raise refuse("leads outside the data folder (through a symbolic link)")
        return resolved

    def find_generated(self, name: str) -> Path | None:
        """The file a legacy `/generated/{name}` URL of the app's own backend means: a job output
        (`{job_id}.jpg`) or its thumbnail (`{job_id}_thumb.jpg`), in whichever project it belongs to."""
        if not _FILE_NAME.fullmatch(name):
            return None
        stem, suffix = name.rsplit(".", 1)
        folder = "thumbnails" if stem.endswith("_thumb") else "generated"
        matches = sorted((self.root / "projects").glob(f"*/{folder}/{stem.removesuffix('_thumb')}.{suffix}"))
        found = matches[0].resolve() if matches else None
        return found if found and found.is_relative_to(self.root / "projects") else None

    def url_for(self, path: Path | str) -> str:
        """The web URL of a media file (absolute, or relative to the data folder)."""
        return "/" + quote(self.relative_path(path))

    def relative_path(self, path: Path | str) -> str:
        """A media file's path relative to the data folder, as Asset.path stores it."""
        path = Path(path)
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        relative = resolved.relative_to(self.root) if resolved.is_relative_to(self.root) else None
        if relative is None or relative.parts[:1] not in [(root,) for root in MEDIA_ROOTS]:
            raise ValueError(f"path {str(path)!r} is not a media file: {_CONFINED}")
        return relative.as_posix()

    def _inside(self, client_path: str) -> str | None:
        """`client_path` relative to the data folder if it is a relative path or an absolute one inside the
        folder; None for any other absolute path (a web URL, or a path elsewhere)."""
        if not client_path.startswith("/"):
            return client_path
        for root in (self.root, self._given_root):
            if Path(client_path).is_relative_to(root):
                return Path(client_path).relative_to(root).as_posix()
        return None

    # Writing.

    def job_workspace(self, job_id: str) -> Path:
        """A job's private folder for work in progress (created), under tmp/."""
        workspace = self.tmp_dir / check_safe_id("job_id", job_id)
        workspace.mkdir(parents=True, exist_ok=True)
        return workspace

    def clear_workspace(self, job_id: str) -> None:
        shutil.rmtree(self.tmp_dir / check_safe_id("job_id", job_id), ignore_errors=True)

    def sweep_tmp(self, live_jobs: Iterable[str]) -> list[str]:
        """Remove what tmp/ holds but the workspaces of `live_jobs` (pending or processing), and return the names
        removed: uploads and jobs a stopped server left half-written. Only safe when nothing is being written,
        which is why the service runs it at start-up, before it takes requests or runs jobs."""
        if not self.tmp_dir.is_dir():
            return []
        keep = set(live_jobs)
        removed = []
        for entry in sorted(self.tmp_dir.iterdir()):
            if entry.name in keep and entry.is_dir() and not entry.is_symlink():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed

    def publish(self, tmp_file: Path | str, final_path: Path | str) -> Path:
        """Move a finished file into place, atomically, and return its final path.

        Never overwrites: if `final_path` exists already (a job that ran twice after a crash), it is returned
        unchanged and `tmp_file` is dropped, so a job never yields two different files. The new name appears
        complete or not at all (a hard link, which fails if the name exists; `os.replace` where links are not
        supported). `tmp_file` must be inside the data folder, so both are on one filesystem.
        """
        tmp = Path(tmp_file).resolve()
        final = Path(final_path) if Path(final_path).is_absolute() else self.root / final_path
        final = final.parent.resolve() / final.name
        for name, path in (("tmp_file", tmp), ("final_path", final)):
            if not path.is_relative_to(self.root):
                raise ValueError(f"{name} {str(path)!r} is outside the data folder {str(self.root)!r}")
        if tmp == final:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        _fsync(tmp)
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem
            if not final.exists():
                os.replace(tmp, final)
        tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return final

    def save_upload(self, data: bytes, filename: str, project_id: str | None, kind: str) -> Path:
        """Store an uploaded image under a generated name and return its path.

        The bytes must decode as a PNG, JPEG, WebP, GIF or BMP image of at most MAX_UPLOAD_PIXELS pixels and
        `max_upload_bytes` bytes; anything else raises ValueError. The client's file name only contributes a
        sanitised hint to the stored name, never a path.
        """
        if kind not in UPLOAD_KINDS:
            raise ValueError(f"upload type must be one of {', '.join(UPLOAD_KINDS)}, got {kind!r}")
        if not data:
            raise ValueError(f"file {filename!r} is empty")
        if len(data) > self.max_upload_bytes:
            raise ValueError(
                f"file {filename!r} is {len(data)} bytes, over the upload limit of {self.max_upload_bytes} bytes"
            )
        folder = self.elements_dir(project_id) if kind == "element" and project_id else self.uploads_dir(project_id)
        extension = _image_extension(data, filename)
        hint = _slug(filename)
        name = f"{kind}_{uuid.uuid4().hex}{'_' + hint if hint else ''}.{extension}"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"upload_{name}"
        try:
            tmp.write_bytes(data)
            return self.publish(tmp, folder / name)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, client_path: str, field: str = "path") -> bool:
        """Remove a media file a record points to; False if it was not there."""
        path = self.resolve(client_path, field)
        try:
            path.unlink()  # no is_file() first: a second DELETE racing this one would pass it, then fail here
        except (FileNotFoundError, IsADirectoryError):
            return False
        return True

    def remove_project(self, project_id: str) -> None:
        """Remove a project's whole folder (its records go with the project row)."""
        shutil.rmtree(self.project_dir(project_id), ignore_errors=True)


def _image_extension(data: bytes, filename: str) -> str:
    """The file suffix of an accepted image format, after decoding the whole image."""
    try:
        with Image.open(BytesIO(data)) as image:
            image_format, (width, height) = image.format, image.size
    except Exception as error:  # PIL raises many types on hostile input; any of them means "not an image"
        raise ValueError(f"file {filename!r} is not an image PIL can read: {error}") from None
    if image_format not in IMAGE_EXTENSIONS:
        accepted = ", ".join(IMAGE_EXTENSIONS)
        raise ValueError(f"file {filename!r} is a {image_format} image; accepted formats: {accepted}")
    if width * height > MAX_UPLOAD_PIXELS:
        raise ValueError(f"file {filename!r} is {width}x{height} px, over the limit of {MAX_UPLOAD_PIXELS} pixels")
    try:
        with Image.open(BytesIO(data)) as image:
            image.load()  # decode every pixel: a truncated or corrupt file fails here, not in a job later
    except Exception as error:
        raise ValueError(f"file {filename!r} is a damaged {image_format} image: {error}") from None
    return IMAGE_EXTENSIONS[image_format]


def _slug(filename: str) -> str:
    """A short, safe hint of the client's file name: its stem, reduced to letters, digits, '_' and '-'."""
    stem = PurePosixPath(str(filename).replace("\\", "/")).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:40]


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a new name in `path` durable (POSIX; other systems cannot open a folder, and need not)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
