"""Studio jobs over real HTTP on 127.0.0.1 with the tiny model: cancellation of queued and running jobs (image and
inpaint), many clients at once with cancellations at random moments while /health stays quick, and restarts
(a crash, then a graceful stop) of `flux2 serve` run as a separate process."""

import logging
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from studio_server import (
    TERMINAL,
    EventStream,
    Latencies,
    create_project,
    image_bytes,
    mask_bytes,
    running_studio,
    studio_settings,
    upload,
    wait_status,
    wait_terminal,
)

from flux2.provenance import read_provenance

log = logging.getLogger(__name__)  # the load test's figures and the restart outcome: --log-cli-level=INFO
LONG = {"width": 128, "height": 128, "num_inference_steps": 200}  # about 3 s: long enough to cancel mid-denoise
SHORT = {"width": 64, "height": 64}  # the tiny model's 4 steps: a fraction of a second


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread):
    # A deep event queue: the load test checks every job's final event, and must not lose one to a full queue.
    settings = studio_settings(tmp_path_factory.mktemp("studio-jobs"), sse_queue_size=10_000)
    with running_studio(settings) as running:
        yield running


def generated_files(service, project_id: str) -> set[str]:
    folder = Path(service.settings.data_dir) / "projects" / project_id / "generated"
    return {path.name for path in folder.glob("*")} if folder.is_dir() else set()


