"""The studio front end's storyboard over real HTTP with the tiny model (issue 11): a project saved whole
(`PUT /projects/{id}` with its scenes and shots) loads back as projectSlice.ts reads it, an older database
upgrades in place, storyboard thumbnails are image jobs whose pictures become the shots' thumbnails (announced
as serverSlice.ts reads them), and the last frame of an output is its image (InspectorPanel.tsx's Extend)."""

import pytest
from sqlalchemy import text
from sqlmodel import Session, func, select
from studio_server import running_studio, studio_settings, wait_terminal

from flux2.registry import model_info
from flux2.request import GenerationRequest
from flux2.studio.db import make_engine, upgrade
from flux2.studio.payloads import ImageJob
from flux2.studio.records import Scene, Shot

# Two scenes and three shots as saveProject sends them: snake_case, no `height` (its save leaves it out), a
# timeline item with `frameIndex`, and fields this service has no column for (`camera`, `status`, `notes`).
SCENES = [
    {"id": "scene-1", "index": 0, "name": "The chase", "script_content": "EXT. ALLEY - NIGHT"},
    {"id": "scene-2", "index": 1, "name": "The escape", "script_content": "INT. CAR - NIGHT"},
]
SHOTS = [
    {"id": "shot-a", "scene_id": "scene-1", "index": 0, "prompt": "a runner in a dark alley", "negative_prompt": "",
     "seed": 7, "width": 64, "num_frames": 121, "cfg_scale": 3.0, "enhance_prompt": True, "upscale": False,
     "pipeline_override": "auto", "track_index": 0, "start_frame": 0, "trim_in": 0, "trim_out": 0,
     "auto_continue": False, "action": "Hero runs", "dialogue": None, "character": "Hero",
     "timeline": [{"type": "image", "path": "/uploads/a.png", "frameIndex": 0, "strength": 1.0}],
     "last_job_id": None, "thumbnail_url": None, "video_url": None,
     "camera": {"move": "dolly", "lens": 35}, "status": "pending"},
    {"id": "shot-b", "scene_id": "scene-1", "index": 1, "prompt": "a car skids", "seed": 8, "width": 64,
     "height": 64, "num_frames": 1, "timeline": [], "notes": ["wet street", 2]},
    {"id": "shot-c", "scene_id": "scene-2", "index": 0, "prompt": "a city at night", "seed": 9, "width": 64,
     "height": 64, "timeline": []},
]  # fmt: skip
PROJECT = {"name": "Storyboard", "fps": 24, "seed": 42, "resolution_w": 64, "resolution_h": 64,
           "script_content": "EXT. ALLEY - NIGHT\nINT. CAR - NIGHT"}  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    with running_studio(studio_settings(tmp_path_factory.mktemp("studio-storyboard"))) as running:
        yield running


def save(client, project_id: str, scenes=SCENES, shots=SHOTS, **fields):
    return client.put(f"/projects/{project_id}", json={"id": project_id, **PROJECT, "scenes": scenes,
                                                       "shots": shots, **fields})  # fmt: skip


def stored_rows(service, project_id: str) -> tuple[int, int]:
    with Session(service.studio.engine) as session:
        scenes = session.exec(select(func.count()).select_from(Scene).where(Scene.project_id == project_id)).one()
        shots = session.exec(select(func.count()).select_from(Shot).where(Shot.project_id == project_id)).one()
    return scenes, shots


def assert_loaded(loaded: dict, scenes: list[dict], shots: list[dict]) -> None:
    """What loadProject reads: every field that was sent, with its value, in the order sent."""
    assert loaded["scenes"] == scenes
    assert [shot["id"] for shot in loaded["shots"]] == [shot["id"] for shot in shots]
    for sent, got in zip(shots, loaded["shots"], strict=True):
        for name, value in sent.items():
            if name == "timeline":
                continue
            assert got[name] == value, (sent["id"], name, got.get(name))


