"""One user's session in the studio app, replayed call by call against the service over real HTTP (issue 11;
spec shared/spec/milimo-frontend-contract.md): each request body is built as the front end builds it
(mainza-ai/milimovideo, web-app/src), and each answer is checked for the fields, and their types, that the front
end reads. The steps share one service and run in file order, as the user makes them:

auto-save of the built-in project -> project list -> new project -> elements -> uploads -> image generation
followed by SSE and by /status after a reload -> gallery -> a cancelled job -> masks -> inpaint -> a shot ->
storyboard save, load and thumbnails -> deletions."""

import io
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from studio_server import image_bytes, mask_bytes, running_studio, studio_settings, wait_status, wait_terminal

# What every SSE event of a job carries for serverSlice.ts, and what utils/jobPoller.ts reads of /status.
PROGRESS_FIELDS = ("job_id", "progress", "status", "message", "enhanced_prompt")
POLLER_FIELDS = ("status", "progress", "status_message", "asset_id", "error_message", "video_url", "thumbnail_url",
                 "actual_frames", "enhanced_prompt", "eta_seconds")  # fmt: skip
SIZE = 64  # where the front end lets the user choose a size, the smallest that keeps the tiny model fast

# ImagesView.tsx's form as it starts (and after Reset): only the sizes are changed by the "user".
IMAGE_FORM = {"negative_prompt": "", "width": 1024, "height": 1024, "num_inference_steps": 25, "guidance_scale": 2.0,
              "seed": None, "reference_images": [], "enable_ae": False, "enable_true_cfg": False}  # fmt: skip

state: dict = {}  # what one step leaves for the next, as the front end's store keeps it


@pytest.fixture(scope="module")
def service(tmp_path_factory, sam, one_thread):
    data = tmp_path_factory.mktemp("studio-frontend-contract")
    with running_studio(studio_settings(data, segmentation_url=sam.url, segmentation_timeout_s=10)) as running:
        yield running