def assets_by_job(client: httpx.Client, project_id: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for asset in client.get(f"/projects/{project_id}/images").json():
        if asset["job_id"]:
            found.setdefault(asset["job_id"], []).append(asset)
    return found


def assert_left_nothing(service, project_id: str, *job_ids: str) -> None:
    """A cancelled job has no asset, no record of one, no output file and no work folder."""
    client = service.client
    by_job = assets_by_job(client, project_id)
    files = generated_files(service, project_id)
    for job_id in job_ids:
        status = client.get(f"/status/{job_id}").json()
        assert status["status"] == "cancelled" and status["asset_id"] is None, status
        assert status["status_message"] == "Cancelled" and status["error_message"] is None, status
        assert job_id not in by_job
        assert not any(name.startswith(job_id) for name in files), files
        assert not (Path(service.settings.data_dir) / "tmp" / job_id).exists()


def cancel(client: httpx.Client, job_id: str) -> str:
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["job_id"] == job_id
    return response.json()["status"]


def is_denoise_step(data: dict, at_least: int = 0) -> bool:
    message = data.get("status_message") or ""
    return message.startswith("Step ") and int(message.split()[1].split("/")[0]) >= at_least


def test_cancel_a_queued_and_a_running_image_job(service):
    client = service.client
    project = create_project(client, "Cancel images")
    with EventStream(service) as events:
        running = client.post("/generate/image", json={"project_id": project, "prompt": "long", **LONG}).json()
        queued = client.post("/generate/image", json={"project_id": project, "prompt": "queued", **SHORT}).json()
        assert running["status"] == queued["status"] == "queued"
        assert cancel(client, queued["job_id"]) == "cancelled"  # still behind the long one: cancelled at once
        name, _ = events.wait_end(queued["job_id"])
        assert name == "cancelled"
        assert cancel(client, queued["job_id"]) == "not_found_or_already_done"

        events.wait_for(lambda n, d: d["job_id"] == running["job_id"] and n == "progress" and is_denoise_step(d, 5))
        active = client.get(f"/projects/{project}/active_jobs").json()
        assert [(j["job_id"], j["status"]) for j in active] == [(running["job_id"], "processing")]
        assert {"status", "progress", "status_message", "error_message", "asset_id", "seed"} <= active[0].keys()
        gpu = client.get("/gpu/status").json()
        assert gpu["busy"] is True and gpu["running"] == running["job_id"], gpu
        busy = client.delete(f"/projects/{project}")
        assert busy.status_code == 409 and "cancel" in busy.json()["detail"], busy.text
        assert cancel(client, running["job_id"]) == "cancelling"
        name, data = events.wait_end(running["job_id"])
        assert name == "cancelled", data
        steps = [d for n, d in events.of(running["job_id"]) if n == "progress"]
        assert is_denoise_step(steps[-1]) and steps[-1]["status_message"] != "Step 200/200", steps[-1]
        assert [n for n, _ in events.of(queued["job_id"])] == ["cancelled"]  # it never started

        after = client.post("/generate/image", json={"project_id": project, "prompt": "after", **SHORT}).json()
        name, _ = events.wait_end(after["job_id"])
    assert name == "complete"  # the worker goes on with the queue
    assert_left_nothing(service, project, running["job_id"], queued["job_id"])
    assert set(assets_by_job(client, project)) == {after["job_id"]}
    assert generated_files(service, project) == {f"{after['job_id']}.jpg"}
    assert client.get("/gpu/status").json()["busy"] is False


def test_cancel_a_queued_and_a_running_inpaint_job(service):
    client = service.client
    project = create_project(client, "Cancel inpaint")
    # 200 denoising steps at 256 px: long enough to cancel between two of them on a loaded machine.
    big, big_mask = upload(client, image_bytes(256, 256), project), upload(client, mask_bytes(256, 256), project)
    small, small_mask = upload(client, image_bytes(), project), upload(client, mask_bytes(), project)
    with EventStream(service) as events:
        body = {"image_path": big["url"], "mask_path": big_mask["url"], "prompt": "a hat", "num_inference_steps": 200}
        running = client.post("/edit/inpaint", params={"job_id": "job_inpaint_running"}, json=body)
        assert running.status_code == 200, running.text
        assert running.json() == {"job_id": "job_inpaint_running", "status": "queued", "mask_path": big_mask["url"]}
        queued = client.post("/edit/inpaint", json={"image_path": small["access_path"], "mask_path": small_mask["url"],
                                                    "prompt": "a cap"}).json()  # fmt: skip
        assert cancel(client, queued["job_id"]) == "cancelled"
        assert events.wait_end(queued["job_id"])[0] == "cancelled"

        events.wait_for(lambda n, d: d["job_id"] == "job_inpaint_running" and n == "progress" and is_denoise_step(d))
        assert cancel(client, "job_inpaint_running") == "cancelling"
        name, data = events.wait_end("job_inpaint_running")
        assert name == "cancelled" and data["type"] == "inpaint", data
        steps = [d for n, d in events.of("job_inpaint_running") if n == "progress"]
        assert is_denoise_step(steps[-1]) and steps[-1]["status_message"] != "Step 200/200", steps[-1]

        after = client.post("/edit/inpaint", json={"image_path": small["url"], "mask_path": small_mask["url"],
                                                   "prompt": "a scarf"}).json()  # fmt: skip
        name, complete = events.wait_end(after["job_id"])
    assert name == "complete" and complete["type"] == "inpaint", complete
    assert_left_nothing(service, project, "job_inpaint_running", queued["job_id"])
    assert set(assets_by_job(client, project)) == {after["job_id"]}
    assert generated_files(service, project) == {f"{after['job_id']}.jpg"}
    body = {"image_path": small["url"], "mask_path": small_mask["url"], "prompt": "again"}
    taken = client.post("/edit/inpaint", params={"job_id": "job_inpaint_running"}, json=body)
    assert taken.status_code == 409 and "job_id" in taken.json()["detail"]


def test_thirty_jobs_from_five_clients_with_random_cancellations_while_health_stays_quick(service):
    clients, per_client, rng = 5, 6, random.Random(20240611)
    project = create_project(service.client, "Load")
    submitted: dict[str, str | None] = {}  # job id: the cancel route's answer (None: not cancelled)
    errors: list[BaseException] = []
    watchers: list[threading.Thread] = []
    lock = threading.Lock()
    plans = [[rng.random() < 1 / 3 for _ in range(per_client)] for _ in range(clients)]
    delays = [[rng.choice([0.0, rng.uniform(0, 4)]) for _ in range(per_client)] for _ in range(clients)]
    # Most jobs take the tiny model's 4 steps; some take 20, so that some cancellations land while they run.
    steps = [[rng.choice([None, None, 20]) for _ in range(per_client)] for _ in range(clients)]
    # And one long job is cancelled once it runs, so that at least one cancellation stops a running job.
    steps[0][0], plans[0][0] = 200, False

    def cancel_once_running(job_id: str) -> None:
        with service.client_for() as client:
            wait_status(client, job_id, lambda status: status["status"] != "pending", timeout=60)
            answer = cancel(client, job_id)
        with lock:
            submitted[job_id] = answer

    def client_session(index: int) -> None:
        try:
            with service.client_for() as client:
                mine = []
                for number in range(per_client):
                    body = {"project_id": project, "prompt": f"client {index} job {number}", **SHORT,
                            "num_inference_steps": steps[index][number]}  # fmt: skip
                    response = client.post("/generate/image", json=body)
                    assert response.status_code == 200, response.text
                    mine.append((time.monotonic(), response.json()["job_id"]))
                    with lock:
                        submitted[response.json()["job_id"]] = None
                    if (index, number) == (0, 0):
                        watchers.append(threading.Thread(target=cancel_once_running, args=(mine[-1][1],)))
                        watchers[-1].start()
                cancels = sorted((at + delays[index][n], job_id) for n, (at, job_id) in enumerate(mine)
                                 if plans[index][n])  # fmt: skip
                for when, job_id in cancels:
                    time.sleep(max(0.0, when - time.monotonic()))
                    answer = cancel(client, job_id)
                    with lock:
                        submitted[job_id] = answer
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    started = time.monotonic()
    with Latencies(service.client_for()) as health, EventStream(service) as events:
        threads = [threading.Thread(target=client_session, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads + watchers:
            thread.join(60)
        assert not errors, errors
        statuses = {job_id: wait_terminal(service.client, job_id, timeout=60) for job_id in list(submitted)}
        finals = {job_id: events.wait_end(job_id, timeout=10)[0] for job_id in submitted}
    total = time.monotonic() - started

    assert len(submitted) == clients * per_client
    assert "cancelling" in submitted.values()  # a running job was stopped mid-denoise
    by_job = assets_by_job(service.client, project)
    files = generated_files(service, project)
    for job_id, answer in submitted.items():
        status = statuses[job_id]
        assert status["status"] in ("completed", "cancelled"), status
        if answer == "cancelled":  # it was still queued: it never ran
            assert status["status"] == "cancelled", status
        if answer is None or answer == "not_found_or_already_done":
            assert status["status"] == "completed", (answer, status)
        if status["status"] == "completed":
            [asset] = by_job[job_id]
            assert status["asset_id"] == asset["id"] and isinstance(status["seed"], int), status
            assert finals[job_id] == "complete" and f"{job_id}.jpg" in files
        else:
            assert job_id not in by_job and status["asset_id"] is None and finals[job_id] == "cancelled"
            assert f"{job_id}.jpg" not in files
    completed = sum(s["status"] == "completed" for s in statuses.values())
    cancelled = sum(s["status"] == "cancelled" for s in statuses.values())
    assert len(files) == completed and cancelled >= 1
    assert service.client.get(f"/projects/{project}/active_jobs").json() == []
    assert not health.failures, health.failures[:5]
    worst, median = max(health.seconds), statistics.median(health.seconds)
    answers = sorted(a for a in submitted.values() if a)
    log.info("load: %d jobs from %d clients, %d completed, %d cancelled (cancel answers: %s); /health x%d: worst "
             "%.1f ms, median %.1f ms; total %.1f s", len(submitted), clients, completed, cancelled,
             {a: answers.count(a) for a in set(answers)}, len(health.seconds), worst * 1000, median * 1000,
             total)  # fmt: skip
    assert worst < 1.0, f"the slowest /health took {worst:.3f} s"


# ---------------------------------------------------------------------------------------------- restarts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """`python -m flux2 serve --model tiny` as a user runs it, in a process of its own."""

    def __init__(self, data_dir: Path, port: int, env: dict[str, str], log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flux2", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
                 "--data-dir", str(data_dir)], env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, f"flux2 serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"flux2 serve did not answer: {log.read_text()[-2000:]}"
            time.sleep(0.05)

    def stop(self, sig: int) -> int:
        self.client.close()
        self.process.send_signal(sig)
        return self.process.wait(30)

    def submit(self, project: str, prompt: str, **size) -> str:
        response = self.client.post("/generate/image", json={"project_id": project, "prompt": prompt, **size})
        assert response.status_code == 200, response.text
        return response.json()["job_id"]


@pytest.fixture
def serve(tmp_path, cli_env):
    """Starts `flux2 serve` on one data folder and port, again and again; kills whatever is left at the end."""
    env = {key: value for key, value in cli_env.items() if not key.startswith("FLUX2_STUDIO_")}
    data, port, log_file, started = tmp_path / "data", free_port(), tmp_path / "serve.log", []

    def start() -> Served:
        started.append(Served(data, port, env, log_file))
        return started[-1]

    start.data, start.log_file = data, log_file
    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(30)


def test_restart_after_crashes_and_after_graceful_stops_loses_no_job(serve):
    data, log_file = serve.data, serve.log_file
    denoising = lambda s: s["status"] == "processing" and 12 < s["progress"] < 95  # noqa: E731

    # A crash (SIGKILL) while the long job runs, with two jobs queued behind it.
    served = serve()
    project = create_project(served.client, "Restarts")
    first = served.submit(project, "interrupted twice", **LONG)
    second, third = served.submit(project, "queued 1", **SHORT), served.submit(project, "queued 2", **SHORT)
    wait_status(served.client, first, denoising, timeout=60)
    assert served.stop(signal.SIGKILL) == -signal.SIGKILL

    # The next start re-queues the interrupted job first; it crashes again mid-run.
    served = serve()
    for job_id in (second, third):  # never started: still queued, nothing lost
        assert served.client.get(f"/status/{job_id}").json()["status"] == "pending"
    status = wait_status(served.client, first, denoising, timeout=60)
    assert status["asset_id"] is None
    assert served.stop(signal.SIGKILL) == -signal.SIGKILL

    # Its attempts are spent: it fails with a clear message; the queued ones run.
    served = serve()
    status = wait_terminal(served.client, first, timeout=10)
    assert status["status"] == "failed" and status["asset_id"] is None, status
    assert "restart" in status["error_message"] and "restart" in status["status_message"], status
    for job_id in (second, third):
        status = wait_terminal(served.client, job_id, timeout=60)
        assert status["status"] == "completed" and status["asset_id"] and status["status_message"], status

    # Graceful stops (SIGTERM, then SIGINT) while a fourth job runs: each time it is re-queued, without spending
    # an attempt, and it keeps the seed chosen before its first run.
    fourth = served.submit(project, "stopped gracefully", **LONG)
    seed = wait_status(served.client, fourth, denoising, timeout=60)["seed"]
    assert isinstance(seed, int)
    # uvicorn shuts down gracefully (the worker stops the job at its next step), then re-raises the signal.
    assert served.stop(signal.SIGTERM) in (0, -signal.SIGTERM), log_file.read_text()[-2000:]
    for stop in (signal.SIGINT, None):
        served = serve()
        status = served.client.get(f"/status/{fourth}").json()
        assert status["status"] in ("pending", "processing") and status["seed"] == seed, status
        if stop is not None:
            wait_status(served.client, fourth, denoising, timeout=60)
            assert served.stop(stop) in (0, -stop), log_file.read_text()[-2000:]

    status = wait_terminal(served.client, fourth, timeout=60)
    assert status["status"] == "completed" and status["asset_id"] and status["seed"] == seed, status
    finals = {job_id: served.client.get(f"/status/{job_id}").json() for job_id in (first, second, third, fourth)}
    by_job = assets_by_job(served.client, project)
    assert served.client.get(f"/projects/{project}/active_jobs").json() == []
    assert served.client.get(status["output_url"]).status_code == 200
    served.stop(signal.SIGTERM)
    assert read_provenance(data / "projects" / project / "generated" / f"{fourth}.jpg")["seed"] == seed
    for job_id, status in finals.items():
        assert status["status"] in TERMINAL and status["status_message"], status
        if status["status"] == "completed":
            assert [asset["id"] for asset in by_job[job_id]] == [status["asset_id"]]
        else:
            assert job_id not in by_job
    files = {path.name for path in (data / "projects" / project / "generated").glob("*")}
    assert files == {f"{job_id}.jpg" for job_id in (second, third, fourth)}
    assert not any((data / "tmp").glob("job_*")), list((data / "tmp").iterdir())
    log.info("restart: %s", [(s["status"], s["status_message"], s["error_message"]) for s in finals.values()])
