"""`flux2 worker`: a GPU worker process of a studio spread over several machines. It holds one model and runs
the jobs that `flux2 serve --database-url postgresql://...` processes queue for that model."""

import argparse
from pathlib import Path

from flux2.cli.serve import add_model_process_options, studio_settings

WORKER_EXAMPLES = """examples:
  flux2 worker --model tiny --database-url postgresql://studio@127.0.0.1/studio --data-dir /srv/studio-data
  FLUX2_STUDIO_DATABASE_URL=postgresql://studio@db/studio flux2 worker --model flux.2-klein-4b --device cuda
The data folder is the API processes' own (a shared folder): outputs are written there. Stop with Ctrl-C or
SIGTERM: the running job stops at its next step and goes back to the queue.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="run queued studio jobs of one model (PostgreSQL)", description=__doc__,
        epilog=WORKER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", help="registry name of the model this worker holds (default: flux.2-klein-4b)")
    p.add_argument("--database-url", help="the studio's PostgreSQL database, postgresql://USER@HOST:PORT/NAME "
                                          "(default: $FLUX2_STUDIO_DATABASE_URL)")  # fmt: skip
    p.add_argument("--data-dir", type=Path, help="the media folder the API processes share (default: ./studio-data)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--heartbeat-s", type=float, help="seconds between renewals of the running job's lease (2)")
    p.add_argument("--stall-timeout-s", type=float,
                   help="seconds of silence after which a worker's job goes back to the queue (30)")  # fmt: skip
    add_model_process_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        from flux2.studio.db import is_postgres
        from flux2.studio.distributed.runner import serve
    except ImportError as err:
        missing = f"the studio worker needs its extra packages ({err.name}): pip install 'flux2[studio]'"
        raise ValueError(missing) from None
    names = ("database_url", "data_dir", "model", "device", "heartbeat_s", "stall_timeout_s")
    settings = studio_settings(args, names)
    if settings.database_url is None or not is_postgres(settings.database_url):
        raise ValueError("--database-url must name the studio's PostgreSQL database (postgresql://...): workers "
                         f"take jobs from its queue; got {settings.database_url!r}")  # fmt: skip
    print(f"flux2 worker: {settings.model} on {settings.device or 'the best device'}, data in "
          f"{settings.data_dir.resolve()}; Ctrl-C stops", flush=True)  # fmt: skip
    serve(settings)
    return 0