def is_seconds(value) -> bool:
    """Epoch seconds as the front end uses them (`new Date(ts * 1000)`): a number, close to now."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value - time.time()) < 600


def multipart(client, url: str, filename: str, data: bytes, mime: str, **form):
    """A FormData POST as the browser sends it: the file part with its name and type, the other fields as text."""
    return client.post(url, files={"file": (filename, data, mime)}, data=form)


def check_progress_events(events: list[tuple[str, dict]]) -> None:
    for name, data in events:
        if name == "progress":
            assert all(field in data for field in PROGRESS_FIELDS), data
            assert isinstance(data["progress"], int) and 0 <= data["progress"] <= 100, data
            assert isinstance(data["status"], str) and isinstance(data["message"], str), data


# ---------------------------------------------------------------------------------------------- projects


def test_1_the_built_in_project_is_auto_saved_then_a_project_is_made(service):
    client = service.client
    # projectSlice.ts: the app opens on its built-in project "default" and saves it whole.
    default = {"id": "default", "name": "Untitled Project", "shots": [{"id": "shot-init", "prompt": "",
               "negative_prompt": "", "seed": 42, "width": 768, "height": 512, "num_frames": 121, "fps": 25,
               "cfg_scale": 3.0, "enhance_prompt": True, "timeline": []}], "scenes": [], "resolution_w": 768,
               "resolution_h": 512, "fps": 25, "seed": 42, "script_content": ""}  # fmt: skip
    saved = client.put("/projects/default", json=default)
    assert saved.status_code == 200, saved.text

    # ProjectManager.tsx lists the projects: id, name, updated_at in epoch seconds.
    listed = client.get("/projects")
    assert listed.status_code == 200, listed.text
    [built_in] = [p for p in listed.json() if p["id"] == "default"]
    assert built_in["name"] == "Untitled Project" and is_seconds(built_in["updated_at"]), built_in

    # ... and makes a new one.
    body = {"name": "Harbour film", "resolution_w": 768, "resolution_h": 512, "fps": 25, "seed": 42}
    made = client.post("/projects", json=body)
    assert made.status_code == 201, made.text
    project = made.json()
    for field, kind in (("id", str), ("name", str), ("fps", int), ("resolution_w", int), ("resolution_h", int),
                        ("seed", int)):  # fmt: skip
        assert isinstance(project[field], kind), (field, project)
    assert {k: project[k] for k in body} == body and is_seconds(project["updated_at"])
    loaded = client.get(f"/projects/{project['id']}").json()  # loadProject
    assert loaded["shots"] == [] and loaded["scenes"] == [] and "script_content" in loaded
    state["project"] = project["id"]


def test_2_elements_are_made_edited_and_visualized(service):
    client, project = service.client, state["project"]
    # elementSlice.ts createElement: the four form fields, trigger_word "" when the user leaves it empty.
    tom = client.post(
        f"/projects/{project}/elements",
        json={"name": "Old Tom", "type": "character", "description": "a fisherman", "trigger_word": "@Tom"},
    )
    boat = client.post(f"/projects/{project}/elements", json={"name": "Red Boat", "type": "object",
                                                               "description": "", "trigger_word": ""})  # fmt: skip
    assert tom.status_code == 201 and boat.status_code == 201, (tom.text, boat.text)
    listed = {e["id"]: e for e in client.get(f"/projects/{project}/elements").json()}  # fetchElements
    for element in listed.values():
        for field in ("id", "name", "type", "description", "trigger_word"):
            assert isinstance(element[field], str), (field, element)
        assert "image_path" in element
    assert listed[tom.json()["id"]]["trigger_word"] == "@Tom"
    assert listed[boat.json()["id"]]["trigger_word"] == "@RedBoat"  # the studio backend's rule

    # updateElement: PUT with the four fields.
    form = {"name": "Old Tom", "type": "character", "description": "an old fisherman", "trigger_word": "@Tom"}
    edited = client.put(f"/elements/{tom.json()['id']}", json=form)
    assert edited.status_code == 200, edited.text
    assert {k: edited.json()[k] for k in form} == form

    # generateVisual: {prompt_override, guidance_scale: 2.0, enable_ae: false}, then /status each second.
    visual = client.post(
        f"/elements/{tom.json()['id']}/visualize",
        json={"prompt_override": "an old fisherman", "guidance_scale": 2.0, "enable_ae": False},
    )
    assert visual.status_code == 200, visual.text
    status = wait_terminal(client, visual.json()["job_id"], timeout=60)
    assert status["status"] == "completed" and isinstance(status["status_message"], str), status
    [pictured] = [e for e in client.get(f"/projects/{project}/elements").json() if e["id"] == tom.json()["id"]]
    assert isinstance(pictured["image_path"], str) and client.get(pictured["image_path"]).status_code == 200
    state.update(tom=tom.json()["id"], boat=boat.json()["id"], tom_picture=pictured["image_path"])


def test_3_a_reference_and_a_library_file_are_uploaded(service):
    client, project = service.client, state["project"]
    # ImagesView.tsx: file, project_id, type=reference; it reads access_path and url.
    reference = multipart(client, "/upload", "harbour.png", image_bytes(SIZE, SIZE, "blue"), "image/png",
                          project_id=project, type="reference")  # fmt: skip
    assert reference.status_code == 200, reference.text
    assert isinstance(reference.json()["access_path"], str) and reference.json()["url"].startswith("/")
    # MediaLibrary.tsx: file, project_id; it reads asset_id, url, access_path, type (image|video), filename.
    library = multipart(client, "/upload", "still.jpg", image_bytes(48, 32, "green", "JPEG"), "image/jpeg",
                        project_id=project)  # fmt: skip
    assert library.status_code == 200, library.text
    item = library.json()
    assert item["type"] == "image" and item["filename"].endswith(".jpg") and item["asset_id"], item
    assert item["access_path"] == item["url"] and client.get(item["url"]).status_code == 200

    uploads = client.get("/uploads")  # the library list
    assert uploads.status_code == 200, uploads.text
    by_id = {entry["asset_id"]: entry for entry in uploads.json()}
    for asset in (reference.json(), item):
        entry = by_id[asset["asset_id"]]
        assert entry["type"] == "image" and entry["url"] == asset["url"] and entry["filename"] == asset["filename"]
        assert is_seconds(entry["created_at"]), entry
    state.update(reference=reference.json()["access_path"], library_asset=item["asset_id"])


# ---------------------------------------------------------------------------------------------- images


def test_4_an_image_with_a_trigger_word_and_references_is_followed_by_sse_status_and_gallery(service):
    client, project = service.client, state["project"]
    # The "Insert Element Trigger" menu puts "@Tom" in the prompt and Tom's id in reference_images.
    body = {**IMAGE_FORM, "project_id": project, "prompt": "a pier at dawn @Tom", "width": SIZE, "height": SIZE,
            "reference_images": [state["tom"], state["reference"]]}  # fmt: skip
    with service.events() as events:
        queued = client.post("/generate/image", json=body)
        assert queued.status_code == 200, queued.text
        job_id = queued.json()["job_id"]
        assert isinstance(job_id, str)
        name, complete = events.wait_end(job_id, timeout=60)
        seen = events.of(job_id)
    assert name == "complete", complete
    check_progress_events(seen)
    assert any(n == "progress" for n, _ in seen)
    assert complete["url"] and complete["thumbnail_url"] and complete["actual_frames"] == 1, complete
    assert client.get(complete["url"]).status_code == 200 and client.get(complete["thumbnail_url"]).status_code == 200

    # The page is reloaded: jobPoller.ts asks /status.
    status = client.get(f"/status/{job_id}")
    assert status.status_code == 200, status.text
    status = status.json()
    assert all(field in status for field in POLLER_FIELDS), status
    assert status["status"] == "completed" and status["progress"] == 100 and status["error_message"] is None
    assert status["video_url"] == complete["url"] and status["thumbnail_url"] == complete["thumbnail_url"]
    assert status["actual_frames"] == 1 and status["eta_seconds"] is None
    assert "error" in status  # what the poller logs for a failed job

    # ImagesView.tsx finds the new image by asset_id in the gallery and reuses its settings from meta_json.
    gallery = client.get(f"/projects/{project}/images")
    assert gallery.status_code == 200, gallery.text
    [image] = [i for i in gallery.json() if i["id"] == status["asset_id"]]
    for field, kind in (("id", str), ("url", str), ("path", str), ("filename", str), ("width", int),
                        ("height", int), ("meta_json", str)):  # fmt: skip
        assert isinstance(image[field], kind), (field, image)
    meta = json.loads(image["meta_json"])
    assert meta["prompt"].startswith("a pier at dawn @Tom") and (meta["width"], meta["height"]) == (SIZE, SIZE)
    assert isinstance(meta["seed"], int) and isinstance(meta["steps"], int) and meta["steps"] > 0
    assert isinstance(meta["guidance"], int | float)
    # As the studio's backend stores them: the pictures used (Tom's, found by his id, and the upload), which a
    # click on the image puts back into reference_images.
    assert meta["reference_elements"] == [state["tom_picture"], state["reference"]], meta
    # Projects saved by the app's own backend hold /generated/{job_id}.jpg URLs (InspectorPanel's Extend also
    # finds the job id there); they lead to the same files.
    for legacy, url in ((f"/generated/{job_id}.jpg", complete["url"]),
                        (f"/generated/{job_id}_thumb.jpg", complete["thumbnail_url"])):  # fmt: skip
        answer = client.get(legacy)
        assert answer.status_code == 200 and answer.content == client.get(url).content, legacy
    assert client.get("/generated/job_000000000000.jpg").status_code == 404
    state.update(image_asset=image["id"], meta=meta)


def test_5_the_image_settings_are_reused_for_a_second_job_which_is_cancelled(service):
    client, project, meta = service.client, state["project"], state["meta"]
    # A click on the image restores prompt, seed, guidance and references from meta_json; the user then asks for
    # a bigger, longer image (slow enough to be cancelled while it runs).
    body = {**IMAGE_FORM, "project_id": project, "prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"],
            "width": 256, "height": 256, "num_inference_steps": 200, "guidance_scale": meta["guidance"],
            "seed": int(str(meta["seed"])),
            # [...selectedReferences, uploadedRef]: the upload is still in the form, so it comes twice
            "reference_images": [*meta["reference_elements"], state["reference"]]}  # fmt: skip
    queued = client.post("/generate/image", json=body)
    assert queued.status_code == 200, queued.text
    job_id = queued.json()["job_id"]
    active = client.get(f"/projects/{project}/active_jobs")  # checkActiveJobs, after a reload
    assert active.status_code == 200, active.text
    assert any(j["job_id"] == job_id and j["type"] == "image" and j["status"] in ("pending", "processing")
               for j in active.json()), active.json()  # fmt: skip
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200  # the answer is ignored
    status = wait_terminal(client, job_id, timeout=60)  # the poller's next /status
    assert status["status"] == "cancelled", status
    assert all(j["job_id"] != job_id for j in client.get(f"/projects/{project}/active_jobs").json())


# ---------------------------------------------------------------------------------------------- masks, inpaint


def test_6_masks_come_from_the_segmentation_service_as_multipart(service, sam):
    client = service.client
    frame = ("frame.jpg", image_bytes(SIZE, SIZE, "gray", "JPEG"), "image/jpeg")
    # MaskingCanvas.tsx: image, points and labels as JSON strings; the answer is the mask as a PNG body.
    mask = client.post("/edit/segment", files={"image": frame}, data={"points": "[[40,20]]", "labels": "[1]"})
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png", mask.text
    assert Image.open(io.BytesIO(mask.content)).size == (SIZE, SIZE)
    # ... and image, text, confidence for detection: {objects: [{id, mask, bbox, score, label}]}.
    found = client.post("/edit/detect", files={"image": frame}, data={"text": "boat", "confidence": "0.3"})
    assert found.status_code == 200, found.text
    [thing] = found.json()["objects"]
    assert {"id", "mask", "bbox", "score", "label"} <= thing.keys() and thing["label"] == "boat"
    assert [path for path, _ in sam.requests[-2:]] == ["/predict/mask", "/detect"]


def test_7_inpaint_as_shot_slice_does_it_ends_with_a_thumbnail_and_no_url(service):
    client, project = service.client, state["project"]
    frame = multipart(client, "/upload", "edit_frame.jpg", image_bytes(SIZE, SIZE, "gray", "JPEG"), "image/jpeg",
                      project_id=project)  # fmt: skip
    mask = multipart(client, "/upload", "edit_mask.png", mask_bytes(SIZE, SIZE), "image/png", project_id=project)
    assert frame.status_code == 200 and mask.status_code == 200, (frame.text, mask.text)
    job_id = f"job_{uuid.uuid4().hex[:8]}"  # `job_${uuidv4().substring(0, 8)}`
    assert re.fullmatch(r"job_[0-9a-f]{8}", job_id)
    with service.events() as events:
        queued = client.post("/edit/inpaint", params={"job_id": job_id},
                             json={"image_path": frame.json()["access_path"], "mask_path": mask.json()["access_path"],
                                   "prompt": "a red hat"})  # fmt: skip
        assert queued.status_code == 200 and queued.json()["job_id"] == job_id, queued.text
        name, complete = events.wait_end(job_id, timeout=60)
        seen = events.of(job_id)
    assert name == "complete", complete
    check_progress_events(seen)
    assert complete["type"] == "inpaint" and "url" not in complete, complete  # a url would replace the video
    assert complete["thumbnail_url"] and not complete.get("actual_frames")
    picture = Image.open(io.BytesIO(client.get(complete["thumbnail_url"]).content))
    assert picture.size == (SIZE, SIZE)  # the full inpainted image, not a reduced thumbnail
    state["inpainted"] = complete["asset_id"]


# ---------------------------------------------------------------------------------------------- shots


def shot_config(shot_id: str, num_frames: int) -> dict:
    """InspectorPanel.tsx's shot_config (steps 40 and cfg 3.0 are fixed; the shot's size is the user's)."""
    return {"id": shot_id, "prompt": "a red boat leaves the harbour", "negative_prompt": "", "seed": 42,
            "width": SIZE, "height": SIZE, "fps": 25, "num_frames": num_frames, "num_inference_steps": 40,
            "cfg_scale": 3.0, "enhance_prompt": False, "upscale": False, "pipeline_override": "auto",
            "auto_continue": False, "timeline": []}  # fmt: skip