def test_a_saved_project_loads_back_with_its_scenes_shots_and_script(service):
    client = service.client
    saved = save(client, "film-1")
    assert saved.status_code == 200, saved.text
    loaded = client.get("/projects/film-1").json()
    assert loaded["name"] == "Storyboard" and loaded["script_content"] == PROJECT["script_content"]
    assert_loaded(loaded, SCENES, SHOTS)
    first = loaded["shots"][0]
    assert first["camera"] == {"move": "dolly", "lens": 35} and first["status"] == "pending"  # kept as sent
    assert loaded["shots"][1]["notes"] == ["wet street", 2]
    assert first["height"] == PROJECT["resolution_h"]  # left out by the front end's save: the project's
    assert first["fps"] == PROJECT["fps"] and first["project_id"] == "film-1"
    # Saved as `frameIndex`, loaded from `frame_index` by loadProject: both are there.
    assert first["timeline"] == [{"type": "image", "path": "/uploads/a.png", "frameIndex": 0, "frame_index": 0,
                                  "strength": 1.0}]  # fmt: skip
    assert save(client, "film-1").status_code == 200  # saving it again changes nothing
    assert client.get("/projects/film-1").json()["shots"] == loaded["shots"]


def test_a_second_save_replaces_the_scenes_and_shots(service):
    client = service.client
    assert save(client, "film-2").status_code == 200
    shots = [{**SHOTS[0], "prompt": "a runner, closer"}, SHOTS[1]]  # shot-c (and its scene) removed
    assert save(client, "film-2", scenes=SCENES[:1], shots=shots).status_code == 200
    loaded = client.get("/projects/film-2").json()
    assert_loaded(loaded, SCENES[:1], shots)
    assert stored_rows(service, "film-2") == (1, 2)
    # A save without `shots` (or `scenes`) keeps what is stored.
    assert client.put("/projects/film-2", json={"name": "Renamed"}).status_code == 200
    again = client.get("/projects/film-2").json()
    assert again["name"] == "Renamed" and again["shots"] == loaded["shots"] and again["scenes"] == loaded["scenes"]
    # Deleting the project deletes its storyboard.
    assert client.delete("/projects/film-2").status_code == 200
    assert stored_rows(service, "film-2") == (0, 0)


BAD_SAVES = {
    "an unsafe shot id": ({"shots": [{**SHOTS[2], "id": "../x"}]}, "shots[0].id must be"),
    "a shot id given twice": ({"shots": [SHOTS[2], SHOTS[2]]}, "shots[1].id 'shot-c' is given twice"),
    "an unsafe scene id": ({"scenes": [{**SCENES[0], "id": "a b"}]}, "scenes[0].id must be"),
    "a shot in no such scene": ({"shots": [SHOTS[0], {**SHOTS[2], "scene_id": "scene-9"}]},
                                "shots[1].scene_id 'scene-9': no such scene"),
    "scenes that leave stored shots out": ({"scenes": SCENES[1:], "shots": None}, "which this save leaves out"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SAVES, ids=list(BAD_SAVES))
def test_bad_input_is_refused_naming_the_item_and_stores_nothing(service, case):
    client = service.client
    changes, message = BAD_SAVES[case]
    assert save(client, "film-3").status_code == 200
    before = client.get("/projects/film-3").json()
    body = {"id": "film-3", **PROJECT, "name": "Changed", "scenes": SCENES, "shots": SHOTS, **changes}
    answer = client.put("/projects/film-3", json={key: value for key, value in body.items() if value is not None})
    assert answer.status_code == 422 and message in answer.text, answer.text
    assert client.get("/projects/film-3").json() == before  # the project's fields included
    if changes.get("shots") is not None:  # nor is a project that a refused save would have created
        assert client.put("/projects/film-new", json={**body, "id": "film-new"}).status_code == 422
        assert client.get("/projects/film-new").status_code == 404


def test_a_database_of_the_previous_revision_upgrades_in_place(tmp_path):
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'studio.db'}"
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as connection:  # a project as revision 0001 stored it
        connection.execute(text("INSERT INTO project (id, name, created_at, updated_at, resolution_w, resolution_h, "
                                "fps, seed) VALUES ('old', 'Old film', '2025-01-01 00:00:00', "
                                "'2025-01-01 00:00:00', 768, 512, 25, 42)"))  # fmt: skip
    engine.dispose()
    with running_studio(studio_settings(data)) as running:  # the service migrates it at start
        loaded = running.client.get("/projects/old").json()
        assert loaded["name"] == "Old film" and loaded["shots"] == [] and loaded["scenes"] == []
        assert save(running.client, "old", name="Old film").status_code == 200
        assert_loaded(running.client.get("/projects/old").json(), SCENES, SHOTS)


