"""A stand-in Hugging Face Hub: a real HTTP server on loopback serving repos the way huggingface_hub 2.x reads them.

hf_hub_download: HEAD then GET on `/{repo_id}/resolve/{revision}/{filename}`; the HEAD must carry X-Repo-Commit,
ETag and Content-Length, and a GET with `Range: bytes=N-` (sent when a transfer broke off) gets a 206.
snapshot_download: `GET /api/models/{repo_id}/revision/{revision}` (the commit `sha`; HfApi.repo_info asks
`/api/models/{repo_id}` for the main branch), then
`GET /api/models/{repo_id}/tree/{sha}?recursive=...` (the file list), then hf_hub_download for each matching file.
Errors carry the X-Error-Code header huggingface_hub turns into its exceptions (GatedRepo, RepoNotFound, ...).
"""

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from loopback import serving

API_PATH = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(/(?P<kind>revision|tree)/(?P<revision>[^/]+))?")
RESOLVE_PATH = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)")
RANGE = re.compile(r"bytes=(?P<start>\d+)-(?P<end>\d*)")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False  # every file answers 401 GatedRepo, as for a user who has not accepted the licence

    @property
    def sha(self) -> str:
        """The commit: 40 hex digits, as huggingface_hub checks."""
        return hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    break_off: set[str] = field(default_factory=set)  # "repo_id/filename": the first GET stops partway
    endpoint: str = ""

    def downloads(self) -> list[Request]:
        """The GETs of file contents."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]


class HubHandler(BaseHTTPRequestHandler):
    server: Any
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every reply sets Content-Length

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        hub: FakeHub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        hub.requests.append(Request(self.command, path, self.headers.get("Range")))
        if match := API_PATH.fullmatch(path):
            self._api(hub.repos.get(match["repo"]), match["repo"], match["kind"])
        elif match := RESOLVE_PATH.fullmatch(path):
            self._file(hub, match["repo"], match["revision"], match["filename"], send_body)
        else:
            self._reply(404, b"not found")

    def _api(self, repo: Repo | None, repo_id: str, kind: str | None) -> None:
        if repo is None:
            return self._reply(404, b"", {"X-Error-Code": "RepoNotFound"})
        if kind != "tree":  # the repo's info, at the main branch or a revision
            siblings = [{"rfilename": name} for name in repo.files]
            return self._json({"id": repo_id, "sha": repo.sha, "gated": repo.gated, "siblings": siblings})
        tree = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in repo.files.items()
        ]
        self._json(tree)

    def _file(self, hub: FakeHub, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        repo = hub.repos.get(repo_id)
        if repo is None or revision not in ("main", repo.sha):
            return self._reply(404, b"", {"X-Error-Code": "RepoNotFound" if repo is None else "RevisionNotFound"})
        commit = {"X-Repo-Commit": repo.sha}
        if repo.gated:
            message = "Access to this model is restricted. You must have access to it and be authenticated."
            return self._reply(401, b"", {**commit, "X-Error-Code": "GatedRepo", "X-Error-Message": message})
        data = repo.files.get(filename)
        if data is None:
            return self._reply(404, b"", {**commit, "X-Error-Code": "EntryNotFound"})
        headers = {**commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        key = f"{repo_id}/{filename}"
        if send_body and key in hub.break_off:
            hub.break_off.discard(key)
            return self._break_off(data, headers)
        status, start = 200, 0
        if send_body and (wanted := RANGE.fullmatch(self.headers.get("Range") or "")):
            status, start = 206, int(wanted["start"])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._reply(status, data[start:], headers, send_body)

    def _break_off(self, data: bytes, headers: dict[str, str]) -> None:
        """Promise the whole file, send most of it, then drop the connection (a network failure mid-transfer)."""
        self.send_response(200)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data[: len(data) * 9 // 10])
        self.wfile.flush()
        self.close_connection = True

    def _json(self, body: Any) -> None:
        self._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None, send_body: bool = True) -> None:
        self.send_response(status)
        for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def running_hub(repos: dict[str, Repo]) -> Iterator[FakeHub]:
    """A real HTTP server on 127.0.0.1 (free port) serving `repos`; set HF_ENDPOINT to its `endpoint`."""
    with serving(HubHandler) as httpd:
        httpd.hub = FakeHub(repos, endpoint=httpd.url)
        yield httpd.hub
