"""What the task code and the routes use of the media storage, as an interface: `MediaStore` (a folder every
process mounts: the shared data folder of a multi-machine deployment) implements it, and an object store could.

Tasks read inputs and write outputs as local files (PIL and the pipeline take paths), so the interface speaks
in paths: an object-store implementation keeps a local cache, where `resolve` downloads an object on first use,
`job_workspace` is local scratch space and `publish` uploads the finished file under its final key (never
replacing an existing one, so a job run twice keeps one output) and returns its local copy. URLs stay the
studio's own (`/projects/...`): `url_for` maps a key to one, and the media route serves (or redirects to) it.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class MediaBackend(Protocol):
    max_upload_bytes: int

    # Where a project's files go (keys under the data folder).
    def generated_dir(self, project_id: str) -> Path: ...

    def thumbnails_dir(self, project_id: str) -> Path: ...

    # Client paths and URLs: confined to the media, never elsewhere.
    def resolve(self, client_path: str, field: str = "path") -> Path: ...

    def find_generated(self, name: str) -> Path | None: ...

    def url_for(self, path: Path | str) -> str: ...

    def relative_path(self, path: Path | str) -> str: ...

    # A job's work in progress, and publishing its results.
    def job_workspace(self, job_id: str) -> Path: ...

    def clear_workspace(self, job_id: str) -> None: ...

    def sweep_tmp(self, live_jobs: Iterable[str]) -> list[str]: ...

    def publish(self, tmp_file: Path | str, final_path: Path | str) -> Path: ...

    # Uploads, deletions, LoRA files on offer.
    def save_upload(self, data: bytes, filename: str, project_id: str | None, kind: str) -> Path: ...

    def delete(self, client_path: str, field: str = "path") -> bool: ...

    def remove_project(self, project_id: str) -> None: ...

    def lora_files(self) -> list[Path]: ...

    def lora_file(self, name: str, field: str = "loras") -> Path: ...
