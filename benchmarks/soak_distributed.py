"""The distributed studio's soak: jobs over 2 API processes (`flux2 serve`) and 2 workers (`flux2 worker`, tiny
model, CPU) against a PostgreSQL server of its own, with random cancels (queued and running) and one worker
SIGKILLed mid-job. Every guarantee is checked (each job ends; one asset per completed job, none otherwise;
each job's events in order, the same on both API processes) and the figures are printed.

  python benchmarks/soak_distributed.py                       # 50 jobs, seed 0
  python benchmarks/soak_distributed.py --jobs 100 --seeds 3  # last stdout line is JSON

PostgreSQL comes from Debian's package (installed when missing; root needed then), as in the test suite.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "studio")]

from conftest_pg import soak  # noqa: E402
from postgres_server import postgres_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs per run (default 50)")
    parser.add_argument("--seeds", type=int, default=1, help="runs, with seeds 0..N-1 for the cancels (default 1)")
    args = parser.parse_args()
    if args.jobs < 10:
        parser.error(f"--jobs must be at least 10 (a slow job to kill a worker on, and cancels), got {args.jobs}")
    reports = []
    with postgres_server() as server, tempfile.TemporaryDirectory(prefix="flux2-soak-") as folder:
        for seed in range(args.seeds):
            report = soak(server, Path(folder) / f"run{seed}", args.jobs, seed=seed)
            reports.append(asdict(report))
            print(f"seed {seed}: {args.jobs} jobs in {report.seconds} s, {report.outcomes}, cancels answered "
                  f"cancelled/cancelling {report.cancelled_queued}/{report.cancelled_running}, killed job re-ran "
                  f"(attempts {report.killed_job_attempts}), events per API {report.events_per_api}, latency "
                  f"{report.latency}", file=sys.stderr)  # fmt: skip
    print(json.dumps(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
