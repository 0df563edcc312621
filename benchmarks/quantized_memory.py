"""Memory and CPU speed of the FLUX.2 [klein] 4B transformer in bf16 and in per-tensor float8 (weight-only).

Random weights cost exactly what real ones do. The model is built on the meta device and each Linear is
materialised in bf16 from a random slice of one seeded N(0, 0.02) pool (drawing 4B normals on 2 cores takes
minutes; the pool, 256 MiB, is in both variants' RSS); for the float8 variant each Linear is quantised by our own
`flux2.transforms.quantized.quantize_fp8` right away, so the whole bf16 model never exists. Each variant runs in
its own process, so its peak RSS (`ru_maxrss`) is its own.

  python benchmarks/quantized_memory.py                    # both variants, 128x128 image, 32 text tokens
  python benchmarks/quantized_memory.py --size 256 --json  # last stdout line is JSON
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from flux2.model import Flux2, Klein4BParams
from flux2.sampling import batched_prc_img, batched_prc_txt
from flux2.transforms.quantized import quantize_fp8, quantize_linears

GIB = 2**30
VARIANTS = ("bf16", "fp8")
POOL = 2**27  # bf16 values: larger than the largest Linear (single_blocks.N.linear1, 3072 x 27648)


def build(variant: str, seed: int = 0) -> Flux2:
    params = Klein4BParams()
    with torch.device("meta"):
        model = Flux2(params)
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            n = module.weight.numel()
            start = int(torch.randint(0, POOL - n + 1, (), generator=g))
            w = pool[start : start + n].view(module.weight.shape).clone()
            if variant == "fp8":
                quantize_linears(model, {name: quantize_fp8(w)})
            else:
                module.weight = nn.Parameter(w, requires_grad=False)
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # the QK-norm scales
            parent = model.get_submodule(name.rpartition(".")[0])
            parent.scale = nn.Parameter(torch.ones(p.shape, dtype=torch.bfloat16), requires_grad=False)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, size: int, txt_len: int) -> dict:
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = build(variant)
    result = {"variant": variant, "build_s": time.perf_counter() - t0, "weight_bytes": weight_bytes(model),
              "peak_rss_after_build": peak_rss()}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    params = model.params
    x, x_ids = batched_prc_img(torch.randn(1, params.in_channels, size // 16, size // 16, generator=g))
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, txt_len, params.context_in_dim, generator=g))
    args = (x.bfloat16(), x_ids, torch.tensor([0.5], dtype=torch.bfloat16), ctx.bfloat16(), ctx_ids, None)
    t0 = time.perf_counter()
    out = model(*args)
    result |= {"forward_s": time.perf_counter() - t0, "peak_rss_after_forward": peak_rss(),
               "output_finite": bool(torch.isfinite(out).all())}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (tokens: (size/16)^2)")
    parser.add_argument("--txt-len", type=int, default=32)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.size, args.txt_len)))
        return
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--size", str(args.size), "--txt-len", str(args.txt_len)]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(stdout.splitlines()[-1]))
    tokens = (args.size // 16) ** 2 + args.txt_len
    print(f"klein-4B transformer, CPU ({torch.get_num_threads()} threads), one forward over {tokens} tokens")
    print(f"{'variant':8} {'weights GiB':>12} {'peak RSS build GiB':>19} {'peak RSS fwd GiB':>17} {'forward s':>10}")
    for r in results:
        print(f"{r['variant']:8} {r['weight_bytes'] / GIB:12.2f} {r['peak_rss_after_build'] / GIB:19.2f} "
              f"{r['peak_rss_after_forward'] / GIB:17.2f} {r['forward_s']:10.1f}")  # fmt: skip
    bf16, fp8 = results
    print(f"fp8 / bf16: weights {fp8['weight_bytes'] / bf16['weight_bytes']:.3f}, "
          f"peak RSS {fp8['peak_rss_after_forward'] / bf16['peak_rss_after_forward']:.3f}")  # fmt: skip
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
