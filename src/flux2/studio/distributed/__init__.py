"""The studio spread over several processes on PostgreSQL: API processes queue jobs, GPU worker processes
(`flux2 worker`) run them.

    queue.py    the procrastinate app over the studio's database: one task, one queue per model
    worker.py   QueueWorker: the Worker the API processes use (submit, cancel, status from the database)
    runner.py   the GPU worker process: a pipeline, procrastinate's worker loop, leases kept alive
    notify.py   job events and cancels over PostgreSQL LISTEN/NOTIFY, to every API process's SSE clients
    sweep.py    jobs of workers that went silent go back to the queue, exactly once
    media.py    what tasks and routes need of the media storage (a shared folder here; an object store could be)

The studio's own Job rows stay the truth: procrastinate only carries "run job X" to a worker holding X's model,
and every change of a job is a compare-and-set in JobStore. So a message delivered twice, a worker killed
mid-job or a cancel racing a completion still leaves each job one end and at most one asset.
"""
