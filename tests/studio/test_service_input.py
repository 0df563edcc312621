"""What clients send to the studio service, over real HTTP on 127.0.0.1: inpainting with masks from a stand-in
segmentation (SAM) server, with that server up and down; and bad input (path traversal, oversized and non-image
uploads, malformed points, unknown ids, invalid sizes), which must answer 4xx naming the field and store nothing."""

import http.client
import io
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from sam_server import running_segmenter
from studio_server import (
    create_project,
    image_bytes,
    mask_bytes,
    running_studio,
    studio_settings,
    upload,
    wait_terminal,
)

MAX_UPLOAD = 50_000


@pytest.fixture(scope="module")
def service(tmp_path_factory, sam, one_thread):
    data = tmp_path_factory.mktemp("studio-input")
    settings = studio_settings(data, segmentation_url=sam.url, segmentation_timeout_s=10, max_upload_bytes=MAX_UPLOAD)
    with running_studio(settings) as running:
        yield running


@pytest.fixture(scope="module")
def source(service) -> dict:
    """A project with an uploaded 64x64 picture and a mask."""
    project = create_project(service.client, "Inputs")
    picture = upload(service.client, image_bytes(64, 64, "gray"), project)
    mask = upload(service.client, mask_bytes(), project)
    return {"project": project, "image": picture["url"], "mask": mask["url"]}


def fetch_image(client, url: str) -> Image.Image:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def stored_files(service) -> set[str]:
    root = Path(service.settings.data_dir)
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.parent != root}


def asset_count(service) -> int:
    from sqlmodel import Session, func, select

    from flux2.studio.records import Asset

    with Session(service.studio.engine) as session:
        return session.exec(select(func.count()).select_from(Asset)).one()


class Unchanged:
    """Nothing stored inside the block: no job, no asset row, no file in the data folder."""

    def __init__(self, service, sam=None):
        self.service, self.sam = service, sam

    def __enter__(self):
        self.before = (self.service.job_count(), asset_count(self.service), stored_files(self.service))
        self.sam_requests = len(self.sam.requests) if self.sam else 0
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            after = (self.service.job_count(), asset_count(self.service), stored_files(self.service))
            assert after[:2] == self.before[:2], f"jobs and assets before {self.before[:2]}, after {after[:2]}"
            assert after[2] == self.before[2], f"new files: {after[2] - self.before[2]}"
            if self.sam:
                assert len(self.sam.requests) == self.sam_requests, self.sam.requests[self.sam_requests :]


def detail_names(response, field: str) -> bool:
    """Whether a 4xx answer names `field`: in our own messages, or in FastAPI's validation error locations."""
    detail = response.json()["detail"]
    if isinstance(detail, list):
        return any(field in [str(part) for part in error["loc"]] for error in detail)
    return field in detail


# ---------------------------------------------------------------------------------------------- segmentation