def test_thumbnails_are_image_jobs_written_to_the_shots_and_announced_as_the_front_end_reads_them(service):
    client = service.client
    shots = [*SHOTS[1:], {**SHOTS[0], "thumbnail_url": "/projects/film-4/thumbnails/drawn.jpg"}]
    assert save(client, "film-4", shots=shots).status_code == 200
    with service.events() as events:
        # shotSlice.ts sends `shot_ids` only: shot-a has a thumbnail, so it is skipped.
        answer = client.post("/projects/film-4/storyboard/generate-thumbnails",
                             json={"shot_ids": ["shot-b", "shot-c", "shot-a"]})  # fmt: skip
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [(r["shot_id"], r["status"]) for r in results] == [("shot-b", "queued"), ("shot-c", "queued"),
                                                                   ("shot-a", "skipped")]  # fmt: skip
        ended = {r["shot_id"]: events.wait_end(r["job_id"], timeout=120) for r in results if r["job_id"]}
    loaded = {shot["id"]: shot for shot in client.get("/projects/film-4").json()["shots"]}
    for shot_id, (name, complete) in ended.items():
        assert name == "complete", complete
        # serverSlice.ts: a `thumbnail` event finds its shot by `shot_id` and takes `url` as its thumbnail.
        assert complete["type"] == "thumbnail" and complete["shot_id"] == shot_id
        assert complete["url"] and complete["thumbnail_url"] == complete["url"]
        assert not complete.get("actual_frames") and complete["video_url"] is None  # the shot keeps its video
        assert loaded[shot_id]["thumbnail_url"] == complete["url"]
        picture = client.get(complete["url"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    assert loaded["shot-a"]["thumbnail_url"] == shots[-1]["thumbnail_url"]
    assert loaded["shot-b"]["prompt"] == SHOTS[1]["prompt"] and loaded["shot-b"]["notes"] == SHOTS[1]["notes"]
    forced = client.post("/projects/film-4/storyboard/generate-thumbnails", json={"shot_ids": ["shot-a"],
                                                                                  "force": True})  # fmt: skip
    [result] = forced.json()["results"]
    assert result["status"] == "queued"
    status = wait_terminal(client, result["job_id"], timeout=120)
    assert status["status"] == "completed" and status["shot_id"] == "shot-a"
    assert client.get("/projects/film-4").json()["shots"][-1]["thumbnail_url"] == status["url"]


def test_thumbnails_of_unknown_shots_or_projects_are_404_and_queue_nothing(service):
    client = service.client
    assert save(client, "film-5").status_code == 200
    jobs = service.job_count()
    answer = client.post("/projects/film-5/storyboard/generate-thumbnails",
                         json={"shot_ids": ["shot-b", "shot-x"]})  # fmt: skip
    assert answer.status_code == 404 and "'shot-x'" in answer.json()["detail"], answer.text
    answer = client.post("/projects/no-such/storyboard/generate-thumbnails", json={"shot_ids": ["shot-b"]})
    assert answer.status_code == 404 and "no-such" in answer.json()["detail"]
    assert client.post("/projects/film-5/storyboard/generate-thumbnails", json={"shot_ids": []}).status_code == 422
    assert service.job_count() == jobs


def test_last_frame_of_an_image_output_is_the_image(service):
    client = service.client
    assert save(client, "film-6").status_code == 200
    job_id = client.post("/generate/image", json={"project_id": "film-6", "prompt": "a door", "width": 64,
                                                  "height": 64}).json()["job_id"]  # fmt: skip
    status = wait_terminal(client, job_id, timeout=120)
    assert status["status"] == "completed"
    for method in ("post", "get"):  # InspectorPanel.tsx's Extend asks with POST and reads `url`
        answer = client.request(method, f"/shot/{job_id}/last-frame")
        assert answer.status_code == 200, answer.text
        assert answer.json()["url"] == status["video_url"] and answer.json()["path"] == status["video_url"]
    assert client.get(answer.json()["url"]).content[:3] == b"\xff\xd8\xff"  # the JPEG itself
    assert client.post("/shot/job_nothere/last-frame").status_code == 404
    pending = service.studio.jobs.create(ImageJob(project_id="film-6", request=GenerationRequest(
        prompt="never run", width=64, height=64).resolve(model_info("tiny"))))  # fmt: skip
    answer = client.post(f"/shot/{pending.id}/last-frame")
    assert answer.status_code == 404 and "pending" in answer.json()["detail"]
    service.client.post(f"/jobs/{pending.id}/cancel")
