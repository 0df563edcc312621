"""The calls of the studio's React front end around jobs and masks, as it makes them (issue 11; spec
milimo-frontend-contract.md), over real HTTP on 127.0.0.1 with a stand-in segmentation server: multipart
/edit/segment and /edit/detect, the inpaint `complete` event, /status after a page reload, masks checked when
the job is asked for, and Idempotency-Key on every job submission. Each test asserts what the front end reads."""

import base64
import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image
from studio_server import (
    create_project,
    image_bytes,
    mask_bytes,
    running_studio,
    studio_settings,
    upload,
    wait_status,
    wait_terminal,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory, sam, one_thread):
    data = tmp_path_factory.mktemp("studio-frontend-jobs")
    with running_studio(studio_settings(data, segmentation_url=sam.url, segmentation_timeout_s=10)) as running:
        yield running


@pytest.fixture(scope="module")
def source(service) -> dict:
    """A project with an uploaded 64x64 frame and a black-and-white mask, as the front end uploads them."""
    project = create_project(service.client, "Front end")
    frame = upload(service.client, image_bytes(64, 64, "gray", "JPEG"), project, filename="edit_frame.jpg")
    mask = upload(service.client, mask_bytes(), project, filename="edit_mask.png")
    return {"project": project, "image": frame["access_path"], "mask": mask["access_path"]}


def stored_files(service) -> set[Path]:
    return {path for path in Path(service.settings.data_dir).rglob("*") if path.is_file()}


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


FRAME = ("frame.jpg", image_bytes(64, 64, "gray", "JPEG"), "image/jpeg")


# ---------------------------------------------------------------------------------------------- masks


