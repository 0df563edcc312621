"""`flux2 serve`: the studio service (HTTP API, jobs with SSE, projects and assets) on this machine."""

import argparse
import sys
from pathlib import Path

from flux2.cli.options import add_acceleration_options, add_parallel_options
from flux2.transforms.acceleration import acceleration_fields

SERVE_EXAMPLES = """examples:
  flux2 serve                                        http://127.0.0.1:8000, data in ./studio-data
  flux2 serve --model tiny --port 8010               offline self-test (noise images)
  flux2 serve --host 0.0.0.0 --api-token SECRET --cors http://localhost:5173
  flux2 serve --upsample openrouter                  enhance_prompt through OpenRouter ($OPENROUTER_API_KEY)
Every option can also come from a FLUX2_STUDIO_<NAME> variable (e.g. FLUX2_STUDIO_DATABASE_URL for PostgreSQL).
The API is described at /docs once it runs.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the studio service", description=__doc__, epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: 8000)")
    p.add_argument("--data-dir", type=Path, help="database and media folder (default: ./studio-data)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data folder)")
    p.add_argument("--model", help="registry name of the model to serve (default: flux.2-klein-4b)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--cors", action="append", dest="cors_origins", metavar="ORIGIN",
                   help="allowed browser origin, repeatable; '*' for any (default: the studio front end's "
                        "http://localhost:5173, http://127.0.0.1:5173 and http://localhost:3000)")  # fmt: skip
    p.add_argument("--api-token", help="require Authorization: Bearer TOKEN on every request")
    p.add_argument("--segmentation-url", help="the segmentation (SAM) service (default: http://127.0.0.1:8001)")
    p.add_argument(
        "--upsample",
        choices=["none", "local", "openrouter"],
        help="how requests with enhance_prompt rewrite their prompt (default: none, enhancement off)",
    )
    p.add_argument("--upsample-model", help="local: model folder or Hub id; openrouter: the API's model name")
    p.add_argument("--upsample-url", help="openrouter: an OpenAI-compatible base URL (key: $OPENROUTER_API_KEY)")
    add_model_process_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from flux2.studio.app import create_app
    except ImportError as err:
        missing = f"the studio service needs its extra packages ({err.name}): pip install 'flux2[studio]'"
        raise ValueError(missing) from None
    names = ("host", "port", "data_dir", "database_url", "model", "device", "cors_origins", "api_token",
             "segmentation_url", "upsample", "upsample_model", "upsample_url")  # fmt: skip
    settings = studio_settings(args, names)
    if settings.upsample == "none" and (settings.upsample_model or settings.upsample_url):
        print("warning: --upsample-model and --upsample-url have no effect without --upsample", file=sys.stderr)
    print(f"flux2 studio on http://{settings.host}:{settings.port} (data: {settings.data_dir.resolve()})")
    print(f"the web page: open http://{settings.host}:{settings.port}/ in a browser")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def add_model_process_options(p: argparse.ArgumentParser) -> None:
    """The options of a process that holds the model (`flux2 serve`, `flux2 worker`); not given: the environment's."""
    add_acceleration_options(p.add_argument_group("speed and memory"), unset_is_none=True)
    add_parallel_options(p, unset_is_none=True)


def studio_settings(args: argparse.Namespace, names: tuple[str, ...]):
    """The studio's settings from the options given (with the model-process ones every command shares); an option
    not given leaves the environment's FLUX2_STUDIO_* value. An unknown model or a bad speed setting fails now,
    not at the first job."""
    from flux2.registry import model_info
    from flux2.studio.config import StudioSettings

    names = (*names, "gpus", "tensor_parallel", *acceleration_fields())
    settings = StudioSettings(**{name: getattr(args, name) for name in names if getattr(args, name) is not None})
    model_info(settings.model)
    settings.acceleration()
    return settings
