"""POST /edit/outpaint and /edit/img2img over real HTTP on 127.0.0.1, with the tiny model: what each job makes,
what it records, and bad input answered 4xx naming the field, with no job queued."""

import io

import numpy as np
import pytest
from PIL import Image
from studio_server import create_project, running_studio, studio_settings, upload, wait_terminal

SIDE = 96  # small enough to stay below the watermark's minimum: kept pixels are the source's, up to JPEG


def gradient(side: int = SIDE) -> bytes:
    """A smooth picture (JPEG keeps it closely), different in each channel."""
    ramp = np.linspace(0, 255, side)
    pixels = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.full((side, side), 90)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def flat(color: str, side: int = SIDE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    with running_studio(studio_settings(tmp_path_factory.mktemp("edit-modes"))) as running:
        yield running


@pytest.fixture(scope="module")
def source(service) -> dict:
    project = create_project(service.client, "Edit modes")
    return {"project": project, **upload(service.client, gradient(), project)}


def finished(service, response) -> dict:
    assert response.status_code == 200, response.text
    job = wait_terminal(service.client, response.json()["job_id"], timeout=60)
    assert job["status"] == "completed", job
    return job


def picture(service, url: str) -> np.ndarray:
    response = service.client.get(url)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def asset_of(service, job: dict) -> dict:
    [asset] = [
        a for a in service.client.get(f"/projects/{job['project_id']}/images").json() if a["id"] == job["asset_id"]
    ]
    return asset


def test_outpaint_grows_the_picture_and_keeps_the_source_in_the_middle(service, source):
    margins = {"left": 16, "right": 32, "top": 0, "bottom": 16}
    body = {"image_path": source["url"], "prompt": "a wider view", "seed": 3, **margins}
    job = finished(service, service.client.post("/edit/outpaint", json=body))
    out = picture(service, job["output_url"])
    assert out.shape == (SIDE + 16, SIDE + 48, 3)
    kept = out[:SIDE, 16 : 16 + SIDE]
    original = picture(service, source["url"])
    assert np.abs(kept - original).mean() < 2  # JPEG q95 of a smooth picture
    # Negative control: the new border is made, not the source's edge pixels repeated.
    repeated = np.pad(original, ((0, 16), (16, 32), (0, 0)), mode="edge")
    assert np.abs(out[:, SIDE + 16 :] - repeated[:, SIDE + 16 :]).mean() > 10

    assert job["type"] == "outpaint" and job["url"] == job["output_url"] and job["seed"] == 3
    record = asset_of(service, job)["meta"]["record"]
    assert record["mode"] == "outpaint" and record["seed"] == 3
    assert {side: record["edit"][side] for side in margins} == margins


def test_img2img_follows_the_source_at_low_strength_and_ignores_it_at_strength_1(service, source):
    """The tiny model's autoencoder has random weights, so no output resembles its source; what a user sees all the
    same: at low strength the picture given changes the result, at strength 1 (pure noise) it does not."""
    other = upload(service.client, flat("olive"), source["project"])

    def edited(image: str, strength: float) -> tuple[dict, np.ndarray]:
        body = {"image_path": image, "prompt": "an oil painting", "seed": 5, "strength": strength}
        job = finished(service, service.client.post("/edit/img2img", json=body))
        return job, picture(service, job["output_url"])

    low_job, low = edited(source["url"], 0.1)
    _, low_other = edited(other["asset_id"], 0.1)  # an asset id names the source too
    _, full = edited(source["url"], 1.0)
    _, full_other = edited(other["url"], 1.0)
    assert low.shape == (SIDE, SIDE, 3)
    assert np.abs(low - low_other).mean() > 3  # the source shows through
    assert np.abs(full - full_other).mean() < 0.5  # nothing of it is left

    assert low_job["type"] == "img2img"
    meta = asset_of(service, low_job)["meta"]
    assert (meta["record"]["mode"], meta["record"]["strength"]) == ("img2img", 0.1)
    assert meta["source"] == "img2img" and meta["original_image"] == source["url"]


def test_a_retry_with_its_idempotency_key_answers_the_same_job(service, source):
    body = {"image_path": source["url"], "prompt": "again", "seed": 1, "strength": 0.5}
    headers = {"Idempotency-Key": "img2img-retry-1"}
    first = service.client.post("/edit/img2img", json=body, headers=headers)
    again = service.client.post("/edit/img2img", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["job_id"] == again.json()["job_id"]
    other = service.client.post("/edit/img2img", json={**body, "strength": 0.6}, headers=headers)
    assert other.status_code == 422 and "Idempotency-Key" in other.text
    wait_terminal(service.client, first.json()["job_id"], timeout=60)


OUTPAINT = "/edit/outpaint"
IMG2IMG = "/edit/img2img"


@pytest.mark.parametrize(
    ("route", "change", "status", "says"),
    [
        (OUTPAINT, {}, 422, "left, right, top, bottom: give at least one margin above 0"),
        (OUTPAINT, {"left": -16, "right": 32}, 422, "left must be a whole number of px >= 0, got -16"),
        (OUTPAINT, {"left": 10}, 422, "left and right: the picture's 96 px grow to 106 px, not a multiple of 16"),
        (OUTPAINT, {"bottom": 4096}, 422, "top and bottom: the picture's 96 px grow to 4192 px, over the 4096 px"),
        (OUTPAINT, {"top": 16, "mask_blur": 500}, 422, "mask_blur must be a number of px >= 0, at most 128"),
        (IMG2IMG, {"strength": 0}, 422, "strength must be a number in (0, 1], got 0"),
        (IMG2IMG, {"strength": 1.5}, 422, "strength must be a number in (0, 1], got 1.5"),
        (IMG2IMG, {"prompt": ""}, 422, "prompt"),
        (IMG2IMG, {"image_path": "/projects/nope/assets/missing.png"}, 404, "image_path"),
        (IMG2IMG, {"image_path": "../../etc/passwd"}, 400, "image_path"),
        (IMG2IMG, {"image_path": "asset_that_is_not_there"}, 400, "image_path"),
    ],
)
def test_bad_input_names_the_field_and_queues_nothing(service, source, route, change, status, says):
    before = service.job_count()
    body = {"image_path": source["url"], "prompt": "x", **change}
    response = service.client.post(route, json=body)
    assert response.status_code == status, response.text
    assert says in response.text
    assert service.job_count() == before


def test_a_source_outside_any_project_is_refused(service):
    loose = upload(service.client, flat("tan"))  # no project_id: it has no project for the output to go to
    response = service.client.post(IMG2IMG, json={"image_path": loose["url"], "prompt": "x"})
    assert response.status_code == 422 and "image_path must be an asset id or an image of a project" in response.text
