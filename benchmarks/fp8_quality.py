"""What float8 costs in image quality: the same prompt and seed in bf16 and with the transformer in float8, on
random weights (they cost what real ones do; the error they show is the quantisation's, not a model's taste).

Variants (flux2.transforms.quantized):
  fp8-tensor-weights   e4m3 weights, one scale per layer, dequantised to bf16 per layer (weight-only: any device)
  fp8-rowwise-weights  the same with a scale per output row
  fp8-tensor-compute   the float8 GEMM (torch._scaled_mm): activations quantised per tensor too
  fp8-rowwise-compute  the float8 GEMM with per-row scales for the weights and per-token for the activations
"-compute" is what an Ada/Hopper GPU runs with `--fp8`; on a CPU torch's own _scaled_mm gives the same float8
inputs (slowly), so the cost is measurable here. Reported against bf16: the decoded image's largest pixel
difference (0-255) and its PSNR.

  PYTHONPATH=src python benchmarks/fp8_quality.py                       # tiny and mid at 256 px, CPU
  PYTHONPATH=src python benchmarks/fp8_quality.py --config full --size 1024 --device cuda
Last stdout line: JSON.
"""

import argparse
import json
import math
import sys

import numpy as np
import torch
from bench_pipeline import architecture, build_random, random_text_model
from bench_transformer import log

from flux2.autoencoder import AutoEncoder
from flux2.model import Flux2
from flux2.pipeline import Flux2Pipeline
from flux2.text_encoder import Qwen3Embedder
from flux2.transforms.quantized import quantize_model_fp8

VARIANTS = {
    "fp8-tensor-weights": dict(rowwise=False, compute="dequantize"),
    "fp8-rowwise-weights": dict(rowwise=True, compute="dequantize"),
    "fp8-tensor-compute": dict(rowwise=False, compute="scaled_mm"),
    "fp8-rowwise-compute": dict(rowwise=True, compute="scaled_mm"),
}
PROMPT = "a red fox jumping over a frozen creek at dawn"


def build(config: str, device: torch.device, seed: int) -> tuple[Flux2Pipeline, object]:
    arch = architecture(config, "tiny" if config == "tiny" else "flux.2-klein-4b")
    ae = build_random(lambda: AutoEncoder(arch.ae_params), device, torch.float32, seed + 1)
    text_model, tokenizer = random_text_model(arch.text, device, torch.bfloat16, seed + 2)
    encoder = Qwen3Embedder(text_model, device, tokenizer=tokenizer, dtype=torch.bfloat16)
    flow = build_random(lambda: Flux2(arch.params), device, torch.bfloat16, seed)
    pipe = Flux2Pipeline(arch.info.name, flow_model=flow, ae=ae, text_encoder=encoder, device=device,
                         dtype=torch.bfloat16, watermark=None)  # fmt: skip
    return pipe, arch


def image(pipe: Flux2Pipeline, size: int, seed: int) -> np.ndarray:
    [out] = pipe.generate(PROMPT, width=size, height=size, seed=seed)
    return np.asarray(out.image, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def measure(config: str, size: int, device: torch.device, seed: int) -> dict:
    pipe, arch = build(config, device, seed)
    reference = image(pipe, size, seed)
    results = {}
    for name, options in VARIANTS.items():
        pipe.flow_model = quantize_model_fp8(build_random(lambda: Flux2(arch.params), device, torch.bfloat16, seed),
                                             **options)  # fmt: skip
        pixels = image(pipe, size, seed)
        error = float(np.abs(pixels - reference).max())
        results[name] = {"max_pixel_error": error, "psnr_db": round(psnr(pixels, reference), 2)}
        log(f"[{config} {size}] {name}: max pixel error {results[name]['max_pixel_error']:.0f}, "
            f"PSNR {results[name]['psnr_db']} dB")  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny,mid", help="comma list of tiny, mid, full")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": str(device), "torch": torch.__version__, "size": args.size, "configs": {}}
    for config in args.config.split(","):
        report["configs"][config] = measure(config, args.size, device, args.seed)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
