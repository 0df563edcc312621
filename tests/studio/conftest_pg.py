"""The studio spread over processes, for tests and the soak benchmark: a PostgreSQL server of our own, `flux2
serve` API processes and `flux2 worker` processes started as a user starts them, SSE followers of each API
process, and the soak itself (many jobs, random cancels, a worker killed mid-job) with the checks of its end.

Everything is real: subprocesses, HTTP on 127.0.0.1, the database. Imported by tests/studio/test_distributed.py
and benchmarks/soak_distributed.py.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from postgres_server import PostgresServer, free_port
from sqlalchemy import Engine, text

from flux2.studio.db import make_engine

TERMINAL = ("completed", "failed", "cancelled")
END_EVENTS = ("complete", "error", "cancelled")
# Short leases, so a killed worker's job is swept within seconds (the defaults suit real GPUs: 2 s and 30 s).
CLUSTER_ENV = {"FLUX2_STUDIO_HEARTBEAT_S": "0.3", "FLUX2_STUDIO_STALL_TIMEOUT_S": "2", "FLUX2_STUDIO_MAX_ATTEMPTS": "3",
               "FLUX2_STUDIO_SSE_KEEPALIVE_S": "0.2", "FLUX2_STUDIO_SSE_QUEUE_SIZE": "100000",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
START_TIMEOUT_S = 120


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without FLUX2_* settings that would leak in, plus the cluster's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_")}
    return {**env, **CLUSTER_ENV, **extra}


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Cluster:
    """API and worker processes over one database and one shared media folder."""

    db: PostgresServer
    data: Path
    logs: Path
    processes: list[Process] = field(default_factory=list)
    _engine: Engine | None = None

    def _spawn(self, name: str, *args: str) -> Process:
        log = self.logs / f"{name}.log"
        out = open(log, "wb")  # noqa: SIM115 - the child writes it until it ends
        popen = subprocess.Popen([sys.executable, "-m", "flux2", *args], stdout=out, stderr=subprocess.STDOUT,
                                 env=clean_env(), cwd=self.data.parent)  # fmt: skip
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def api(self, name: str = "api") -> "Api":
        port = free_port()
        process = self._spawn(name, "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
                              "--database-url", self.db.url, "--data-dir", str(self.data))  # fmt: skip
        return Api(process, f"http://127.0.0.1:{port}")

    def worker(self, name: str = "worker", model: str = "tiny") -> Process:
        return self._spawn(name, "worker", "--model", model, "--device", "cpu", "--database-url", self.db.url,
                           "--data-dir", str(self.data))  # fmt: skip

    def query(self, sql: str, **params) -> list:
        if self._engine is None:
            self._engine = make_engine(self.db.url)
        with self._engine.connect() as connection:
            return list(connection.execute(text(sql), params))

    def status_of(self, job_id: str) -> str:
        return self.query("SELECT status FROM job WHERE id = :id", id=job_id)[0].status

    def stop_all(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.popen.wait(30)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(10)


@contextmanager
def cluster(server: PostgresServer, folder: Path, database: str) -> Iterator[Cluster]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    running = Cluster(server.create_database(database), folder / "data", folder / "logs")
    try:
        yield running
    finally:
        running.stop_all()


@dataclass
class Api:
    process: Process
    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client() as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.process.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.process.name} did not start:\n{self.process.tail()}")
                time.sleep(0.1)


class Follower:
    """Follows GET /events of one API process in a thread, keeping every event; ready once a keep-alive came."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[str, dict]] = []
        self._pinged = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> "Follower":
        self._thread.start()
        if not self._pinged.wait(30):
            raise RuntimeError(f"no SSE keep-alive from {self.url}: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def of(self, job_id: str) -> list[tuple[str, dict]]:
        with self._lock:
            return [(name, data) for name, data in self.events if data.get("job_id") == job_id]

    def _follow(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0)) as client:
                with client.stream("GET", "/events") as response:
                    name, data = None, []
                    for line in response.iter_lines():
                        if self._stop.is_set():
                            return
                        if line.startswith(":"):
                            self._pinged.set()
                        elif line.startswith("event:"):
                            name = line.removeprefix("event:").strip()
                        elif line.startswith("data:"):
                            data.append(line.removeprefix("data:").strip())
                        elif not line and name is not None:
                            with self._lock:
                                self.events.append((name, json.loads("\n".join(data))))
                            name, data = None, []
        except BaseException as err:  # noqa: BLE001 - reported by the checks
            self.error = err


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(poll)
    return value


def statuses(running: Cluster) -> dict[str, tuple[str, int, bool]]:
    """Every job's (status, attempts, cancel_requested)."""
    rows = running.query("SELECT id, status, attempts, cancel_requested FROM job")
    return {row.id: (row.status, row.attempts, row.cancel_requested) for row in rows}


def owner_of(running: Cluster, job_id: str) -> str | None:
    rows = running.query("SELECT l.worker FROM job_lease l JOIN job j ON j.id = l.job_id "
                         "WHERE j.id = :id AND j.status = 'processing'", id=job_id)  # fmt: skip
    return rows[0].worker if rows else None


def events_in_order(events: list[tuple[str, dict]]) -> bool:
    """A job's events as a client must see them: numbers rising, exactly one end, and it comes last."""
    seqs = [data["seq"] for _, data in events]
    ends = [name for name, _ in events if name in END_EVENTS]
    return seqs == sorted(set(seqs)) and len(ends) == 1 and bool(events) and events[-1][0] in END_EVENTS


def progress_rises(events: list[tuple[str, dict]]) -> bool:
    """Within one run, progress never goes back."""
    values = [data["progress"] for name, data in events if name == "progress"]
    return values == sorted(values)


