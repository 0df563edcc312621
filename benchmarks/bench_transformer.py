"""Speed and memory of the FLUX.2 [klein] 4B transformer, and its agreement with diffusers, on random weights.

Random weights cost exactly what real ones do, so no checkpoint is needed: models are built on the meta device,
materialised directly on the target device and filled with a seeded N(0, 0.02) (norm scales near 1).

Phases, each with its own timing and peak memory (`torch.cuda.max_memory_allocated`, reset before each):
  forward    one transformer forward over [txt | img] = txt_len + (size/16)^2 tokens, batch 1
  diffusers  diffusers' Flux2Transformer2DModel, sharing the same weights, on the same inputs; plus the
             difference between the two outputs
  generate   noise -> `denoise` over get_schedule(steps, L_img) -> unpack -> AutoEncoder.decode
             (text encoding excluded: the context is random [1, txt_len, context_in_dim])
  decode     AutoEncoder.decode alone

  python benchmarks/bench_transformer.py               # CUDA: klein-4B, bf16, 1024x1024 (CPU: --tiny)
  python benchmarks/bench_transformer.py --tiny --json # CPU, seconds; last stdout line is JSON
"""

import argparse
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from itertools import chain

import torch
from torch import Tensor, nn

from flux2.autoencoder import PATCH, AutoEncoder, AutoEncoderParams
from flux2.checkpoints.transformer import diffusers_transformer_config, transformer_original_to_diffusers
from flux2.model import Flux2, Flux2Params, Klein4BParams, RMSNorm
from flux2.registry import TINY_AE_PARAMS, TINY_PARAMS
from flux2.sampling import batched_prc_img, batched_prc_txt, denoise, get_schedule, scatter_ids

GIB = 2**30
WEIGHT_STD = 0.02  # keeps activations near unit scale through 3072-wide linears (0.02 * sqrt(3072) ~ 1.1)
NORM_SCALE_STD = 0.1  # norm scales are 1 + N(0, 0.1), so they are not all-ones yet stay well conditioned
FORWARD_SIGMA = 0.5  # timestep of the single-forward phases; the cost does not depend on it
TXT_LEN = 512  # text tokens the klein pipelines pad every prompt to
PHASES = ("forward", "diffusers", "generate", "decode")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, RMSNorm)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchConfig:
    tiny: bool
    device: torch.device
    dtype: torch.dtype  # transformer and latents
    ae_dtype: torch.dtype
    size: int  # image side in pixels
    txt_len: int
    steps: int
    warmup: int
    iters: int
    gen_iters: int
    phases: tuple[str, ...]
    compile: bool
    seed: int
    json: bool

    @property
    def params(self) -> Flux2Params:
        return TINY_PARAMS if self.tiny else Klein4BParams()

    @property
    def ae_params(self) -> AutoEncoderParams:
        return TINY_AE_PARAMS if self.tiny else AutoEncoderParams()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", default=None, help="TINY_PARAMS / TINY_AE_PARAMS (CPU default)")
    size.add_argument("--full", dest="tiny", action="store_false", help="klein-4B + the FLUX.2 AE (CUDA default)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="transformer dtype (default: bf16 full, fp32 tiny)")
    p.add_argument("--ae-dtype", choices=DTYPES, help="autoencoder dtype (default: fp32, as the pipeline decodes)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 1024 full, 256 tiny)")
    p.add_argument("--txt-len", type=int, default=TXT_LEN, help=f"text tokens (default {TXT_LEN})")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the generate phase (default 4)")
    p.add_argument("--warmup", type=int, help="untimed calls before each phase (default: 3 cuda, 1 cpu)")
    p.add_argument("--iters", type=int, help="timed forwards / decodes (default: 10 cuda, 3 cpu)")
    p.add_argument("--gen-iters", type=int, default=3, help="timed generations (default 3, after 1 warm-up)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list from {','.join(PHASES)} (default all)")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) for both transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout (the table goes to stderr)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> BenchConfig:
    """Fill the device-dependent defaults and check the values; exits with a message naming the bad flag."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"--device {device} was requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); run on a GPU host or use --device cpu --tiny"
        )
    on_cuda = device.type == "cuda"
    tiny = (not on_cuda) if args.tiny is None else args.tiny
    dtype = DTYPES[args.dtype or ("fp32" if tiny else "bf16")]
    phases = tuple(s.strip() for s in args.phases.split(",") if s.strip())
    if unknown := sorted(set(phases) - set(PHASES)):
        sys.exit(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    cfg = BenchConfig(
        tiny=tiny,
        device=device,
        dtype=dtype,
        ae_dtype=DTYPES[args.ae_dtype] if args.ae_dtype else torch.float32,
        size=args.size or (256 if tiny else 1024),
        txt_len=args.txt_len,
        steps=args.steps,
        warmup=args.warmup if args.warmup is not None else (3 if on_cuda else 1),
        iters=args.iters or (10 if on_cuda else 3),
        gen_iters=args.gen_iters,
        phases=phases,
        compile=args.compile,
        seed=args.seed,
        json=args.json,
    )
    multiple = size_multiple(cfg.ae_params)
    if cfg.size <= 0 or cfg.size % multiple:
        sys.exit(f"--size {cfg.size}: must be a positive multiple of {multiple} (x8 VAE, then 2x2 patchify)")
    if min(cfg.txt_len, cfg.steps, cfg.iters, cfg.gen_iters) < 1 or cfg.warmup < 0:
        sys.exit("--txt-len, --steps, --iters and --gen-iters must be >= 1, --warmup >= 0")
    return cfg


def size_multiple(p: AutoEncoderParams) -> int:
    """Pixels per latent token along a side: the VAE's x8 downsampling times the 2x2 patch (16)."""
    return 2 ** (len(p.ch_mult) - 1) * PATCH


