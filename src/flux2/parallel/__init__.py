"""One image over several devices: CFG halves and Ulysses sequence parallelism (forward.py), tensor parallelism
(tensor.py), and a worker of one process per device (run.py).

    images = generate_parallel("tiny", GenerationRequest(prompt="a fox", seed=1), world_size=2)
"""

from flux2.parallel.run import ParallelPipeline, ParallelWorker, generate_parallel

__all__ = ["ParallelPipeline", "ParallelWorker", "generate_parallel"]
