"""Time per denoising step: the pipeline called directly against the same model and size under `flux2 serve`.

The service runs as a user runs it (a `flux2 serve` process on 127.0.0.1), its steps timed from the SSE
`progress` events as they arrive; the direct runs time the pipeline's own Progress callbacks. Runs alternate,
so both see the same machine. The median step interval of each is compared (target: service <= 1.2x direct).

  python benchmarks/service_step_time.py                      # tiny, 512x512, 8 steps, 3 runs each
  python benchmarks/service_step_time.py --size 256 --runs 5  # last stdout line is JSON
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def step_intervals(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def direct_run(pipe, size: int, steps: int, seed: int) -> list[float]:
    times: list[float] = []

    def on_progress(event) -> None:
        if event.stage == "denoise":
            times.append(time.perf_counter())

    pipe.generate("a lighthouse", width=size, height=size, num_steps=steps, seed=seed, callback=on_progress)
    return step_intervals(times)


def service_run(client: httpx.Client, project: str, size: int, steps: int, seed: int) -> list[float]:
    body = {"project_id": project, "prompt": "a lighthouse", "width": size, "height": size,
            "num_inference_steps": steps, "seed": seed}  # fmt: skip
    times: list[float] = []
    with client.stream("GET", "/events", timeout=None) as events:
        job = client.post("/generate/image", json=body).raise_for_status().json()["job_id"]
        name = None
        for line in events.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name is not None:
                data = json.loads(line.split(":", 1)[1])
                if data.get("job_id") != job:
                    continue
                if name == "progress" and data.get("status_message", "").startswith("Step "):
                    times.append(time.perf_counter())
                if name in ("complete", "error", "cancelled"):
                    if name != "complete":
                        raise RuntimeError(f"job {job} ended with {name}: {data}")
                    break
    return step_intervals(times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model: str, data_dir: Path, port: int) -> subprocess.Popen:
    flux2 = Path(sys.executable).with_name("flux2")
    args = [str(flux2), "serve", "--model", model, "--port", str(port), "--data-dir", str(data_dir)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"flux2 serve did not start: {process.stderr.read().decode()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch

    from flux2.pipeline import Flux2Pipeline

    pipe = Flux2Pipeline(args.model, watermark=None)
    direct_run(pipe, args.size, 2, seed=0)  # warm-up
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        service = start_service(args.model, Path(data_dir), port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                project = client.post("/projects", json={"name": "bench"}).raise_for_status().json()["id"]
                service_run(client, project, args.size, 2, seed=0)  # warm-up: loads the model
                direct, served = [], []
                for run in range(args.runs):
                    direct += direct_run(pipe, args.size, args.steps, seed=run)
                    served += service_run(client, project, args.size, args.steps, seed=run)
        finally:
            service.terminate()
            service.wait(30)
    result = {
        "model": args.model, "size": args.size, "steps": args.steps, "runs": args.runs,
        "torch_threads_direct": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "direct_step_s": statistics.median(direct), "service_step_s": statistics.median(served),
    }  # fmt: skip
    result["ratio"] = result["service_step_s"] / result["direct_step_s"]
    print(f"direct {result['direct_step_s']:.4f} s/step, service {result['service_step_s']:.4f} s/step, "
          f"ratio {result['ratio']:.2f}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