def test_8_a_one_frame_shot_is_an_image_and_a_video_is_501_naming_the_limit(service):
    client, project = service.client, state["project"]
    video = client.post("/generate/advanced", json={"project_id": project, "shot_config": shot_config("shot-1", 121)})
    assert video.status_code == 501 and "num_frames" in video.json()["detail"], video.text
    with service.events() as events:
        queued = client.post("/generate/advanced", json={"project_id": project,
                                                         "shot_config": shot_config("shot-1", 1)})  # fmt: skip
        assert queued.status_code == 200, queued.text
        job_id = queued.json()["job_id"]
        name, complete = events.wait_end(job_id, timeout=60)
        seen = events.of(job_id)
    assert name == "complete", complete
    check_progress_events(seen)
    # serverSlice.ts: url -> the shot's videoUrl, thumbnail_url, actual_frames -> numFrames.
    assert complete["url"] and complete["thumbnail_url"] and complete["actual_frames"] == 1, complete
    polled = wait_status(client, job_id, lambda s: s["status"] == "completed")  # pollJobStatus after a reload
    assert polled["video_url"] == complete["url"] and polled["actual_frames"] == 1
    state["shot_job"] = job_id
    state["shot_video"] = complete["url"]


def test_9_the_storyboard_is_saved_loaded_and_given_thumbnails(service):
    client, project = service.client, state["project"]
    scenes = [{"id": "scene-1", "index": 0, "name": "Departure", "script_content": "EXT. HARBOUR - DAWN"}]
    shots = [
        {"id": "shot-1", "scene_id": "scene-1", "index": 0, "prompt": "a red boat leaves the harbour",
         "negative_prompt": "", "seed": 42, "width": SIZE, "num_frames": 1, "cfg_scale": 3.0, "fps": 25,
         "enhance_prompt": False, "upscale": False, "pipeline_override": "auto", "track_index": 0, "start_frame": 0,
         "trim_in": 0, "trim_out": 0, "auto_continue": False, "action": "The boat leaves", "dialogue": None,
         "character": "Old Tom", "timeline": [], "last_job_id": state["shot_job"], "thumbnail_url": None,
         "video_url": state["shot_video"]},
        {"id": "shot-2", "scene_id": "scene-1", "index": 1, "prompt": "gulls over the pier", "seed": 43,
         "width": SIZE, "height": SIZE, "num_frames": 121, "timeline": [], "thumbnail_url": None},
    ]  # fmt: skip
    whole = {
        "id": project,
        "name": "Harbour film",
        "fps": 25,
        "seed": 42,
        "resolution_w": SIZE,
        "resolution_h": SIZE,
        "script_content": "EXT. HARBOUR - DAWN",
        "scenes": scenes,
        "shots": shots,
    }
    saved = client.put(f"/projects/{project}", json=whole)  # saveProject
    assert saved.status_code == 200, saved.text
    loaded = client.get(f"/projects/{project}").json()  # loadProject
    assert loaded["script_content"] == "EXT. HARBOUR - DAWN" and loaded["scenes"] == scenes
    assert [s["id"] for s in loaded["shots"]] == ["shot-1", "shot-2"]
    first = loaded["shots"][0]
    assert first["last_job_id"] == state["shot_job"] and first["video_url"] == state["shot_video"]
    assert first["height"] == SIZE  # left out by the save: the project's

    with service.events() as events:  # shotSlice.ts generateThumbnail: one call per shot, {shot_ids, force}
        jobs = {}
        for shot_id in ("shot-1", "shot-2"):
            answer = client.post(f"/projects/{project}/storyboard/generate-thumbnails",
                                 json={"shot_ids": [shot_id], "force": False})  # fmt: skip
            assert answer.status_code == 200, answer.text
            result = next(r for r in answer.json()["results"] if r["shot_id"] == shot_id)
            assert result["status"] == "queued" and isinstance(result["job_id"], str), result  # -> lastJobId
            jobs[shot_id] = result["job_id"]
        ended = {shot_id: events.wait_end(job_id, timeout=60) for shot_id, job_id in jobs.items()}
    shots_now = {s["id"]: s for s in client.get(f"/projects/{project}").json()["shots"]}
    for shot_id, (name, complete) in ended.items():
        assert name == "complete", complete
        assert complete["job_id"] == jobs[shot_id] and complete["type"] == "thumbnail", complete
        assert complete["shot_id"] == shot_id, complete
        assert complete["url"] and not complete.get("actual_frames"), complete  # url -> thumbnailUrl only
        assert shots_now[shot_id]["thumbnail_url"] == complete["url"]
    assert shots_now["shot-1"]["video_url"] == state["shot_video"]  # the thumbnail leaves the video alone