def test_inpaint_with_masks_from_points_and_text_by_the_segmentation_service(service, sam, source):
    client = service.client
    health = client.get("/sam/health").json()
    assert health["online"] is True and isinstance(health["latency_ms"], float) and health["status"] == "ok"

    sam.requests.clear()
    by_points = client.post("/edit/inpaint", json={"image_path": source["image"], "points": [[16, 40]],
                                                   "prompt": "a red balloon"})  # fmt: skip
    assert by_points.status_code == 200, by_points.text
    queued = by_points.json()
    assert queued["status"] == "queued" and queued["mask_path"].startswith(f"/projects/{source['project']}/")
    [(path, fields)] = sam.requests
    assert path == "/predict/mask" and json.loads(fields["points"]) == [[16, 40]]
    assert json.loads(fields["labels"]) == [1]
    mask = fetch_image(client, queued["mask_path"]).convert("L")
    assert mask.getpixel((16, 40)) == 255 and mask.getpixel((60, 5)) == 0

    by_text = client.post("/edit/inpaint", json={"image_path": source["image"], "text_mask": "the left half",
                                                 "prompt": "a wall"}).json()  # fmt: skip
    path, fields = sam.requests[-1]
    assert path == "/segment/text" and fields["text"] == "the left half"
    assert fetch_image(client, by_text["mask_path"]).convert("L").getpixel((5, 5)) == 255

    for queued_job, mask_url in ((queued, queued["mask_path"]), (by_text, by_text["mask_path"])):
        status = wait_terminal(client, queued_job["job_id"], timeout=60)
        assert status["status"] == "completed" and status["type"] == "inpaint", status
        images = client.get(f"/projects/{source['project']}/images").json()
        [asset] = [a for a in images if a["id"] == status["asset_id"]]
        assert asset["meta"]["source"] == "inpaint" and asset["meta"]["mask"] == mask_url
        assert asset["meta"]["original_image"] == source["image"]
        assert fetch_image(client, asset["url"]).size == (64, 64)

    detected = client.post("/edit/detect", json={"image_path": source["image"], "text": "cat", "confidence": 0.3})
    assert detected.status_code == 200, detected.text
    assert detected.json()["count"] == 1 and detected.json()["objects"][0]["label"] == "cat"
    assert sam.requests[-1][0] == "/detect" and float(sam.requests[-1][1]["confidence"]) == 0.3

    segmented = client.post("/edit/segment", json={"image_path": source["image"], "points": [[40, 20], [8, 8]],
                                                   "labels": [1, 0]})  # fmt: skip
    assert segmented.status_code == 200, segmented.text
    path, fields = sam.requests[-1]
    assert path == "/predict/mask" and json.loads(fields["points"]) == [[40, 20], [8, 8]]
    assert json.loads(fields["labels"]) == [1, 0]
    assert fetch_image(client, segmented.json()["mask_path"]).convert("L").getpixel((40, 20)) == 255

    by_words = client.post("/edit/segment-text", json={"image_path": source["image"], "text": "sky"})
    assert by_words.status_code == 200, by_words.text
    assert sam.requests[-1][0] == "/segment/text"
    assert fetch_image(client, by_words.json()["mask_path"]).convert("L").getpixel((60, 5)) == 0

    with Unchanged(service, sam):
        mismatched = client.post("/edit/segment", json={"image_path": source["image"], "points": [[1, 2]],
                                                        "labels": [1, 0]})  # fmt: skip
        assert mismatched.status_code == 422 and detail_names(mismatched, "labels"), mismatched.text
        no_mask = client.post("/edit/inpaint", json={"image_path": source["image"], "prompt": "nothing to mask"})
        assert no_mask.status_code == 422 and "mask" in no_mask.json()["detail"], no_mask.text


def test_segmentation_service_down_answers_503_and_queues_nothing(tmp_path, one_thread):
    with running_segmenter() as gone:
        dead_url = gone.url  # nothing listens there once the block ends
    settings = studio_settings(tmp_path, segmentation_url=dead_url, segmentation_timeout_s=2)
    with running_studio(settings) as service:
        client = service.client
        health = client.get("/sam/health")
        assert health.status_code == 200
        assert health.json()["online"] is False and health.json()["latency_ms"] is None
        assert health.json()["status"].startswith("unreachable")
        project = create_project(client, "Offline")
        picture = upload(client, image_bytes(), project)["url"]
        with Unchanged(service):
            for body, route in (({"points": [[10, 10]], "prompt": "x"}, "/edit/inpaint"),
                                ({"text_mask": "the sky", "prompt": "x"}, "/edit/inpaint"),
                                ({"points": [[10, 10]]}, "/edit/segment"), ({"text": "sky"}, "/edit/segment-text"),
                                ({"text": "cat"}, "/edit/detect")):  # fmt: skip
                response = client.post(route, json={"image_path": picture, **body})
                assert response.status_code == 503, (route, response.text)
                assert "segmentation service" in response.json()["detail"], response.text
                assert "not reachable" in response.json()["detail"], response.text
        assert client.get(f"/projects/{project}/active_jobs").json() == []


# ---------------------------------------------------------------------------------------------- bad input


def raw_get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET with the path exactly as given: httpx would remove the dot segments before sending."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", raw_path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def traversals(data_dir: Path) -> list[str]:
    return [
        "../../etc/passwd",
        "/etc/passwd",
        "/projects/../../x",
        "/projects/../studio.db",
        "/uploads/%2e%2e/studio.db",
        "/uploads/%2E%2E%2Fstudio.db",
        "projects/../../etc/passwd",
        f"{data_dir}/studio.db",
        f"{data_dir}/../outside.png",
        "studio.db",
        "file:///etc/passwd",
        "http://127.0.0.1:1/x.png",
        "//evil.example/x.png",
        "C:\\Windows\\win.ini",
        "/uploads/x.png\x00.jpg",
    ]


