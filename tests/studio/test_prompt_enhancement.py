"""Prompt enhancement in the studio (issue 11): `enhance_prompt` on /generate/image and on a single-frame shot
uses the service's upsampler (here OpenRouter's API, played by the loopback chat server), reports the enhanced
prompt in SSE `progress` events, /status and the asset's record, and never fails a job. Real HTTP throughout."""

import json

import pytest
from chat_api import Reply, completion, running_chat_server
from studio_server import create_project, running_studio, studio_settings, wait_terminal

PROMPT = "a lighthouse at dusk"
ENHANCED = "A tall white lighthouse on a rocky cape at dusk, warm beam over a violet sea, long exposure."
SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def chat():
    with running_chat_server() as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory, chat, one_thread):
    data = tmp_path_factory.mktemp("studio-enhancement")
    settings = studio_settings(data, upsample="openrouter", upsample_url=chat.base_url, upsample_model="test/model")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OPENROUTER_API_KEY", "test-key")  # read when the upsampler is made, at the first job
        with running_studio(settings) as running:
            yield running


@pytest.fixture
def fresh_chat(chat):
    chat.replies.clear()
    chat.received.clear()
    return chat


def image_record(client, project: str, asset_id: str) -> dict:
    [image] = [img for img in client.get(f"/projects/{project}/images").json() if img["id"] == asset_id]
    return json.loads(image["meta_json"])["record"]


def run_job(service, route: str, body: dict) -> tuple[dict, list[tuple[str, dict]]]:
    """Queue a job, follow it to its end; its final /status and every SSE event it sent."""
    with service.events() as events:
        answer = service.client.post(route, json=body)
        assert answer.status_code == 200, answer.text
        job_id = answer.json()["job_id"]
        events.wait_end(job_id, timeout=60)
    return wait_terminal(service.client, job_id), events.of(job_id)


@pytest.mark.parametrize("route", ["/generate/image", "/generate/advanced"])
def test_enhanced_prompt_in_progress_status_and_record(service, fresh_chat, route):
    fresh_chat.replies.append(Reply(200, completion(ENHANCED)))
    project = create_project(service.client, "Enhance")
    fields = {"prompt": PROMPT, "enhance_prompt": True, **SMALL}
    if route == "/generate/image":
        body = {"project_id": project, **fields}
    else:  # the shot inspector's single frame
        body = {"project_id": project, "shot_config": {**fields, "num_frames": 1, "cfg_scale": 3.0}}
    status, events = run_job(service, route, body)
    assert status["status"] == "completed", status
    progress = [data for name, data in events if name == "progress" and data["status"] == "processing"]
    first = next(i for i, data in enumerate(progress) if data["enhanced_prompt"] == ENHANCED)
    assert progress[first]["status_message"] == "Prompt enhanced"
    assert all(data["enhanced_prompt"] == ENHANCED for data in progress[first:])  # known from then on
    assert status["enhanced_prompt"] == ENHANCED
    record = image_record(service.client, project, status["asset_id"])
    assert record["prompt"] == PROMPT and record["upsampled_prompt"] == ENHANCED
    assert record["upsampling_error"] is None
    [sent] = fresh_chat.received
    assert sent.path == "/api/v1/chat/completions" and sent.headers["authorization"] == "Bearer test-key"
    assert sent.body["model"] == "test/model" and sent.body["messages"][-1]["content"] == PROMPT


def test_a_failing_upsampler_never_fails_the_job(service, fresh_chat):
    # Answers 500 to the first try and every retry (Retry-After: 0 keeps the test quick).
    fresh_chat.replies.extend(Reply(500, {"error": {"message": "upstream down"}}, {"Retry-After": "0"})
                              for _ in range(4))  # fmt: skip
    project = create_project(service.client, "Failing upsampler")
    status, events = run_job(service, "/generate/image",
                             {"project_id": project, "prompt": PROMPT, "enhance_prompt": True, **SMALL})  # fmt: skip
    assert status["status"] == "completed", status
    assert status["enhanced_prompt"] is None and len(fresh_chat.received) == 4
    messages = [data["status_message"] for name, data in events if name == "progress"]
    assert any(m.startswith("Prompt enhancement failed") and "HTTP 500" in m for m in messages), messages
    assert all(data["enhanced_prompt"] is None for _, data in events)
    record = image_record(service.client, project, status["asset_id"])
    assert record["prompt"] == PROMPT and record["upsampled_prompt"] is None
    assert "HTTP 500" in record["upsampling_error"]


def test_enhance_prompt_false_leaves_the_prompt_alone(service, fresh_chat):
    project = create_project(service.client, "No enhancement")
    for body in ({"project_id": project, "prompt": PROMPT, **SMALL},  # the image view never sends the field
                 {"project_id": project, "prompt": PROMPT, "enhance_prompt": False, **SMALL}):  # fmt: skip
        status, events = run_job(service, "/generate/image", body)
        assert status["status"] == "completed", status
        assert status["enhanced_prompt"] is None
        assert not any("enhance" in data["status_message"].lower() for _, data in events)
        record = image_record(service.client, project, status["asset_id"])
        assert record["prompt"] == PROMPT and record["upsampled_prompt"] is None and record["upsampling_error"] is None
    shot = {"prompt": PROMPT, "num_frames": 1, "enhance_prompt": None, **SMALL}  # an unset switch, as null
    status, _ = run_job(service, "/generate/advanced", {"project_id": project, "shot_config": shot})
    assert status["status"] == "completed" and status["enhanced_prompt"] is None, status
    assert fresh_chat.received == []


def test_without_an_upsampler_the_job_runs_and_says_enhancement_is_off(tmp_path, one_thread):
    with running_studio(studio_settings(tmp_path)) as service:  # upsample="none": the default
        project = create_project(service.client, "Off")
        body = {"project_id": project, "prompt": PROMPT, "enhance_prompt": True, **SMALL}
        status, events = run_job(service, "/generate/image", body)
    assert status["status"] == "completed", status
    assert "prompt enhancement is off" in status["status_message"], status
    assert any("prompt enhancement is off" in data["status_message"] for name, data in events if name == "progress")
    assert status["enhanced_prompt"] is None


def test_an_upsampler_that_cannot_be_made_leaves_enhancement_off(tmp_path, one_thread):
    empty = tmp_path / "no-model"  # a local model folder without a model: loading it fails at once, offline
    empty.mkdir()
    settings = studio_settings(tmp_path / "data", upsample="local", upsample_model=str(empty))
    with running_studio(settings) as service:
        project = create_project(service.client, "Broken upsampler")
        body = {"project_id": project, "prompt": PROMPT, "enhance_prompt": True, **SMALL}
        first, _ = run_job(service, "/generate/image", body)
        second, _ = run_job(service, "/generate/image", body)  # the service keeps running jobs
    for status in (first, second):
        assert status["status"] == "completed", status
        assert "prompt enhancement is off: the local upsampler could not be set up" in status["status_message"]
        assert status["enhanced_prompt"] is None