# ---------------------------------------------------------------------------------------------- deletions


def test_10_deletions_answer_cleanly(service):
    client, project = service.client, state["project"]
    # The gallery's delete is fired twice: the second is a clean 404 with a message, never a 500.
    first = client.delete(f"/assets/{state['image_asset']}")
    assert first.status_code == 200, first.text
    second = client.delete(f"/assets/{state['image_asset']}")
    assert second.status_code == 404 and isinstance(second.json()["detail"], str), second.text
    assert all(i["id"] != state["image_asset"] for i in client.get(f"/projects/{project}/images").json())
    # ... and the two arrive together (a browser sends them on pointer-down and on click): one removes the asset.
    library = [item for item in client.get("/uploads").json() if item["asset_id"] == state["library_asset"]]

    def delete_library_file(_):
        with service.client_for() as own:
            return own.delete(f"/assets/{state['library_asset']}")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(delete_library_file, range(8)))
    assert sorted(a.status_code for a in answers) == [200] + [404] * 7, [a.text for a in answers]
    assert library and client.get(library[0]["url"]).status_code == 404

    gone = client.delete(f"/elements/{state['boat']}")  # deleteElement
    assert gone.status_code == 200, gone.text
    assert [e["id"] for e in client.get(f"/projects/{project}/elements").json()] == [state["tom"]]

    deleted = client.delete(f"/projects/{project}")
    assert deleted.status_code == 200, deleted.text
    assert client.get(f"/projects/{project}").status_code == 404
    assert all(p["id"] != project for p in client.get("/projects").json())
    assert client.get(f"/projects/{project}/images").json() == []