def latent_side(cfg: BenchConfig) -> int:
    return cfg.size // size_multiple(cfg.ae_params)


def img_tokens(cfg: BenchConfig) -> int:
    return latent_side(cfg) ** 2


# ----------------------------------------------------------------------------- models with random weights


@torch.no_grad()
def init_random_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and buffer in place, on the model's device, from one seeded generator."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) and name in ("weight", "scale"):
                p.normal_(1.0, NORM_SCALE_STD, generator=gen)
            else:
                p.normal_(0.0, WEIGHT_STD, generator=gen)
        if isinstance(module, nn.BatchNorm2d):  # the AE's latent statistics
            module.running_mean.normal_(0.0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
            module.num_batches_tracked.zero_()
        elif next(module.buffers(recurse=False), None) is not None:
            raise ValueError(f"{type(module).__name__} has buffers that init_random_ does not know how to fill")
    return model


def build_random(make: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build on meta, allocate once on the device in the target dtype (no CPU or fp32 copy), then fill."""
    with torch.device("meta"):
        model = make()
    model = model.to(dtype).to_empty(device=device)
    return init_random_(model, seed).eval().requires_grad_(False)


@torch.no_grad()
def diffusers_twin(model: Flux2) -> nn.Module:
    """diffusers' transformer holding the same weights: the converted tensors are views of ours (q/k/v chunks),
    so it costs no extra memory beyond the one half-swapped final modulation."""
    try:
        from diffusers import Flux2Transformer2DModel
    except ImportError as e:
        sys.exit(f"the diffusers phase needs diffusers (pip install -e '.[test]'), or drop it with --phases: {e}")
    with torch.device("meta"):
        twin = Flux2Transformer2DModel(**diffusers_transformer_config(model.params))
    twin.load_state_dict(transformer_original_to_diffusers(model.state_dict()), strict=True, assign=True)
    if still_meta := [n for n, t in chain(twin.named_parameters(), twin.named_buffers()) if t.is_meta]:
        raise ValueError(f"diffusers model has tensors the checkpoint did not fill: {still_meta[:10]}")
    return twin.eval().requires_grad_(False)


def forward_tflop(p: Flux2Params, n_img: int, n_txt: int) -> float:
    """Matmul + attention FLOPs of one forward. Each block (double per stream, or single) costs per token
    2(4h^2 + 3mh): q/k/v/out projections and the SwiGLU MLP; attention adds 4 L^2 h per block."""
    h, m, n = p.hidden_size, p.mlp_hidden, n_img + n_txt
    blocks = p.depth + p.depth_single_blocks
    per_token = 2 * (4 * h * h + 3 * m * h)
    embed = 2 * (n_img * 2 * p.in_channels * h + n_txt * p.context_in_dim * h)
    return (blocks * (per_token * n + 4 * n * n * h) + embed) / 1e12


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    img: Tensor  # [1, L_img, C] packed noise latents, row-major over the (size/16)^2 latent grid
    img_ids: Tensor  # [1, L_img, 4]
    ctx: Tensor  # [1, L_txt, context_in_dim] random stand-in for the text encoder's states
    ctx_ids: Tensor  # [1, L_txt, 4]
    sigma: Tensor  # [1]


def make_inputs(cfg: BenchConfig) -> Inputs:
    p, side = cfg.params, latent_side(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    img, img_ids = batched_prc_img(torch.randn(1, p.in_channels, side, side, generator=gen))
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, cfg.txt_len, p.context_in_dim, generator=gen))
    to = dict(device=cfg.device, dtype=cfg.dtype)
    sigma = torch.full((1,), FORWARD_SIGMA, **to)
    return Inputs(img.to(**to), img_ids.to(cfg.device), ctx.to(**to), ctx_ids.to(cfg.device), sigma)


# ----------------------------------------------------------------------------- timing and memory


@dataclass
class PhaseResult:
    name: str
    median_ms: float
    min_ms: float
    first_ms: float  # the first (warm-up) call; with --compile it includes compilation
    iters: int
    resident_gib: float | None  # allocated when the phase started: weights and inputs
    peak_gib: float | None  # max allocated during the phase (None on CPU)
    tflops: float | None = None  # achieved, from forward_tflop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, float]:
    """One call and its milliseconds: CUDA events on a GPU (the host may run ahead), wall clock otherwise."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


def _reset_memory(device: torch.device) -> float | None:
    gc.collect()
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def run_phase(
    name: str, fn: Callable[[], Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[PhaseResult, Tensor]:
    """warmup untimed calls then iters timed ones; returns the stats and the last output."""
    log(f"[{name}] {warmup} warm-up + {iters} timed")
    resident = _reset_memory(device)
    times = []
    for _ in range(warmup + iters):
        out, ms = _timed(fn, device)
        times.append(ms)
    timed = times[warmup:]
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    result = PhaseResult(name, statistics.median(timed), min(timed), times[0], iters, resident, peak)
    return result, out


# ----------------------------------------------------------------------------- phases


def bench_forward(name: str, call: Callable[[], Tensor], cfg: BenchConfig) -> tuple[PhaseResult, Tensor]:
    result, out = run_phase(name, call, cfg.device, cfg.warmup, cfg.iters)
    result.tflops = forward_tflop(cfg.params, img_tokens(cfg), cfg.txt_len) / (result.median_ms / 1e3)
    return result, out


def bench_generate(model: nn.Module, ae: AutoEncoder, x: Inputs, cfg: BenchConfig) -> PhaseResult:
    timesteps = get_schedule(cfg.steps, x.img.shape[1])

    def generate() -> Tensor:
        latents = denoise(model, x.img, x.img_ids, x.ctx, x.ctx_ids, timesteps, guidance=None)
        z = torch.cat(scatter_ids(latents, x.img_ids)).squeeze(2)  # [B, C, h, w]
        return ae.decode(z.to(cfg.ae_dtype))

    name = f"generate ({cfg.steps} steps + decode)"
    return run_phase(name, generate, cfg.device, min(cfg.warmup, 1), cfg.gen_iters)[0]


def bench_decode(ae: AutoEncoder, cfg: BenchConfig) -> PhaseResult:
    side = latent_side(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    z = torch.randn(1, cfg.params.in_channels, side, side, generator=gen).to(cfg.device, cfg.ae_dtype)
    return run_phase("vae decode", lambda: ae.decode(z), cfg.device, cfg.warmup, cfg.iters)[0]


def parity(ours: Tensor, theirs: Tensor) -> dict:
    """Output agreement, absolute and relative to the scale (RMS) of diffusers' output."""
    a, b = ours.float(), theirs.float()
    diff = (a - b).abs()
    rms = b.pow(2).mean().sqrt().item()
    return dict(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        ref_rms=rms,
        ref_max_abs=b.abs().max().item(),
        max_abs_over_rms=diff.max().item() / rms,
        mean_abs_over_rms=diff.mean().item() / rms,
    )


# ----------------------------------------------------------------------------- environment and report


def sdpa_info(cfg: BenchConfig) -> dict:
    """Which fused attention kernels are enabled, and which one SDPA picks for this run's q/k/v."""
    p = cfg.params
    seq = cfg.txt_len + img_tokens(cfg)
    q = torch.empty(1, p.num_heads, seq, p.head_dim, device=cfg.device, dtype=cfg.dtype)
    info = {}
    if cfg.device.type == "cuda":
        info |= {
            "flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
            "math_enabled": torch.backends.cuda.math_sdp_enabled(),
        }
    try:  # private API: the dispatcher's choice for these shapes; absent in some torch versions
        info["chosen"] = torch.backends.cuda.SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    except (AttributeError, RuntimeError, ValueError) as e:
        info["chosen"] = f"unknown ({type(e).__name__})"
    return info


def environment(cfg: BenchConfig) -> dict:
    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),  # "high" lets fp32 matmuls use TF32
    }
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    if "diffusers" in cfg.phases:
        env["diffusers"] = importlib.metadata.version("diffusers")
    env["sdpa"] = sdpa_info(cfg)
    return env


def settings_dict(cfg: BenchConfig, n_params: int) -> dict:
    dtype_name = {v: k for k, v in DTYPES.items()}
    return {
        "model": "tiny" if cfg.tiny else "klein-4b",
        "params": n_params,
        "device": str(cfg.device),
        "dtype": dtype_name[cfg.dtype],
        "ae_dtype": dtype_name[cfg.ae_dtype],
        "size": cfg.size,
        "img_tokens": img_tokens(cfg),
        "txt_tokens": cfg.txt_len,
        "steps": cfg.steps,
        "compile": cfg.compile,
        "seed": cfg.seed,
        "weights": f"random N(0, {WEIGHT_STD}), norm scales 1 + N(0, {NORM_SCALE_STD})",
    }


def _gib(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_table(report: dict) -> str:
    s, env = report["settings"], report["env"]
    device = env.get("gpu") or env.get("cpu")
    lines = [
        f"torch {env['torch']} (CUDA {env['torch_cuda']}) on {s['device']}: {device}; SDPA {env['sdpa']}",
        f"{s['model']} ({s['params'] / 1e6:,.1f}M params) {s['dtype']}, AE {s['ae_dtype']}, {s['size']}x{s['size']}"
        f" = {s['img_tokens']} img + {s['txt_tokens']} txt tokens, compile={s['compile']}",
        "",
        f"{'phase':<32} {'median ms':>10} {'min ms':>9} {'first ms':>9} {'n':>3} {'resident GiB':>13}"
        f" {'peak GiB':>9} {'TFLOP/s':>8}",
    ]
    for r in report["phases"]:
        tflops = "-" if r["tflops"] is None else f"{r['tflops']:.3g}"
        lines.append(
            f"{r['name']:<32} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['first_ms']:>9.1f} {r['iters']:>3}"
            f" {_gib(r['resident_gib']):>13} {_gib(r['peak_gib']):>9} {tflops:>8}"
        )
    if p := report.get("parity"):
        lines.append(
            f"\nflux2 vs diffusers output: max |diff| {p['max_abs']:.3e}, mean |diff| {p['mean_abs']:.3e};"
            f" diffusers output RMS {p['ref_rms']:.3e}, max |output| {p['ref_max_abs']:.3e}"
            f"\n  relative to the RMS: max {p['max_abs_over_rms']:.3e}, mean {p['mean_abs_over_rms']:.3e}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def flux2_forward(model: nn.Module, x: Inputs) -> Tensor:
    return model(x.img, x.img_ids, x.sigma, x.ctx, x.ctx_ids, None)


def diffusers_forward(twin: nn.Module, x: Inputs) -> Tensor:
    """diffusers takes the timestep as sigma in [0, 1] (it multiplies by 1000 itself) and ids [L, 4] or [1, L, 4]."""
    return twin(
        hidden_states=x.img,
        encoder_hidden_states=x.ctx,
        timestep=x.sigma,
        img_ids=x.img_ids,
        txt_ids=x.ctx_ids,
        guidance=None,
        return_dict=False,
    )[0]


def run(cfg: BenchConfig) -> dict:
    log(f"building {'tiny' if cfg.tiny else 'klein-4B'} transformer on {cfg.device} ...")
    model = build_random(lambda: Flux2(cfg.params), cfg.device, cfg.dtype, cfg.seed)
    twin = diffusers_twin(model) if "diffusers" in cfg.phases else None
    n_params = sum(p.numel() for p in model.parameters())
    report = {"settings": settings_dict(cfg, n_params), "env": environment(cfg), "phases": []}
    if cfg.compile:  # a transform of the built models; the first call of each phase pays for it
        model = torch.compile(model)
        twin = torch.compile(twin) if twin is not None else None
    phases = []
    with torch.inference_mode():
        # Inputs made here are inference tensors like the ones `denoise` makes; mixing kinds recompiles.
        x = make_inputs(cfg)
        if "forward" in cfg.phases or twin is not None:  # the diffusers comparison needs our output
            result, ours = bench_forward("flux2 forward", partial(flux2_forward, model, x), cfg)
            phases.append(result)
        if twin is not None:
            result, theirs = bench_forward("diffusers forward", partial(diffusers_forward, twin, x), cfg)
            phases.append(result)
            report["parity"] = parity(ours, theirs)
            del twin, theirs
        if {"generate", "decode"} & set(cfg.phases):
            log("building autoencoder ...")
            ae = build_random(lambda: AutoEncoder(cfg.ae_params), cfg.device, cfg.ae_dtype, cfg.seed + 1)
            if "generate" in cfg.phases:
                phases.append(bench_generate(model, ae, x, cfg))
            if "decode" in cfg.phases:
                phases.append(bench_decode(ae, cfg))
    report["phases"] = [asdict(r) for r in phases]
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = resolve(parse_args(argv))
    report = run(cfg)
    table = format_table(report)
    if cfg.json:
        print(table, file=sys.stderr)
        print(json.dumps(report))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
