"""The studio front end's project, element and asset calls over real HTTP (issue 11): each test asserts the fields,
and their types, that the front end reads (shared/spec/milimo-frontend-contract.md)."""

import argparse
import json
import time
from datetime import UTC

import pytest
from sqlmodel import Session, update
from studio_server import create_project, image_bytes, running_studio, studio_settings, upload, wait_terminal

from flux2.cli import serve
from flux2.registry import model_info
from flux2.request import GenerationRequest
from flux2.studio.config import FRONT_END_ORIGINS, StudioSettings
from flux2.studio.db import make_engine, upgrade
from flux2.studio.jobs_store import JobStore
from flux2.studio.payloads import ImageJob
from flux2.studio.records import Asset, Job, JobStatus, Project

SEED_TOO_BIG = 2**63  # one over SQLite's INTEGER


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    with running_studio(studio_settings(tmp_path_factory.mktemp("studio-front-end"))) as running:
        yield running


def is_seconds(value) -> bool:
    """Epoch seconds as the front end uses them (`new Date(ts * 1000)`): a number, close to now."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value - time.time()) < 600


def test_project_answers_carry_epoch_seconds_and_the_database_keeps_aware_datetimes(service):
    client = service.client
    created = client.post("/projects", json={"name": "Clock", "resolution_w": 1024, "resolution_h": 576, "fps": 24,
                                             "seed": 7})  # fmt: skip
    assert created.status_code == 201, created.text
    project = created.json()
    assert {"id", "name", "fps", "resolution_w", "resolution_h", "seed", "script_content"} <= project.keys()
    assert is_seconds(project["created_at"]) and is_seconds(project["updated_at"]), project
    listed = [p for p in client.get("/projects").json() if p["id"] == project["id"]]
    assert listed == [project]
    assert client.get(f"/projects/{project['id']}").json() == {**project, "scenes": [], "shots": []}
    time.sleep(0.01)
    renamed = client.patch(f"/projects/{project['id']}", json={"name": "Clock 2"}).json()
    assert renamed["name"] == "Clock 2" and is_seconds(renamed["updated_at"])
    assert renamed["updated_at"] > project["updated_at"] and renamed["created_at"] == project["created_at"]
    with Session(service.studio.engine) as session:
        record = session.get(Project, project["id"])
        assert record.updated_at.tzinfo == UTC and record.updated_at.timestamp() == renamed["updated_at"]


@pytest.mark.parametrize("method", ["post", "patch", "put"])
def test_project_seed_is_bounded_to_a_signed_64_bit_integer(service, method):
    client = service.client
    project = create_project(client, "Seeds")
    url = "/projects" if method == "post" else f"/projects/{project}"
    answer = client.request(method, url, json={"name": "Seeds", "seed": SEED_TOO_BIG})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "seed"]
    biggest = client.request(method, url, json={"name": "Seeds", "seed": SEED_TOO_BIG - 1})
    assert biggest.status_code in (200, 201) and biggest.json()["seed"] == SEED_TOO_BIG - 1


def test_put_project_creates_the_built_in_default_project_then_saves_it(service):
    client = service.client
    # The front end starts in its built-in project "default": it lists its elements and images before saving it.
    assert client.get("/projects/never-saved/elements").json() == []
    assert client.get("/projects/never-saved/images").json() == []
    whole = {"id": "default", "name": "Untitled Project", "fps": 25, "seed": 42, "resolution_w": 768,
             "resolution_h": 512, "shots": [{"id": "shot-init", "prompt": "A cinematic shot...", "timeline": []}],
             "scenes": []}  # fmt: skip
    saved = client.put("/projects/default", json=whole)
    assert saved.status_code == 200, saved.text
    assert saved.json()["id"] == "default" and saved.json()["name"] == "Untitled Project"
    assert is_seconds(saved.json()["updated_at"])
    again = client.put("/projects/default", json={**whole, "name": "My film", "fps": 30, "script": "INT. HOUSE"})
    assert again.status_code == 200, again.text
    loaded = client.get("/projects/default").json()
    assert (loaded["name"], loaded["fps"], loaded["script_content"]) == ("My film", 30, "INT. HOUSE")
    assert loaded["created_at"] == saved.json()["created_at"] and loaded["updated_at"] >= saved.json()["updated_at"]
    # An id names the project's media folder: only letters, digits, '_' and '-'.
    for bad in ("bad id", "a.b", "-x", "x" * 65, "%2e%2e"):
        answer = client.put(f"/projects/{bad}", json=whole)
        assert answer.status_code == 422 and answer.json()["detail"].startswith("project_id must be"), answer.text


def test_elements_make_a_trigger_word_from_the_name_and_put_edits_them(service):
    client = service.client
    project = create_project(client, "Cast")
    form = {"name": "Old Tom", "type": "character", "description": "a fisherman", "trigger_word": ""}
    made = client.post(f"/projects/{project}/elements", json=form)
    assert made.status_code == 201, made.text
    tom = made.json()
    assert tom["trigger_word"] == "@OldTom"  # the studio backend's rule: "@" and the name without spaces
    for field, kind in (("id", str), ("name", str), ("type", str), ("description", str), ("trigger_word", str)):
        assert isinstance(tom[field], kind), (field, tom)
    assert "image_path" in tom and tom["image_path"] is None
    unnamed = client.post(f"/projects/{project}/elements", json={"name": "Harbour", "type": "location"})
    assert unnamed.status_code == 201 and unnamed.json()["trigger_word"] == "@Harbour"
    taken = client.post(f"/projects/{project}/elements", json={"name": "OldTom", "trigger_word": ""})
    assert taken.status_code == 409 and "@OldTom" in taken.json()["detail"]
    elsewhere = client.post(f"/projects/{create_project(client)}/elements", json={"name": "Old Tom"})
    assert elsewhere.status_code == 201 and elsewhere.json()["trigger_word"] == "@OldTom"

    form = {"name": "Young Tom", "type": "character", "description": "a boy", "trigger_word": "@Tommy"}
    edited = client.put(f"/elements/{tom['id']}", json=form)
    assert edited.status_code == 200, edited.text
    assert {k: edited.json()[k] for k in form} == form
    cleared = client.put(f"/elements/{tom['id']}", json={**form, "trigger_word": ""})
    assert cleared.status_code == 200 and cleared.json()["trigger_word"] == "@YoungTom"
    clash = client.put(f"/elements/{tom['id']}", json={**form, "trigger_word": "@Harbour"})
    assert clash.status_code == 409
    patched = client.patch(f"/elements/{tom['id']}", json={"description": "a sailor"})
    assert patched.status_code == 200 and patched.json()["description"] == "a sailor"
    listed = {e["id"]: e for e in client.get(f"/projects/{project}/elements").json()}
    assert listed[tom["id"]]["trigger_word"] == "@YoungTom" and listed[tom["id"]]["name"] == "Young Tom"


def test_upload_answers_the_media_type_and_the_library_lists_newest_first(service):
    client = service.client
    project = create_project(client, "Library")
    first = upload(client, image_bytes(32, 32, "red"), project, "reference", "first.png")
    assert first["type"] == "image"  # the media type, not the form's "reference"
    assert first["access_path"] == first["url"] and first["url"].startswith(f"/projects/{project}/")
    # The media library's form has no type: the default kind.
    second = client.post("/upload", files={"file": ("second.jpg", image_bytes(48, 32, fmt="JPEG"), "image/jpeg")},
                         data={"project_id": project})  # fmt: skip
    assert second.status_code == 200 and second.json()["type"] == "image", second.text
    with Session(service.studio.engine) as session:
        assert session.get(Asset, first["asset_id"]).meta["kind"] == "reference"
        assert session.get(Asset, second.json()["asset_id"]).meta["kind"] == "general"

    library = client.get("/uploads")
    assert library.status_code == 200, library.text
    items = library.json()
    times = [item["created_at"] for item in items]
    assert times == sorted(times, reverse=True) and all(is_seconds(t) for t in times)
    ids = [item["id"] for item in items]
    assert ids.index(second.json()["asset_id"]) < ids.index(first["asset_id"])  # newest first
    [item] = [item for item in items if item["id"] == first["asset_id"]]
    assert item["asset_id"] == item["id"] and item["type"] == "image" and item["filename"] == first["filename"]
    assert item["url"] == item["access_path"] == item["path"] == first["url"]
    assert (item["width"], item["height"]) == (32, 32) and item["project_id"] == project
    assert client.get(item["url"]).status_code == 200  # what the library shows


def test_gallery_items_carry_meta_json_with_the_settings_the_front_end_reuses(service):
    client = service.client
    project = create_project(client, "Gallery")
    body = {"project_id": project, "prompt": "a lighthouse", "negative_prompt": "fog", "width": 64, "height": 48,
            "num_inference_steps": 2, "guidance_scale": 2.0, "seed": 11, "reference_images": []}  # fmt: skip
    job = client.post("/generate/image", json=body)
    assert job.status_code == 200, job.text
    status = wait_terminal(client, job.json()["job_id"], timeout=60)
    assert status["status"] == "completed", status
    [image] = [i for i in client.get(f"/projects/{project}/images").json() if i["id"] == status["asset_id"]]
    for field, kind in (("id", str), ("url", str), ("path", str), ("filename", str), ("width", int), ("height", int),
                        ("meta_json", str)):  # fmt: skip
        assert isinstance(image[field], kind), (field, image)
    meta = json.loads(image["meta_json"])  # the front end's JSON.parse
    assert (meta["prompt"], meta["seed"]) == ("a lighthouse", 11)
    assert isinstance(meta["negative_prompt"], str)  # "" here: the tiny model has no use for one, and drops it
    assert (meta["width"], meta["height"]) == (image["width"], image["height"]) == (64, 48)
    assert meta["steps"] == meta["num_inference_steps"] and isinstance(meta["steps"], int)
    assert "guidance" in meta and meta["guidance_scale"] == meta["guidance"]
    assert meta["reference_elements"] == []
    assert meta == {**image["meta"], **meta}  # the asset's meta, with the front end's names added


def test_cors_allows_the_front_end_origins_by_default_and_only_those(service):
    client = service.client
    for origin in FRONT_END_ORIGINS:
        answer = client.get("/projects", headers={"Origin": origin})
        assert answer.headers.get("access-control-allow-origin") == origin
    preflight = client.options("/projects/default", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type"})  # fmt: skip
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "PUT" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-origin" not in client.get("/projects", headers={"Origin": "http://evil.test"}).headers
    refused = client.options(
        "/projects", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "GET"}
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_cors_origins_come_from_the_cli_or_the_environment_and_any_only_when_asked(tmp_path, monkeypatch):
    assert StudioSettings().cors_origins == list(FRONT_END_ORIGINS)
    monkeypatch.setenv("FLUX2_STUDIO_CORS_ORIGINS", "http://studio.test")
    assert StudioSettings().cors_origins == ["http://studio.test"]
    parser = argparse.ArgumentParser()
    serve.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["serve", "--cors", "http://a.test", "--cors", "http://b.test"])
    assert args.cors_origins == ["http://a.test", "http://b.test"]

    with running_studio(studio_settings(tmp_path, cors_origins=["*"])) as running:
        answer = running.client.get("/health", headers={"Origin": "http://anywhere.test"})
        assert answer.headers["access-control-allow-origin"] == "*"
        preflight = running.client.options("/projects", headers={"Origin": "http://anywhere.test",
                                                                 "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


def test_start_up_sweeps_stale_temporary_files_but_keeps_a_live_jobs_workspace(tmp_path):
    settings = studio_settings(tmp_path)
    engine = make_engine(settings.db_url)
    upgrade(engine)
    store = JobStore(engine)
    request = GenerationRequest(prompt="a boat", width=64, height=64).resolve(model_info("tiny"))
    live, done = (store.create(ImageJob(project_id="p0", request=request)) for _ in range(2))
    # `live` was running when the server stopped, for the last time it may: the restart fails it rather than
    # run it again, so nothing else touches its workspace; `done` finished long ago.
    with Session(engine) as session:
        session.exec(update(Job).where(Job.id == live.id).values(status=JobStatus.PROCESSING.value, attempts=2))
        session.exec(update(Job).where(Job.id == done.id).values(status=JobStatus.COMPLETED.value))
        session.commit()
    engine.dispose()
    tmp = tmp_path / "tmp"
    for workspace in (live.id, done.id, "job_gone"):
        (tmp / workspace).mkdir(parents=True)
        (tmp / workspace / f"{workspace}.jpg").write_bytes(b"partial")
    (tmp / "upload_general_abc.png").write_bytes(b"half an upload")

    with running_studio(settings) as running:
        assert sorted(path.name for path in tmp.iterdir()) == [live.id]
        assert (tmp / live.id / f"{live.id}.jpg").read_bytes() == b"partial"
        assert running.client.get(f"/status/{live.id}").json()["status"] == "failed"