# ---------------------------------------------------------------------------------------------- the soak

FAST = {"width": 64, "height": 64}  # the tiny model's 4 steps
SLOW = {"width": 64, "height": 64, "num_inference_steps": 60}  # long enough to cancel, or kill, mid-denoise


@dataclass
class SoakReport:
    jobs: int
    seconds: float
    outcomes: dict[str, int]
    cancelled_queued: int
    cancelled_running: int
    killed_job: str
    killed_job_attempts: int
    events_per_api: list[int]
    latency: dict


def soak(server: PostgresServer, folder: Path, jobs: int, seed: int = 0) -> SoakReport:
    """`jobs` jobs over 2 API processes and 2 workers, about a quarter cancelled at random (queued or running),
    one worker SIGKILLed mid-job; checks every guarantee and returns the figures."""
    rng = random.Random(seed)
    with cluster(server, folder, f"soak_{jobs}_{seed}") as running:
        apis = [running.api("api1"), running.api("api2")]
        workers = [running.worker("worker1"), running.worker("worker2")]
        for api in apis:
            api.wait_ready()
        with Follower(apis[0].url) as first, Follower(apis[1].url) as second, apis[0].client() as c1, \
                apis[1].client() as c2:  # fmt: skip
            clients = [c1, c2]
            project = c1.post("/projects", json={"name": "soak"}).json()["id"]
            started = time.monotonic()
            submitted = []
            for i in range(jobs):
                body = {"project_id": project, "prompt": f"soak {i}", **(SLOW if i % 5 == 0 else FAST)}
                answer = clients[i % 2].post("/generate/image", json=body)
                assert answer.status_code == 200, answer.text
                submitted.append(answer.json()["job_id"])
            # Kill the worker running the first slow job once it is mid-denoise: it must run again elsewhere.
            victim = submitted[0]
            owner = wait_until(lambda: owner_of(running, victim), 120, "the first job starting")
            wait_until(lambda: running.query("SELECT progress FROM job WHERE id = :id", id=victim)[0].progress > 15,
                       60, "the first job denoising")  # fmt: skip
            pid = int(owner.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            assert pid in [w.popen.pid for w in workers]
            # Random cancels: some at once (most still queued), some once they run.
            to_cancel = rng.sample(submitted[1:], k=max(2, jobs // 4))
            answers = defaultdict(int)
            for job_id in to_cancel[: len(to_cancel) // 2]:
                answers[rng.choice(clients).post(f"/jobs/{job_id}/cancel").json()["status"]] += 1
            for job_id in sorted(to_cancel[len(to_cancel) // 2 :], key=submitted.index):
                deadline = time.monotonic() + 30  # wait for it to run (a fast one may end first)
                while running.status_of(job_id) == "pending" and time.monotonic() < deadline:
                    time.sleep(0.01)
                answers[rng.choice(clients).post(f"/jobs/{job_id}/cancel").json()["status"]] += 1
            final = wait_until(lambda: (s := statuses(running)) and all(v[0] in TERMINAL for v in s.values()) and s,
                               60 + jobs * 3, "every job ending")  # fmt: skip
            seconds = time.monotonic() - started
            wait_until(lambda: all(f.of(j) and f.of(j)[-1][0] in END_EVENTS for f in (first, second)
                                   for j in submitted), 30, "every end event on both streams")  # fmt: skip
            metrics = c2.get("/metrics").json()
            check_soak(running, project, submitted, final, (first, second), victim)
            assert metrics["queued"] == {} and metrics["running"] == {}, metrics
            assert sum(metrics["ended"].values()) == jobs, metrics
            outcomes = defaultdict(int)
            for status, _, _ in final.values():
                outcomes[status] += 1
            return SoakReport(jobs, round(seconds, 1), dict(outcomes), answers["cancelled"], answers["cancelling"],
                              victim, final[victim][1], [len(first.events), len(second.events)],
                              metrics["latency"])  # fmt: skip


def check_soak(running: Cluster, project: str, submitted: list[str], final: dict, streams, victim: str) -> None:
    assert set(final) == set(submitted)
    assets = defaultdict(list)
    for row in running.query("SELECT job_id, url FROM asset"):
        assets[row.job_id].append(row.url)
    generated = running.data / "projects" / project / "generated"
    files = {path.name for path in generated.glob("*")} if generated.exists() else set()
    for job_id, (status, _, _) in final.items():
        if status == "completed":
            assert len(assets[job_id]) == 1, (job_id, assets[job_id])
            assert f"{job_id}.jpg" in files, job_id
        else:
            assert assets[job_id] == [], (job_id, status, assets[job_id])
            assert f"{job_id}.jpg" not in files, (job_id, status)
    assert final[victim][0] in ("completed", "cancelled") and final[victim][1] >= 2, final[victim]
    for job_id in submitted:
        views = [stream.of(job_id) for stream in streams]
        for events in views:
            assert events_in_order(events), (job_id, [(n, d["seq"], d["progress"]) for n, d in events])
            if job_id != victim:
                assert progress_rises(events), (job_id, [(n, d["progress"]) for n, d in events])
        # Both API processes passed on the same events, in the same order.
        assert [(n, d["seq"]) for n, d in views[0]] == [(n, d["seq"]) for n, d in views[1]], job_id
    assert not any((running.data / "tmp").glob("job_*/*")), list((running.data / "tmp").iterdir())
    # The queue's own table holds no delivery left behind (the killed worker's was ended by a sweep).
    waiting = "SELECT count(*) AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    wait_until(lambda: running.query(waiting)[0].n == 0, 15, "the queue emptying")