def test_path_traversal_in_every_path_field_is_refused_naming_the_field(service, source):
    client, data_dir = service.client, Path(service.settings.data_dir)
    (data_dir.parent / "outside.png").write_bytes(image_bytes())  # a real image just outside the data folder
    project = source["project"]
    element = client.post(f"/projects/{project}/elements", json={"name": "Guard", "trigger_word": "@Guard"}).json()
    with Unchanged(service):
        for bad in traversals(data_dir):
            cases = [
                ("/edit/inpaint", {"image_path": bad, "mask_path": source["mask"], "prompt": "x"}, "image_path"),
                ("/edit/inpaint", {"image_path": source["image"], "mask_path": bad, "prompt": "x"}, "mask_path"),
                ("/edit/segment", {"image_path": bad, "points": [[1, 1]]}, "image_path"),
                ("/edit/segment-text", {"image_path": bad, "text": "x"}, "image_path"),
                ("/edit/detect", {"image_path": bad, "text": "x"}, "image_path"),
                (f"/projects/{project}/elements", {"name": "E", "trigger_word": "@E", "image_path": bad}, "image_path"),
            ]
            for route, body, field in cases:
                response = client.post(route, json=body)
                assert 400 <= response.status_code < 500, (route, bad, response.status_code, response.text)
                assert detail_names(response, field), (route, bad, response.text)
            patched = client.patch(f"/elements/{element['id']}", json={"image_path": bad})
            assert 400 <= patched.status_code < 500 and detail_names(patched, "image_path"), (bad, patched.text)
        assert client.get(f"/projects/{project}/elements").json()[0]["image_path"] is None


def test_path_traversal_in_reference_images_is_refused_when_the_job_is_requested(service, source):
    client = service.client
    with Unchanged(service):
        for bad in traversals(Path(service.settings.data_dir)):
            body = {"project_id": source["project"], "prompt": "x", "width": 64, "height": 64,
                    "reference_images": [bad]}  # fmt: skip
            response = client.post("/generate/image", json=body)
            assert 400 <= response.status_code < 500, (bad, response.status_code, response.text)
            assert detail_names(response, "reference_images"), (bad, response.text)


def test_media_urls_cannot_leave_the_data_folder(service, source):
    secret = Path(service.settings.data_dir) / "studio.db"
    assert secret.is_file()
    for raw in ("/projects/../../etc/passwd", "/projects/%2e%2e/%2e%2e/etc/passwd", "/projects/..%2f..%2fstudio.db",
                "/uploads/%2e%2e/studio.db", "/uploads/..%2Fstudio.db", "/projects/%252e%252e/%252e%252e/studio.db",
                "/uploads/../tmp", "/projects/x/../../studio.db"):  # fmt: skip
        status, body = raw_get(service.url, raw)
        assert 400 <= status < 500, (raw, status, body[:200])
        assert b"SQLite format" not in body and b"root:" not in body and b"Traceback" not in body, raw
    image = service.client.get(source["image"])
    assert image.status_code == 200 and image.content == image_bytes(64, 64, "gray")


def test_oversized_non_image_and_misnamed_uploads(service, source):
    client, project, data_dir = service.client, source["project"], Path(service.settings.data_dir)
    noise = Image.frombytes("RGB", (160, 160), os.urandom(160 * 160 * 3))
    big = io.BytesIO()
    noise.save(big, format="PNG")
    assert len(big.getvalue()) > MAX_UPLOAD
    truncated = image_bytes(64, 64, "white", "JPEG")[:-200]
    with Unchanged(service):
        response = client.post("/upload", files={"file": ("big.png", big.getvalue())}, data={"project_id": project})
        assert response.status_code == 413 and str(MAX_UPLOAD) in response.json()["detail"], response.text
        for name, data in (("notes.txt", b"hello, not an image"), ("image.png", b"<svg xmlns='x'></svg>"),
                           ("cut.jpg", truncated), ("empty.png", b"")):  # fmt: skip
            response = client.post("/upload", files={"file": (name, data)}, data={"project_id": project})
            assert response.status_code == 422, (name, response.text)
            assert name in response.json()["detail"], response.text
        response = client.post("/upload", files={"file": ("x.png", image_bytes())}, data={"type": "executable"})
        assert response.status_code == 422 and "type" in response.json()["detail"], response.text
        response = client.post("/upload", files={"file": ("x.png", image_bytes())}, data={"project_id": "../../x"})
        assert response.status_code == 404 and "project_id" in response.json()["detail"], response.text
    # A hostile file name only hints at the stored name: the file lands in the project's uploads.
    stored = upload(client, image_bytes(), project, filename="../../../escape.png")
    assert stored["url"].startswith(f"/projects/{project}/uploads/") and ".." not in stored["url"]
    assert not (data_dir.parent / "escape.png").exists() and not (data_dir / "escape.png").exists()


