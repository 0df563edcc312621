"""The studio service: the image backend of a creative studio app, over HTTP (see the studio integration spec).

Layout, one module per concept, imports pointing downward:

- `config`: `StudioSettings`, the one typed source of the service's defaults (environment prefix `FLUX2_STUDIO_`).
- `records`: the SQLModel tables `Project`, `Element`, `Asset`, `Job`, and the job status constants.
- `db`: the engine (SQLite tuned for a web server: WAL, foreign keys, busy timeout), Alembic migrations to head,
  and `session_scope`. The migrations live in `migrations/` inside the package, so they ship with it.
- `payloads`: each job type's typed payload (`ImageJob`, `ShotJob`, `InpaintJob`, `VisualizeJob`): the request
  resolved for the served model when the job is queued, stored in `Job.params` and read back by `read_payload`.
- `jobs_store`: `JobStore`, the only code that changes Job rows (every change a compare-and-set on the expected
  status), and `AssetStore`, which records at most one asset per job.
- `storage`: `MediaStore`, the media folder layout; it confines every client path to the data folder, verifies
  uploads and publishes job outputs atomically.

Built on top of these: `events` (`JobState`, the one job status schema, and SSE broadcast), `worker` (one queue
and one lock around the pipeline; a task takes a job id and its payload and hands back data), `tasks` (a handler
per payload type), `segmentation` (the SAM service client), `api/` (one router per resource, request and response
models, narrow dependencies) and `app` (the app factory and its lifespan).

Nothing here uses torch: the worker reaches the pipeline through a small interface. (The request and model
registry modules the routes check requests with still import it; see flux2.request.)
"""
