"""The studio service over real HTTP on 127.0.0.1 with the tiny model: the whole flow a studio front end runs
(project, element, upload, generation followed over SSE, the asset, its thumbnail and metadata), the single-frame
advanced route, the API token, and the OpenAPI schema."""

import io
import re
import time

import pytest
from PIL import Image
from studio_server import (
    STATUS_FIELDS,
    EventStream,
    create_project,
    image_bytes,
    running_studio,
    studio_settings,
    upload,
    wait_terminal,
)

from flux2.content_credentials import read_credentials
from flux2.provenance import read_provenance

SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    with running_studio(studio_settings(tmp_path_factory.mktemp("studio-flow"))) as running:
        yield running


def test_full_flow_element_upload_generate_follow_sse_fetch_asset_and_metadata(service, tmp_path):
    client = service.client
    project = create_project(client, "Film")
    other = create_project(client, "Another film")
    hero = client.post(f"/projects/{project}/elements", json={"name": "Hero", "trigger_word": "@Hero"}).json()
    # The same trigger word in another project: it must never be used for this project's jobs.
    stranger = client.post(f"/projects/{other}/elements", json={"name": "Villain", "trigger_word": "@Hero"}).json()
    assert hero["project_id"] == project and stranger["project_id"] == other

    reference = upload(client, image_bytes(64, 64, "red"), project, "element", "hero.png")
    assert reference["url"].startswith(f"/projects/{project}/assets/elements/") and reference["access_path"]
    elsewhere = upload(client, image_bytes(64, 64, "blue"), other, "element", "villain.png")
    for element, picture in ((hero, reference), (stranger, elsewhere)):
        patched = client.patch(f"/elements/{element['id']}", json={"image_path": picture["url"]})
        assert patched.status_code == 200 and patched.json()["image_path"] == picture["url"], patched.text

    with EventStream(service) as events:
        queued = client.post("/generate/image", json={"project_id": project, "prompt": "@Hero walks in the rain",
                                                      "width": 64, "height": 64})  # fmt: skip
        assert queued.status_code == 200, queued.text
        assert queued.json()["status"] == "queued"
        job_id = queued.json()["job_id"]
        drawn = client.get(f"/status/{job_id}").json()["seed"]  # drawn and recorded when the job was queued
        assert isinstance(drawn, int)
        name, complete = events.wait_end(job_id, timeout=60)
        mine = events.of(job_id)
    assert name == "complete", complete
    names = [n for n, _ in mine]
    assert names[-1] == "complete" and names.count("complete") == 1
    assert "progress" in names[:-1] and set(names[:-1]) == {"progress"}
    progress = [data["progress"] for n, data in mine if n == "progress"]
    assert progress == sorted(progress) and all(0 <= p <= 100 for p in progress)
    assert any(data["status_message"].startswith("Step ") for n, data in mine if n == "progress")
    asset_id, url, thumbnail_url = complete["asset_id"], complete["url"], complete["thumbnail_url"]
    assert asset_id and url and thumbnail_url
    assert complete["project_id"] == project and complete["type"] == "image"

    status = client.get(f"/status/{job_id}").json()
    assert set(STATUS_FIELDS) <= status.keys()
    assert status["status"] == "completed" and status["progress"] == 100 and status["asset_id"] == asset_id
    assert status["error_message"] is None and status["status_message"]
    assert status["seed"] == drawn and complete["seed"] == drawn

    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.headers.get("accept-ranges") == "bytes"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    part = client.get(url, headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == image.content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(image.content)}"
    tail = client.get(url, headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == image.content[-50:]
    beyond = client.get(url, headers={"Range": f"bytes={len(image.content) + 10}-"})
    assert beyond.status_code == 416
    thumbnail = client.get(thumbnail_url)
    assert thumbnail.status_code == 200
    assert Image.open(io.BytesIO(thumbnail.content)).size == (16, 16)  # a quarter of the image each way

    downloaded = tmp_path / "asset.jpg"
    downloaded.write_bytes(image.content)
    record = read_provenance(downloaded)
    assert record is not None, "the downloaded JPEG carries no generation record"
    assert record["prompt"] == "@Hero walks in the rain" and record["seed"] == status["seed"]
    assert record["model"] == "tiny" and (record["width"], record["height"]) == (64, 64)
    credentials = read_credentials(downloaded)  # the studio's JPEG carries a signed C2PA manifest too
    assert credentials is not None and credentials.state == "untrusted", credentials  # intact; a local certificate
    [created] = [action for action in credentials.actions if action.action == "c2pa.created"]
    assert created.digital_source_type.endswith("/trainedAlgorithmicMedia") and credentials.model == "tiny"
    assert len(credentials.ingredients) == 1  # the element's picture, by hash

    images = client.get(f"/projects/{project}/images").json()
    [asset] = [a for a in images if a["id"] == asset_id]
    assert asset["url"] == url and asset["thumbnail_url"] == thumbnail_url and asset["job_id"] == job_id
    assert asset["meta"]["prompt"] == "@Hero walks in the rain" and asset["meta"]["seed"] == status["seed"]
    assert asset["meta"]["model"] == "tiny"
    # The element's picture was used, and only this project's: not the other project's "@Hero".
    assert asset["meta"]["reference_images"] == [reference["url"]]
    assert elsewhere["url"] not in str(asset["meta"])
    assert all(a["id"] != asset_id for a in client.get(f"/projects/{other}/images").json())
    assert client.get(f"/projects/{project}/active_jobs").json() == []


def test_references_by_element_id_and_asset_id_stay_in_the_project(service):
    client = service.client
    project = create_project(client, "References")
    element = client.post(f"/projects/{project}/elements", json={"name": "Cat", "trigger_word": "@Cat"}).json()
    picture = upload(client, image_bytes(64, 64, "green"), project, "element")
    client.patch(f"/elements/{element['id']}", json={"image_path": picture["url"]}).raise_for_status()
    extra = upload(client, image_bytes(80, 64, "yellow"), project, "reference")
    body = {"project_id": project, "prompt": "a portrait", "width": 64, "height": 64, "seed": 7,
            "reference_images": [element["id"], extra["asset_id"]]}  # fmt: skip
    job_id = client.post("/generate/image", json=body).json()["job_id"]
    status = wait_terminal(client, job_id, timeout=60)
    assert status["status"] == "completed", status
    assert status["seed"] == 7
    [asset] = [a for a in client.get(f"/projects/{project}/images").json() if a["id"] == status["asset_id"]]
    assert asset["meta"]["reference_images"] == [picture["url"], extra["url"]]
    assert asset["meta"]["prompt"] == "a portrait @Cat"  # an explicit element brings its trigger word

    # Another project's element and asset ids are not references of this project: refused at the request.
    other = create_project(client, "Someone else's")
    foreign = client.post(f"/projects/{other}/elements", json={"name": "Dog", "trigger_word": "@Dog"}).json()
    foreign_asset = upload(client, image_bytes(64, 64, "black"), other)
    jobs_before = service.job_count()
    for item in (foreign["id"], foreign_asset["asset_id"], "no-such-element"):
        refused = client.post("/generate/image", json={**body, "reference_images": [item]})
        assert refused.status_code == 422 and "reference_images" in refused.json()["detail"], refused.text
    assert service.job_count() == jobs_before


def test_a_failing_job_sends_an_error_event_and_reports_error_message(service):
    client = service.client
    project = create_project(client, "Failures")
    small = upload(client, image_bytes(48, 48), project, "reference")  # the model takes references of 64 px and up
    with EventStream(service) as events:
        body = {"project_id": project, "prompt": "x", "width": 64, "height": 64, "reference_images": [small["url"]]}
        job_id = client.post("/generate/image", json=body).json()["job_id"]
        name, data = events.wait_end(job_id, timeout=60)
    assert name == "error", data
    assert data["status"] == "failed" and "64" in data["message"] and data["error_message"] == data["message"]
    status = client.get(f"/status/{job_id}").json()
    assert status["status"] == "failed" and status["error_message"] == data["message"] and status["asset_id"] is None
    assert status["status_message"] == "Failed"
    assert [a["id"] for a in client.get(f"/projects/{project}/images").json()] == [small["asset_id"]]


def test_deleting_an_asset_removes_its_files(service):
    client = service.client
    project = create_project(client, "Deletions")
    job_id = client.post("/generate/image", json={"project_id": project, "prompt": "x", **SMALL}).json()["job_id"]
    status = wait_terminal(client, job_id, timeout=60)
    assert client.get(status["output_url"]).status_code == 200
    deleted = client.delete(f"/assets/{status['asset_id']}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted", deleted.text
    assert client.get(status["output_url"]).status_code == 404
    assert client.get(status["thumbnail_url"]).status_code == 404
    assert client.get(f"/projects/{project}/images").json() == []
    assert client.delete(f"/assets/{status['asset_id']}").status_code == 404


def test_visualize_gives_the_element_its_picture(service):
    client = service.client
    project = create_project(client, "Casting")
    element = client.post(f"/projects/{project}/elements", json={"name": "Mara", "trigger_word": "@Mara",
                          "description": "a tall sailor", "type": "character"}).json()  # fmt: skip
    missing = client.patch(f"/elements/{element['id']}", json={"image_path": f"/projects/{project}/uploads/x.png"})
    assert missing.status_code == 422 and "no such file" in missing.json()["detail"]
    queued = client.post(f"/elements/{element['id']}/visualize", json={"width": 64, "height": 64})
    assert queued.status_code == 200, queued.text
    status = wait_terminal(client, queued.json()["job_id"], timeout=60)
    assert status["status"] == "completed" and status["type"] == "visualize"
    pictured = [e for e in client.get(f"/projects/{project}/elements").json() if e["id"] == element["id"]]
    assert pictured[0]["image_path"] == status["output_url"]
    assert client.get(status["output_url"]).status_code == 200
    assert client.get("/projects/nope/images").json() == []  # the front end lists before it saves: [], not 404


def test_sse_sends_keepalives_between_events(service):
    with EventStream(service) as events:
        deadline = time.monotonic() + 5
        while events.comments < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert events.comments >= 1  # every sse_keepalive_s (0.5 s here)


def test_advanced_single_frame_is_an_image_job_and_video_is_not_served(service):
    client = service.client
    project = create_project(client, "Shots")
    shot = {"prompt": "a shot", "width": 64, "height": 64, "num_frames": 121}
    jobs_before = service.job_count()
    video = client.post("/generate/advanced", json={"project_id": project, "shot_config": shot})
    assert video.status_code == 501, video.text
    assert "video" in video.json()["detail"] and "num_frames" in video.json()["detail"]
    assert service.job_count() == jobs_before  # nothing queued, nothing loaded

    queued = client.post("/generate/advanced", json={"project_id": project, "shot_config": {**shot, "num_frames": 1}})
    assert queued.status_code == 200 and queued.json()["status"] == "queued", queued.text
    status = wait_terminal(client, queued.json()["job_id"], timeout=60)
    assert status["status"] == "completed" and status["asset_id"], status
    [asset] = client.get(f"/projects/{project}/images").json()
    assert asset["id"] == status["asset_id"] and (asset["width"], asset["height"]) == (64, 64)


def test_api_token_guards_every_route_and_media_and_sse_take_it_as_a_query(tmp_path, one_thread):
    with running_studio(studio_settings(tmp_path, api_token="s3cret")) as service:
        bare = service.client_for()
        authorised = service.client_for(headers={"Authorization": "Bearer s3cret"})
        for path in ("/health", "/projects", "/gpu/status", "/sam/health"):
            refused = bare.get(path)
            assert refused.status_code == 401 and "token" in refused.json()["detail"], (path, refused.text)
        assert bare.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert bare.post("/projects", json={"name": "x"}).status_code == 401
        assert authorised.get("/health").status_code == 200
        project = create_project(authorised, "Guarded")
        picture = upload(authorised, image_bytes(), project)
        assert bare.get(picture["url"]).status_code == 401
        assert bare.get(picture["url"], params={"token": "wrong"}).status_code == 401
        media = bare.get(picture["url"], params={"token": "s3cret"})
        assert media.status_code == 200 and media.content == image_bytes()
        with bare.stream("GET", "/events") as refused:
            assert refused.status_code == 401
        with EventStream(service, params={"token": "s3cret"}) as events:
            job_id = authorised.post("/generate/image", json={"project_id": project, "prompt": "guarded",
                                                              "width": 64, "height": 64}).json()["job_id"]  # fmt: skip
            name, _ = events.wait_end(job_id, timeout=60)
        assert name == "complete"
        bare.close()
        authorised.close()


def test_openapi_describes_every_route_of_the_contract(service):
    schema = service.client.get("/openapi.json")
    assert schema.status_code == 200
    described = {(method.upper(), re.sub(r"\{[^}]*\}", "{}", path))
                 for path, item in schema.json()["paths"].items() for method in item}  # fmt: skip
    contract = {
        ("POST", "/generate/image"), ("POST", "/generate/advanced"), ("GET", "/status/{}"),
        ("POST", "/jobs/{}/cancel"), ("GET", "/projects/{}/active_jobs"), ("GET", "/projects/{}/images"),
        ("DELETE", "/assets/{}"), ("POST", "/upload"), ("POST", "/edit/inpaint"), ("POST", "/edit/segment"),
        ("POST", "/edit/segment-text"), ("POST", "/edit/detect"), ("GET", "/sam/health"), ("GET", "/events"),
        ("POST", "/projects"), ("GET", "/projects"), ("GET", "/projects/{}"), ("PATCH", "/projects/{}"),
        ("DELETE", "/projects/{}"), ("POST", "/projects/{}/elements"), ("GET", "/projects/{}/elements"),
        ("PATCH", "/elements/{}"), ("DELETE", "/elements/{}"), ("POST", "/elements/{}/visualize"),
        ("GET", "/gpu/status"),
    }  # fmt: skip
    assert contract - described == set()


def test_openapi_gives_every_route_a_response_schema_and_the_request_ranges(service):
    schema = service.client.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            answers = [answer for code, answer in operation["responses"].items() if code.startswith("2")]
            assert answers, (method, path)
            for answer in answers:
                contents = answer.get("content", {})
                assert contents and all(content.get("schema") for content in contents.values()), (method, path)
    bodies = schema["components"]["schemas"]
    width = bodies["GenerateImageRequest"]["properties"]["width"]
    assert (width["multipleOf"], width["minimum"], width["maximum"]) == (16, 16, 4096)
    assert bodies["ShotConfig"]["properties"]["cfg_scale"]["maximum"] == 30
    read = {"job_id", "status", "progress", "status_message", "message", "error", "error_message", "output_url",
            "url", "thumbnail_url", "seed", "asset_id", "enhanced_prompt"}  # fmt: skip
    assert read <= bodies["JobState"]["properties"].keys()
    status = schema["paths"]["/status/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert status["schema"] == {"$ref": "#/components/schemas/JobState"}
