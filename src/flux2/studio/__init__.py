"""The studio service: the image backend of a creative studio app, over HTTP (see the studio integration spec).

Layout, one module per concept, imports pointing downward:

- `config`: `StudioSettings`, the one typed source of the service's defaults (environment prefix `FLUX2_STUDIO_`).
- `records`: the SQLModel tables `Project`, `Element`, `Asset`, `Job`, and the job status constants.
- `db`: the engine (SQLite tuned for a web server: WAL, foreign keys, busy timeout), Alembic migrations to head,
  and `session_scope`. The migrations live in `migrations/` inside the package, so they ship with it.
- `jobs_store`: `JobStore`, the only code that changes Job rows (every change a compare-and-set on the expected
  status), and `AssetStore`, which records at most one asset per job.
- `storage`: `MediaStore`, the media folder layout; it confines every client path to the data folder, verifies
  uploads and publishes job outputs atomically.

Built on top of these: `events` (SSE broadcast), `worker` (one queue and one lock around the pipeline), `tasks`
(image, inpaint, visualize), `segmentation` (the SAM service client), `api/` (one router per resource) and `app`
(the app factory and its lifespan).

Nothing here imports torch: the worker reaches the pipeline through a small interface.
"""
