"""Eager vs regionally compiled (flux2.transforms.compile) transformer forward, on random weights.

For each model (tiny, and a mid-size one: hidden 1024, 4 double / 8 single blocks) the blocks are compiled once
with inductor; compile time is reported apart (first compiled forward minus an eager one), with the number of
graphs Dynamo built. Then every size is timed with eager and compiled forwards interleaved (eager, compiled,
eager, ...) so drifting load on a shared machine hits both alike; medians are reported. The second size must not
compile again (the sequence dimension is dynamic): `frames` would grow if it did.

  python benchmarks/compile_speed.py                    # CPU: tiny + mid at 128 and 256 px; last line JSON
  python benchmarks/compile_speed.py --models mid --sizes 256,512 --iters 5
"""

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from flux2.model import Flux2Params
from flux2.registry import TINY_PARAMS
from flux2.tiny import random_flow_model
from flux2.transforms.compile import compile_blocks, random_inputs, uncompile_blocks

MID_PARAMS = replace(
    TINY_PARAMS, hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(32, 32, 32, 32),
    context_in_dim=768,
)  # fmt: skip
MODELS: dict[str, Flux2Params] = {"tiny": TINY_PARAMS, "mid": MID_PARAMS}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_model(name: str, params: Flux2Params, sizes: list[int], txt_len: int, iters: int) -> dict:
    model = random_flow_model(params)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")  # one backend object: toggling back to compiled reuses graphs

    with torch.inference_mode():
        inputs = {side: random_inputs(model, side, side, txt_len) for side in sizes}

        def forward(side: int):
            return lambda: model(*inputs[side])

        eager_first = timed(forward(sizes[0]))
        compile_blocks(model, backend=counter)
        first_compiled = timed(forward(sizes[0]))
        compile_s = round((first_compiled - eager_first) / 1e3, 2)
        result = {"model": name, "params": sum(p.numel() for p in model.parameters()), "compile_s": compile_s,
                  "frames_after_first": counter.frame_count, "sizes": []}  # fmt: skip
        log(f"{name}: compiled in {result['compile_s']} s ({counter.frame_count} graphs)")
        for side in sizes:
            first_ms = timed(forward(side))  # compiled; must not recompile after the first size
            eager, compiled = [], []
            for _ in range(iters):
                uncompile_blocks(model)
                eager.append(timed(forward(side)))
                compile_blocks(model, backend=counter)
                compiled.append(timed(forward(side)))
            row = {"size": side, "img_tokens": (side // 16) ** 2, "txt_tokens": txt_len,
                   "eager_ms": round(statistics.median(eager), 2), "compiled_ms": round(statistics.median(compiled), 2),
                   "compiled_first_ms": round(first_ms, 2), "frames": counter.frame_count}  # fmt: skip
            row["speedup"] = round(row["eager_ms"] / row["compiled_ms"], 3)
            log(f"  {side}px: eager {row['eager_ms']} ms, compiled {row['compiled_ms']} ms (x{row['speedup']}),"
                f" graphs so far {row['frames']}")  # fmt: skip
            result["sizes"].append(row)
    uncompile_blocks(model)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,mid", help=f"comma list from {','.join(MODELS)}")
    p.add_argument("--sizes", default="128,256", help="image sides in pixels (default 128,256)")
    p.add_argument("--txt-len", type=int, default=64, help="text tokens (default 64; the pipelines use 512)")
    p.add_argument("--iters", type=int, default=5, help="timed forwards per mode and size (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a few shared cores more threads"
                   " make small matmuls erratic)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(MODELS)):
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {
        "env": {
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": "cpu",
            "dtype": "fp32",
        },  # fmt: skip
        "results": [bench_model(n, MODELS[n], sizes, args.txt_len, args.iters) for n in names],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