MALFORMED_POINTS = [[[1]], "[[1,2]]", "__import__('os')", [], [[1, 2, 3]], [["a", "b"]], 5, [[1, 2], None]]


def test_malformed_points_are_422_naming_points_and_never_reach_the_segmenter(service, sam, source):
    client = service.client
    with Unchanged(service, sam):
        for points in MALFORMED_POINTS:
            inpaint = client.post("/edit/inpaint", json={"image_path": source["image"], "points": points,
                                                         "prompt": "x"})  # fmt: skip
            assert inpaint.status_code == 422 and detail_names(inpaint, "points"), (points, inpaint.text)
            segment = client.post("/edit/segment", json={"image_path": source["image"], "points": points})
            assert segment.status_code == 422 and detail_names(segment, "points"), (points, segment.text)


def test_a_bad_client_job_id_is_refused_before_anything_is_stored(service, sam, source):
    client = service.client
    with Unchanged(service, sam):
        for job_id in ("../../x", "job id", "", "x" * 65):
            for mask in ({"mask_path": source["mask"]}, {"points": [[5, 5]]}, {"text_mask": "sky"}):
                response = client.post("/edit/inpaint", params={"job_id": job_id},
                                       json={"image_path": source["image"], "prompt": "x", **mask})  # fmt: skip
                assert 400 <= response.status_code < 500, (job_id, mask, response.text)
                assert detail_names(response, "job_id"), (job_id, mask, response.text)


def test_unknown_ids_are_404_naming_the_id(service, source):
    client, nope = service.client, "f" * 32
    requests = [
        ("GET", f"/status/job_{nope[:12]}", None), ("POST", f"/jobs/job_{nope[:12]}/cancel", None),
        ("GET", f"/projects/{nope}", None), ("PATCH", f"/projects/{nope}", {"name": "x"}),
        ("DELETE", f"/projects/{nope}", None),
        ("POST", f"/projects/{nope}/elements", {"name": "x", "trigger_word": "@x"}),
        ("PATCH", f"/elements/{nope}", {"name": "x"}), ("PUT", f"/elements/{nope}", {"name": "x"}),
        ("DELETE", f"/elements/{nope}", None),
        ("POST", f"/elements/{nope}/visualize", {}), ("DELETE", f"/assets/{nope}", None),
        ("POST", "/generate/image", {"project_id": nope, "prompt": "x", "width": 64, "height": 64}),
        ("POST", "/generate/advanced", {"project_id": nope, "shot_config": {"prompt": "x", "num_frames": 1}}),
    ]  # fmt: skip
    with Unchanged(service):
        for method, path, body in requests:
            response = client.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
            assert nope[:12] in response.json()["detail"], (method, path, response.text)
        for listing in (f"/projects/{nope}/elements", f"/projects/{nope}/images"):  # lists: [], as the front end needs
            assert client.get(listing).json() == [], listing
        for url in (f"/projects/{source['project']}/generated/{nope}.jpg", f"/uploads/{nope}.png"):
            response = client.get(url)
            assert response.status_code == 404 and "no such file" in response.json()["detail"], response.text
        missing = client.post("/edit/inpaint", json={"image_path": f"/uploads/{nope}.png", "mask_path": source["mask"],
                                                     "prompt": "x"})  # fmt: skip
        assert missing.status_code == 404 and detail_names(missing, "image_path"), missing.text


INVALID = [
    ("width", 100), ("width", 10000), ("width", 0), ("height", 8), ("height", "tall"), ("num_inference_steps", -1),
    ("num_inference_steps", 0), ("num_inference_steps", 10_000), ("guidance_scale", -1), ("seed", -5),
    ("prompt", ""), ("reference_images", "not a list"),
]  # fmt: skip


def test_invalid_sizes_and_values_are_422_naming_the_field(service, source):
    client = service.client
    valid = {"project_id": source["project"], "prompt": "x", "width": 64, "height": 64}
    with Unchanged(service):
        for field, value in INVALID:
            response = client.post("/generate/image", json={**valid, field: value})
            assert response.status_code == 422, (field, value, response.text)
            assert detail_names(response, field), (field, value, response.text)
        for field, value in (("strength", 0), ("strength", 2), ("mask_blur", -1), ("prompt", "")):
            response = client.post("/edit/inpaint", json={"image_path": source["image"], "mask_path": source["mask"],
                                                          "prompt": "x", field: value})  # fmt: skip
            assert response.status_code == 422 and detail_names(response, field), (field, value, response.text)
        response = client.post("/generate/image", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        response = client.post("/projects", json={"name": ""})
        assert response.status_code == 422 and detail_names(response, "name"), response.text
