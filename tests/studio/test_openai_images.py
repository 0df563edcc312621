"""The OpenAI-compatible images API (/v1/images/generations and /v1/images/edits) over real HTTP on 127.0.0.1 with
the tiny model, with the real `openai` package as the client: n images with consecutive seeds as base64 PNGs and as
fetchable URLs, an inpainting edit with an OpenAI-style mask, reference editing, a wrong token, bad parameters in
OpenAI's error shape, and jobs that show in the studio's queue and can be cancelled there."""

import base64
import io
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from studio_server import running_studio, studio_settings, wait_status

from flux2.images import image_sha256
from flux2.provenance import read_provenance
from flux2.registry import model_info
from flux2.studio.api.openai_images import PROJECT_ID
from flux2.studio.api.openai_schemas import OpenAIError, quality_steps

TOKEN = "openai-test-token"
SIDE = 128  # px: a fraction of a second per image on the tiny model


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    with running_studio(studio_settings(tmp_path_factory.mktemp("studio-openai"), api_token=TOKEN)) as running:
        running.client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield running


@pytest.fixture(scope="module")
def client(service):
    with openai.OpenAI(api_key=TOKEN, base_url=f"{service.url}/v1", max_retries=0, timeout=120) as client:
        yield client


def decoded(b64: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.float32)


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def read_provenance_of(b64: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        path.write_bytes(base64.b64decode(b64))
        return read_provenance(path)


def api_job_ids(service) -> set[str]:
    from sqlmodel import Session, select

    from flux2.studio.records import Job

    with Session(service.studio.engine) as session:
        return set(session.exec(select(Job.id).where(Job.project_id == PROJECT_ID)).all())


def openai_assets(service) -> dict[str, dict]:
    """The API's images in the studio's gallery, by job id."""
    response = service.client.get(f"/projects/{PROJECT_ID}/images")
    assert response.status_code == 200, response.text
    return {asset["job_id"]: asset for asset in response.json()}


def test_generation_n2_b64_json_gives_two_pngs_of_the_asked_size_with_consecutive_seeds(service, client):
    before = set(openai_assets(service)) if service.client.get(f"/projects/{PROJECT_ID}").status_code == 200 else set()
    answer = client.images.generate(model="tiny", prompt="a red fox in the snow", n=2, size="160x128",
                                    response_format="b64_json", extra_body={"seed": 7})  # fmt: skip
    assert answer.created > 0 and answer.size == "160x128" and answer.output_format == "png"
    assert len(answer.data) == 2 and all(item.url is None for item in answer.data)
    first, second = (decoded(item.b64_json) for item in answer.data)
    assert first.format == second.format == "PNG"
    assert first.size == second.size == (160, 128)
    assert np.abs(pixels(first) - pixels(second)).mean() > 10  # two seeds, two images

    # Each image is a studio job of its own, with its seed recorded: in the image, and in the studio's gallery.
    records = [read_provenance_of(item.b64_json) for item in answer.data]
    assert [record["seed"] for record in records] == [7, 8]
    assert all(record["prompt"] == "a red fox in the snow" and record["model"] == "tiny" for record in records)
    made = {job: asset for job, asset in openai_assets(service).items() if job not in before}
    assert sorted(asset["meta"]["seed"] for asset in made.values()) == [7, 8]

    again = client.images.generate(model="dall-e-3", prompt="a red fox in the snow", size="160x128",
                                   response_format="b64_json", extra_body={"seed": 8})  # fmt: skip
    assert np.array_equal(pixels(decoded(again.data[0].b64_json)), pixels(second))  # an OpenAI name runs it too


def test_response_format_url_is_the_asset_fetchable_with_the_token_in_the_url(service, client):
    answer = client.images.generate(prompt="a lighthouse at dusk", size=f"{SIDE}x{SIDE}", response_format="url")
    [item] = answer.data
    assert item.b64_json is None and answer.output_format == "jpeg"
    assert item.url.startswith(f"{service.url}/projects/{PROJECT_ID}/generated/") and f"token={TOKEN}" in item.url
    fetched = httpx.get(item.url, timeout=30)  # no header: as a browser or a chat front end fetches it
    assert fetched.status_code == 200, fetched.text
    job_id = Path(item.url.split("?")[0]).stem
    stored = Path(service.settings.data_dir) / "projects" / PROJECT_ID / "generated" / f"{job_id}.jpg"
    assert fetched.content == stored.read_bytes()
    assert Image.open(io.BytesIO(fetched.content)).size == (SIDE, SIDE)
    assert httpx.get(item.url.split("?")[0], timeout=30).status_code == 401  # the token is what lets it through


def test_edit_with_a_mask_keeps_the_opaque_part_and_repaints_the_transparent_part(service, client):
    ramp = np.linspace(0, 255, SIDE, dtype=np.float32)
    smooth = np.stack([ramp[None, :].repeat(SIDE, 0), ramp[:, None].repeat(SIDE, 1), np.full((SIDE, SIDE), 90.0)], -1)
    source = Image.fromarray(smooth.astype(np.uint8))  # smooth: the studio's JPEG keeps it within a few levels
    mask = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, SIDE // 2, SIDE))  # OpenAI's convention: transparent = edit (the left half)
    style = Image.new("RGB", (64, 64), "orange")  # a second image: a reference for the model
    answer = client.images.edit(
        model="tiny",
        image=[("source.png", png(source), "image/png"), ("style.png", png(style), "image/png")],
        mask=("mask.png", png(mask), "image/png"),
        prompt="a paper boat",
        response_format="b64_json",
        extra_body={"seed": 3},
    )
    [item] = answer.data
    edited = decoded(item.b64_json)
    assert edited.format == "PNG" and edited.size == (SIDE, SIDE)
    diff = np.abs(pixels(edited) - pixels(source)).mean(axis=2)
    # Kept pixels are the source's exactly before the JPEG the studio stores (q95): a few levels at most, away
    # from the mask's edge where JPEG blocks straddle both halves.
    kept = diff[:, SIDE // 2 + 8 :]
    assert kept.mean() < 6 and np.percentile(kept, 99) < 30, (kept.mean(), np.percentile(kept, 99))
    assert diff[:, : SIDE // 2 - 8].mean() > 40  # the transparent half was repainted

    record = read_provenance_of(item.b64_json)
    assert record["seed"] == 3 and record["mode"] == "inpaint", record
    assert image_sha256(style) in record["references"], record  # the second image went to the model


def test_edit_without_a_mask_edits_with_the_image_as_reference_at_its_size(client):
    picture = Image.new("RGB", (96, 64), "teal")
    answer = client.images.edit(image=("wide.png", png(picture), "image/png"), prompt="the same, at night")
    [item] = answer.data
    assert answer.size == "96x64" and decoded(item.b64_json).size == (96, 64)
    assert read_provenance_of(item.b64_json)["references"] == [image_sha256(picture)]  # edited with it as reference


def test_a_wrong_token_is_refused_and_queues_nothing(service):
    jobs = service.job_count()
    with openai.OpenAI(api_key="not-the-token", base_url=f"{service.url}/v1", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as caught:
            stranger.images.generate(prompt="a red fox", size=f"{SIDE}x{SIDE}")
    assert caught.value.status_code == 401 and "missing or wrong API token" in str(caught.value)
    assert service.job_count() == jobs


def test_a_bad_size_is_a_bad_request_naming_size_and_the_allowed_values(service, client):
    jobs = service.job_count()
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red fox", size="1000x1000")
    err = caught.value
    assert err.param == "size" and err.code == "invalid_value" and err.type == "invalid_request_error"
    message = str(err)
    assert "size must be 'auto' or WIDTHxHEIGHT" in message and "multiple of 16" in message, message
    assert "1024x1024" in message and "992 or 1008" in message, message
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a red fox", size="big")
    assert service.job_count() == jobs

    ok = client.images.generate(prompt="a red fox", size="auto")  # negative control: auto is the model's default
    assert ok.size == "256x256"


@pytest.mark.parametrize(
    ("arguments", "error", "param", "words"),
    [
        ({"model": "flux.2-dev"}, openai.NotFoundError, "model", "is not loaded: this service runs tiny"),
        ({"model": "stable-diffusion"}, openai.NotFoundError, "model", "does not exist here: send tiny"),
        ({"style": "vivid"}, openai.BadRequestError, "style", "FLUX models have no style switch"),
        ({"n": 11}, openai.BadRequestError, "n", "less than or equal to 10"),
        ({"response_format": "url", "output_format": "png"}, openai.BadRequestError, "output_format", "stored JPEG"),
        ({"extra_body": {"colour": "blue"}}, openai.BadRequestError, "colour", "unknown parameter 'colour'"),
    ],
)
def test_other_bad_parameters_get_openai_errors_naming_them(service, client, arguments, error, param, words):
    jobs = service.job_count()
    with pytest.raises(error) as caught:
        client.images.generate(prompt="a red fox", size=f"{SIDE}x{SIDE}", **arguments)
    assert caught.value.param == param and words in str(caught.value), str(caught.value)
    assert service.job_count() == jobs


def test_edit_masks_follow_openais_convention_and_the_studios_mask_rule(client):
    source = ("source.png", png(Image.new("RGB", (SIDE, SIDE), "gray")), "image/png")
    cases = [
        (Image.new("L", (SIDE, SIDE), 255), "must be a PNG with an alpha channel"),
        (Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255)), "no transparent pixels"),
        (Image.new("RGBA", (SIDE, SIDE // 2), (0, 0, 0, 0)), "aspect ratio"),
    ]
    for mask, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(image=source, mask=("mask.png", png(mask), "image/png"), prompt="a boat")
        assert caught.value.param == "mask" and words in str(caught.value), str(caught.value)


def test_the_studios_own_routes_keep_their_error_shape(service):
    response = service.client.post("/generate/image", json={"project_id": "nope", "prompt": "x", "width": 1000})
    assert response.status_code == 422 and "detail" in response.json() and "error" not in response.json()


def test_api_jobs_wait_in_the_studio_queue_and_a_cancel_there_ends_the_request(service, client):
    project = service.client.post("/projects", json={"name": "Busy"}).json()["id"]
    long = {"project_id": project, "prompt": "long", "width": SIDE, "height": SIDE, "num_inference_steps": 200}
    blocker = service.client.post("/generate/image", json=long).json()["job_id"]
    outcome: dict[str, BaseException] = {}

    def ask() -> None:
        try:
            client.images.generate(prompt="waits its turn", size="64x64")
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome["error"] = err

    jobs = service.job_count()
    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 30
    while not (queued := service.client.get(f"/projects/{PROJECT_ID}/active_jobs").json()):
        assert time.monotonic() < deadline, "the API's job never showed in the queue"
        time.sleep(0.05)
    [mine] = queued
    assert mine["status"] == "pending"  # behind the long job: one worker for every route
    assert service.client.post(f"/jobs/{mine['job_id']}/cancel").json()["status"] == "cancelled"
    thread.join(30)
    assert isinstance(outcome.get("error"), openai.InternalServerError), outcome
    assert outcome["error"].code == "job_cancelled" and mine["job_id"] in str(outcome["error"])
    assert service.job_count() == jobs + 1  # not retried
    service.client.post(f"/jobs/{blocker}/cancel")
    wait_status(service.client, blocker, lambda s: s["status"] in ("cancelled", "completed"), timeout=60)


def test_a_client_that_goes_away_takes_its_jobs_with_it(service):
    project = service.client.post("/projects", json={"name": "Busy again"}).json()["id"]
    long = {"project_id": project, "prompt": "long", "width": SIDE, "height": SIDE, "num_inference_steps": 200}
    blocker = service.client.post("/generate/image", json=long).json()["job_id"]
    before = api_job_ids(service)
    with openai.OpenAI(api_key=TOKEN, base_url=f"{service.url}/v1", max_retries=0, timeout=1.5) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.images.generate(prompt="never mind", size="64x64", n=2)
    mine = api_job_ids(service) - before
    assert len(mine) == 2
    for job_id in mine:  # without the client they would wait for the worker, then run
        wait_status(service.client, job_id, lambda s: s["status"] == "cancelled", timeout=10)
    assert service.client.get(f"/status/{blocker}").json()["status"] == "processing"  # others' jobs go on
    service.client.post(f"/jobs/{blocker}/cancel")
    wait_status(service.client, blocker, lambda s: s["status"] in ("cancelled", "completed"), timeout=60)


def test_openapi_documents_both_routes_with_the_edit_form(service):
    paths = service.client.get("/openapi.json").json()["paths"]
    edit_form = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "image[]", "mask", "prompt", "n", "size", "response_format"} <= set(edit_form["properties"])
    generations = paths["/v1/images/generations"]["post"]["responses"]
    assert {"200", "400", "401", "404", "500"} <= set(generations) and "422" not in generations


def test_quality_low_and_medium_run_fewer_steps_and_the_rest_the_models_own(client):
    steps = {}
    for quality in ("low", "medium", "hd"):
        answer = client.images.generate(prompt="a kite", size="64x64", quality=quality)
        steps[quality] = read_provenance_of(answer.data[0].b64_json)["num_steps"]
    assert steps == {"low": 2, "medium": 3, "hd": 4}  # the tiny model's default is 4


def test_a_distilled_model_refuses_the_qualities_it_cannot_give():
    distilled = model_info("flux.2-klein-4b")
    assert quality_steps("hd", distilled) is None and quality_steps(None, distilled) is None
    with pytest.raises(OpenAIError) as caught:
        quality_steps("low", distilled)
    assert caught.value.param == "quality" and "always runs its 4 steps" in caught.value.message