def test_multipart_segment_answers_the_mask_as_a_png_body(service, sam):
    before = stored_files(service)
    sam.requests.clear()
    answer = service.client.post("/edit/segment", files={"image": FRAME},
                                 data={"points": "[[40, 20], [8, 8]]", "labels": "[1, 0]"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(answer.content))
    assert mask.size == (64, 64) and mask.convert("L").getpixel((40, 20)) == 255
    [(path, fields)] = sam.requests
    assert path == "/predict/mask" and json.loads(fields["points"]) == [[40, 20], [8, 8]]
    assert json.loads(fields["labels"]) == [1, 0]
    assert stored_files(service) == before  # the canvas keeps the mask: nothing is stored

    no_labels = service.client.post("/edit/segment", files={"image": FRAME}, data={"points": "[[10, 10]]"})
    assert no_labels.status_code == 200 and json.loads(sam.requests[-1][1]["labels"]) == [1]


def test_json_segment_still_answers_the_stored_mask(service, source):
    answer = service.client.post("/edit/segment", json={"image_path": source["image"], "points": [[40, 20]]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["mask_path"].startswith(f"/projects/{source['project']}/")


def test_multipart_detect_answers_the_objects_as_the_overlay_reads_them(service, sam):
    answer = service.client.post("/edit/detect", files={"image": FRAME}, data={"text": "cat", "confidence": "0.3"})
    assert answer.status_code == 200, answer.text
    [found] = answer.json()["objects"]
    assert {"id", "mask", "bbox", "score", "label"} <= found.keys()
    assert found["label"] == "cat" and found["score"] == 0.9 and found["bbox"] == [0, 0, 32, 64]
    assert Image.open(io.BytesIO(base64.b64decode(found["mask"]))).size == (64, 64)  # drawn as data:image/png
    path, fields = sam.requests[-1]
    assert path == "/detect" and fields["text"] == "cat" and float(fields["confidence"]) == 0.3


def test_json_detect_still_works(service, source):
    answer = service.client.post("/edit/detect", json={"image_path": source["image"], "text": "cat"})
    assert answer.status_code == 200 and answer.json()["objects"][0]["label"] == "cat", answer.text


@pytest.mark.parametrize(
    ("route", "files", "data", "field"),
    [
        ("/edit/segment", {}, {"points": "[[1, 2]]"}, "image"),
        ("/edit/segment", {"other": FRAME}, {"points": "[[1, 2]]"}, "image"),
        ("/edit/segment", {"image": FRAME}, {"points": "[[1, 2"}, "points"),
        ("/edit/segment", {"image": FRAME}, {"points": "print('hi')"}, "points"),
        ("/edit/segment", {"image": FRAME}, {}, "points"),
        ("/edit/segment", {"image": FRAME}, {"points": "[[1, 2, 3]]"}, "points"),
        ("/edit/segment", {"image": FRAME}, {"points": "[[1, 2], [3, 4]]", "labels": "[1]"}, "labels"),
        ("/edit/segment", {"image": FRAME}, {"points": "[[1, 2]]", "labels": "one"}, "labels"),
        ("/edit/segment", {"image": ("frame.jpg", b"not a picture", "image/jpeg")}, {"points": "[[1, 2]]"}, "image"),
        ("/edit/segment", {"image": ("frame.jpg", b"\xff\xfe\x00\x81", "image/jpeg")}, {"points": "[[1, 2]]"},
         "image"),
        ("/edit/segment", {"image": FRAME, "points": ("p.json", b"[[1, 2]]", "application/json")}, {}, "points"),
        ("/edit/detect", {}, {"text": "cat"}, "image"),
        ("/edit/detect", {"image": FRAME}, {}, "text"),
        ("/edit/detect", {"image": FRAME}, {"text": "cat", "confidence": "very"}, "confidence"),
        ("/edit/detect", {"image": FRAME}, {"text": "cat", "confidence": "2"}, "confidence"),
        ("/edit/detect", {"image": ("frame.jpg", b"GIF89a-broken", "image/gif")}, {"text": "cat"}, "image"),
    ],
)  # fmt: skip
def test_bad_multipart_is_4xx_naming_the_field_and_never_reaches_the_segmenter(service, sam, route, files, data,
                                                                               field):  # fmt: skip
    before, asked = stored_files(service), len(sam.requests)
    if not files:  # a form without a file: httpx would send it urlencoded
        files = {"filler": ("empty.txt", b"", "text/plain")}
    answer = service.client.post(route, files=files, data=data)
    assert 400 <= answer.status_code < 500, answer.text
    detail = answer.json()["detail"]
    named = field in detail if isinstance(detail, str) else any(field in map(str, e["loc"]) for e in detail)
    assert named, (field, detail)
    assert len(sam.requests) == asked and stored_files(service) == before


def test_form_fields_that_are_not_utf8_are_a_4xx_not_a_decode_error(service, sam):
    asked = len(sam.requests)
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"points\"\r\n\r\n".encode() + b"\xff\xfe[[1, 2]]"
            + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"frame.jpg\"\r\n"
              f"Content-Type: image/jpeg\r\n\r\n".encode() + FRAME[1] + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
    answer = service.client.post("/edit/segment", content=body,
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert 400 <= answer.status_code < 500, answer.text
    assert len(sam.requests) == asked


# ---------------------------------------------------------------------------------------------- inpaint


def test_inpaint_complete_event_gives_the_image_as_thumbnail_and_no_url(service, source):
    with service.events() as events:
        queued = service.client.post("/edit/inpaint", params={"job_id": "job_1a2b3c4d"},
                                     json={"image_path": source["image"], "mask_path": source["mask"],
                                           "prompt": "a hat"})  # fmt: skip
        assert queued.status_code == 200, queued.text
        name, complete = events.wait_end("job_1a2b3c4d", timeout=120)
    assert name == "complete", complete
    assert complete["type"] == "inpaint" and "url" not in complete  # a url would become the shot's video
    asset = next(a for a in service.client.get(f"/projects/{source['project']}/images").json()
                 if a["id"] == complete["asset_id"])  # fmt: skip
    assert complete["thumbnail_url"] == asset["url"]  # the full inpainted image, not its quarter-size thumbnail
    assert not complete.get("actual_frames")  # the shot keeps its frame count
    status = service.client.get("/status/job_1a2b3c4d").json()
    assert "url" not in status and status["thumbnail_url"] == asset["url"] and status["video_url"] == asset["url"]


def test_image_complete_event_and_status_after_a_reload(service, source):
    body = {"project_id": source["project"], "shot_config": {"prompt": "a lighthouse", "width": 64, "height": 64,
            "num_frames": 1, "num_inference_steps": 2, "cfg_scale": 3.0}}  # fmt: skip
    with service.events() as events:
        queued = service.client.post("/generate/advanced", json=body)
        assert queued.status_code == 200, queued.text
        job_id = queued.json()["job_id"]
        name, complete = events.wait_end(job_id, timeout=120)
        progress = [data for n, data in events.of(job_id) if n == "progress"]
    assert name == "complete", complete
    assert complete["url"] and complete["thumbnail_url"] != complete["url"] and complete["actual_frames"] == 1
    assert all("eta_seconds" in data for data in progress)
    status = service.client.get(f"/status/{job_id}").json()  # what utils/jobPoller.ts reads
    assert status["status"] == "completed" and status["video_url"] == complete["url"]
    assert status["thumbnail_url"] == complete["thumbnail_url"] and status["actual_frames"] == 1
    assert "enhanced_prompt" in status and status["eta_seconds"] is None
    assert {"status", "progress", "status_message", "asset_id", "error_message"} <= status.keys()


def test_status_of_a_running_job_gives_a_numeric_eta(service, source):
    body = {"project_id": source["project"], "prompt": "slow", "width": 256, "height": 256, "num_inference_steps": 200}
    job_id = service.client.post("/generate/image", json=body).json()["job_id"]
    try:
        estimated = wait_status(service.client, job_id, lambda s: s["status"] not in ("pending", "processing")
                                or s["eta_seconds"] is not None, timeout=120)  # fmt: skip
        assert estimated["status"] == "processing" and estimated["eta_seconds"] >= 0, estimated
    finally:
        service.client.post(f"/jobs/{job_id}/cancel")
        wait_terminal(service.client, job_id, timeout=60)


def test_a_mask_of_another_shape_or_in_colour_is_refused_before_anything_is_stored(service, source):
    narrow = upload(service.client, png_of(Image.new("L", (32, 64), 255)), source["project"])["access_path"]
    colour = Image.new("RGB", (64, 64), "black")
    colour.paste((255, 0, 0), (0, 0, 32, 64))
    red = upload(service.client, png_of(colour), source["project"])["access_path"]
    grey_as_rgb = upload(service.client, png_of(Image.open(io.BytesIO(mask_bytes())).convert("RGB")),
                         source["project"])["access_path"]  # fmt: skip
    for mask in (narrow, red):
        jobs, files = service.job_count(), stored_files(service)
        answer = service.client.post("/edit/inpaint", json={"image_path": source["image"], "mask_path": mask,
                                                            "prompt": "a hat"})  # fmt: skip
        assert answer.status_code == 422 and "mask_path" in answer.json()["detail"], answer.text
        assert service.job_count() == jobs and stored_files(service) == files
    fine = service.client.post("/edit/inpaint", json={"image_path": source["image"], "mask_path": grey_as_rgb,
                                                      "prompt": "a hat"})  # fmt: skip
    assert fine.status_code == 200, fine.text  # a grey mask saved as RGB is a mask (the engine's rule)
    service.client.post(f"/jobs/{fine.json()['job_id']}/cancel")
    wait_terminal(service.client, fine.json()["job_id"], timeout=120)


# ---------------------------------------------------------------------------------------------- idempotency


def submit(service, route: str, body: dict, key: str, **params):
    return service.client.post(route, json=body, params=params, headers={"Idempotency-Key": key})


def test_a_retried_submission_answers_the_same_job_and_creates_no_second(service, source):
    project = source["project"]
    element = service.client.post(f"/projects/{project}/elements", json={"name": "Tom", "type": "character"})
    assert element.status_code == 201, element.text
    submissions = [
        ("/generate/image", {"project_id": project, "prompt": "a cat", "width": 64, "height": 64}, {}),
        ("/generate/advanced", {"project_id": project, "shot_config": {"prompt": "a dog", "width": 64, "height": 64,
                                                                       "num_frames": 1}}, {}),  # fmt: skip
        ("/edit/inpaint", {"image_path": source["image"], "mask_path": source["mask"], "prompt": "a hat"},
         {"job_id": "job_9f8e7d6c"}),
        (f"/elements/{element.json()['id']}/visualize", {"prompt_override": "Tom", "width": 64, "height": 64}, {}),
    ]  # fmt: skip
    for i, (route, body, params) in enumerate(submissions):
        key = f"retry-{i}"
        first = submit(service, route, body, key, **params)
        assert first.status_code == 200, first.text
        jobs = service.job_count()
        again = submit(service, route, body, key, **params)
        assert again.status_code == 200 and again.json() == first.json(), (again.text, first.text)
        assert service.job_count() == jobs
        other = submit(service, route, changed_prompt(body), key, **params)
        assert other.status_code in (409, 422) and "Idempotency-Key" in other.json()["detail"], other.text
        assert service.job_count() == jobs
        fresh = submit(service, route, body, f"fresh-{i}") if not params else None
        assert fresh is None or fresh.json()["job_id"] != first.json()["job_id"]
    for job in service.client.get(f"/projects/{project}/active_jobs").json():
        service.client.post(f"/jobs/{job['job_id']}/cancel")
    for job in service.client.get(f"/projects/{project}/active_jobs").json():
        wait_terminal(service.client, job["job_id"], timeout=120)


def changed_prompt(body: dict) -> dict:
    for field in ("prompt", "prompt_override"):
        if field in body:
            return {**body, field: "something else"}
    return {**body, "shot_config": {**body["shot_config"], "prompt": "something else"}}


def test_racing_retries_with_one_key_make_one_job(service, source):
    body = {"project_id": source["project"], "prompt": "a race", "width": 64, "height": 64}
    jobs = service.job_count()
    answers: list = []

    def send():
        with service.client_for() as client:
            answers.append(client.post("/generate/image", json=body, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert len({a.json()["job_id"] for a in answers}) == 1 and service.job_count() == jobs + 1
    wait_terminal(service.client, answers[0].json()["job_id"], timeout=120)
