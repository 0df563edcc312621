"""The whole text-to-image pipeline, stage by stage, against diffusers' Flux2KleinPipeline holding the same weights.

Both pipelines run in one process on the same modules' weights (diffusers' transformer and VAE are built on meta and
assigned views of ours through flux2.checkpoints; both use the same transformers text model and tokenizer), with the
same prompt, size, steps and seed; runs are interleaved (ours, theirs, theirs, ours, ...) after one warm-up each.

Stages, split the same way on both sides:
  text     ours: Progress("encode_text") 0 -> 1; diffusers: the `encode_prompt` call(s)
  step     one denoising step, median over every step of every timed run. Ours: between Progress("denoise") events;
           diffusers: between `callback_on_step_end` calls, the first step starting when `encode_prompt` returns
           (so its first step includes preparing the noise; ours prepares it before Progress("denoise", 0))
  denoise  all steps
  decode   from the end of the last step to the end of the VAE decode (unpack, BN inverse, decode)
  total    the whole generate() / __call__, PIL image out (watermark off on ours)
  other    total minus the above: planning, image conversion, pipeline overhead
Ratios are ours / diffusers: of the medians, and the median of each round's ratio ("paired", steadier under load).

Peak memory per stage, above what was resident when the run started (weights and caches): on CUDA
`torch.cuda.max_memory_allocated`, reset at every stage boundary, in the timed runs; on CPU the peak resident set
size (VmHWM, reset through /proc/self/clear_refs at every stage boundary) in a fresh subprocess per configuration and
side, one cold run each (`--cpu-memory off` skips it).

Configurations (`--config`, comma list): tiny (TINY_PARAMS / TINY_AE_PARAMS / tiny Qwen3), mid (a 512-wide
4-block transformer, the real autoencoder, a 256-wide 28-layer Qwen3), full (the `--model` registry entry's own
sizes, Qwen3-4B / 8B sized text encoder: for CUDA). Weights are random (they cost what real ones do) unless
`--weights real` (full only), which loads the published ones the usual way (`--weights-dir`, env vars).

  PYTHONPATH=src python benchmarks/bench_pipeline.py --config tiny,mid --size 256,512     # CPU
  PYTHONPATH=src python benchmarks/bench_pipeline.py --config full --size 1024 --json-out gpu.json  # CUDA
"""

import argparse
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

import numpy as np
import torch
from bench_transformer import DTYPES, GIB, build_random, diffusers_twin, log
from torch import nn

from flux2.autoencoder import AutoEncoder, AutoEncoderParams
from flux2.checkpoints.autoencoder import ae_original_to_diffusers, diffusers_ae_config
from flux2.checkpoints.transformer import DIFFUSERS_SCHEDULER_CONFIG
from flux2.model import Flux2, Flux2Params
from flux2.pipeline import Flux2Pipeline, Progress
from flux2.registry import QWEN3_4B, QWEN3_8B, TINY_AE_PARAMS, TINY_PARAMS, ModelInfo, model_info
from flux2.text_encoder import Qwen3Embedder
from flux2.tiny import seeded
from flux2.tiny_text_encoders import tiny_qwen3

PROMPT = "a red fox jumping over a frozen creek at dawn"  # runs append size and index: our prompt cache never hits
STAGES = ("text", "step", "denoise", "decode", "other", "total")
CONFIGS = ("tiny", "mid", "full")
MB = 2**20


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class TextEncoderSize:
    """A Qwen3 decoder's sizes; 28+ layers, since the klein embedder reads hidden states 9, 18 and 27."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 512  # the byte-level benchmark tokenizer uses 261 ids; the real 151,936 only costs memory

    @property
    def context_dim(self) -> int:
        return 3 * self.hidden


MID_TEXT = TextEncoderSize(hidden=256, layers=28, heads=4, kv_heads=2, head_dim=64, intermediate=768)
QWEN3_SIZES = {  # from the published config.json files
    QWEN3_4B.repo_id: TextEncoderSize(2560, 36, 32, 8, 128, 9728, vocab=151936),
    QWEN3_8B.repo_id: TextEncoderSize(4096, 36, 32, 8, 128, 12288, vocab=151936),
}
# 512 wide, 2 double + 2 single blocks, klein's head dim (128) and latent channels: a step costs ~1 s at 512 px
# on 2 CPU cores, while the real autoencoder keeps decode as costly as in the published models.
MID_PARAMS = Flux2Params(
    in_channels=4 * AutoEncoderParams().z_channels,
    context_in_dim=MID_TEXT.context_dim,
    hidden_size=512,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    use_guidance_embed=False,
)


@dataclass(frozen=True)
class Architecture:
    config: str
    info: ModelInfo  # the registry entry: its sampling settings (steps, guidance, CFG) drive both pipelines
    params: Flux2Params
    ae_params: AutoEncoderParams
    text: TextEncoderSize | None  # None: flux2.tiny_text_encoders.tiny_qwen3


def architecture(config: str, model: str) -> Architecture:
    info = model_info(model)
    if config == "tiny":
        return Architecture(config, info, TINY_PARAMS, TINY_AE_PARAMS, None)
    if config == "mid":
        return Architecture(config, info, MID_PARAMS, AutoEncoderParams(), MID_TEXT)
    if info.text_encoder.repo_id not in QWEN3_SIZES:
        sys.exit(f"--model {model}: only the klein models (Qwen3 text encoders) have a diffusers klein twin here")
    return Architecture(config, info, info.params, info.ae_params, QWEN3_SIZES[info.text_encoder.repo_id])


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    configs: tuple[str, ...]
    model: str | None
    sizes: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype  # transformer and text encoder
    ae_dtype: torch.dtype
    steps: int | None  # None: the model's own
    warmup: int
    iters: int
    weights: str  # "random" | "real"
    weights_dir: str | None
    cpu_memory: bool
    seed: int
    json_out: Path | None
    plot: Path | None
    probe: str | None  # internal: "ours" | "diffusers", one cold run in this process for its peak RSS

    def model_for(self, config: str) -> str:
        if self.model:
            return self.model
        return "tiny" if config == "tiny" else "flux.2-klein-4b"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="comma list of tiny, mid, full (default: tiny on CPU, full on CUDA)")
    p.add_argument("--model", help="registry entry (default: tiny for --config tiny, else flux.2-klein-4b)")
    p.add_argument("--size", help="comma list of square image sides in pixels (default: 256 CPU, 1024 CUDA)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="transformer and text encoder (default: fp32 CPU, bf16 CUDA)")
    p.add_argument("--ae-dtype", choices=DTYPES, help="autoencoder (default: --dtype)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's; fixed for distilled ones)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side before timing (default 1)")
    p.add_argument("--iters", type=int, help="timed runs per side (default: 3 CPU, 10 CUDA)")
    p.add_argument("--weights", choices=("random", "real"), default="random", help="real: published (full only)")
    p.add_argument("--weights-dir", help="folder of the published weights (else the usual env vars / Hub cache)")
    p.add_argument("--cpu-memory", choices=("subprocess", "off"), default="subprocess", help="CPU peak RSS probe")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, help="also write the JSON report here")
    p.add_argument("--plot", type=Path, help="bar chart of the stages, ours vs diffusers (needs matplotlib)")
    p.add_argument("--probe", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu")
    on_cuda = device.type == "cuda"
    configs = tuple(c.strip() for c in (args.config or ("full" if on_cuda else "tiny")).split(","))
    if unknown := sorted(set(configs) - set(CONFIGS)):
        sys.exit(f"--config: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.weights == "real" and configs != ("full",):
        sys.exit("--weights real needs --config full: the published weights have the registry model's sizes")
    sizes = tuple(int(s) for s in (args.size or ("1024" if on_cuda else "256")).split(","))
    if any(s <= 0 or s % 16 for s in sizes):
        sys.exit(f"--size {args.size}: each side must be a positive multiple of 16 (x8 VAE, then 2x2 patches)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    return Settings(
        configs=configs,
        model=args.model,
        sizes=sizes,
        device=device,
        dtype=dtype,
        ae_dtype=DTYPES[args.ae_dtype] if args.ae_dtype else dtype,
        steps=args.steps,
        warmup=max(args.warmup, 0),
        iters=args.iters or (10 if on_cuda else 3),
        weights=args.weights,
        weights_dir=args.weights_dir,
        cpu_memory=args.cpu_memory == "subprocess" and not on_cuda,
        seed=args.seed,
        json_out=args.json_out,
        plot=args.plot,
        probe=args.probe,
    )


# ----------------------------------------------------------------------------- both pipelines, same weights


def random_text_model(size: TextEncoderSize | None, device: torch.device, dtype: torch.dtype, seed: int):
    """A Qwen3 causal LM of the given size with random weights, and the tiny byte-level Qwen3 tokenizer."""
    tiny_model, tokenizer = tiny_qwen3(seed)
    if size is None:
        return tiny_model.to(device, dtype), tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = replace_config(tiny_model.config, Qwen3Config, size)
    with torch.device(device):
        model = seeded(lambda: Qwen3ForCausalLM(config), seed)
    return model.to(dtype).requires_grad_(False), tokenizer


def replace_config(base, config_class, size: TextEncoderSize):
    """The tiny model's Qwen3 config (its special-token ids) with the sizes of `size`."""
    fields = base.to_dict() | dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
    )
    fields.pop("layer_types", None)  # derived from num_hidden_layers
    return config_class(**fields)


def our_pipeline(arch: Architecture, s: Settings) -> Flux2Pipeline:
    """Random weights (built on meta, filled in place) or the published ones, loaded by name."""
    common = dict(device=s.device, dtype=s.dtype, watermark=None)
    if s.weights == "real":
        return Flux2Pipeline(arch.info.name, weights_dir=s.weights_dir, **common)
    flow = build_random(lambda: Flux2(arch.params), s.device, s.dtype, s.seed)
    ae = build_random(lambda: AutoEncoder(arch.ae_params), s.device, s.ae_dtype, s.seed + 1)
    text_model, tokenizer = random_text_model(arch.text, s.device, s.dtype, s.seed + 2)
    encoder = Qwen3Embedder(text_model, s.device, tokenizer=tokenizer, dtype=s.dtype)
    return Flux2Pipeline(arch.info.name, flow_model=flow, ae=ae, text_encoder=encoder, **common)


@torch.no_grad()
def diffusers_vae(ae: AutoEncoder) -> nn.Module:
    """diffusers' AutoencoderKLFlux2 with our autoencoder's weights, in the layout `from_pretrained` gives it.

    Views would hand it the channels-last weights our pipeline switches to on a CPU, and with them our
    channels-last speed-up (its convs follow the weights' layout): a contiguous copy keeps diffusers as its users
    run it. Weights already contiguous (on CUDA) stay shared views."""
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        vae = AutoencoderKLFlux2(**diffusers_ae_config(ae.params))
    weights = {k: v.contiguous() for k, v in ae_original_to_diffusers(ae.state_dict()).items()}
    vae.load_state_dict(weights, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def diffusers_pipeline(ours: Flux2Pipeline):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DIFFUSERS_SCHEDULER_CONFIG),
        vae=diffusers_vae(ours.ae),
        text_encoder=ours.text_encoder.model,
        tokenizer=ours.text_encoder.tokenizer,
        transformer=diffusers_twin(ours.flow_model),
        is_distilled=not ours.info.uses_cfg,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- marks: time and memory


class MemoryMeter:
    """Peak memory since the last read, in bytes: CUDA allocated, or the CPU resident set (VmHWM) when `rss`."""

    def __init__(self, device: torch.device, rss: bool):
        self.device, self.rss = device, rss
        self.enabled = device.type == "cuda" or rss

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kib("VmRSS") * 1024 if self.rss else 0

    def peak_and_reset(self) -> int | None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        if not self.rss:
            return None
        peak = _proc_status_kib("VmHWM") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return peak


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Timeline:
    """Labelled marks of one run: (label, seconds, peak bytes since the previous mark)."""

    def __init__(self, meter: MemoryMeter):
        self.meter = meter
        self.marks: list[tuple[str, float, int | None]] = []
        self.baseline = 0

    def start(self) -> None:
        if self.meter.device.type == "cuda":
            torch.cuda.synchronize(self.meter.device)
        self.meter.peak_and_reset()
        self.baseline = self.meter.current()
        self.mark("start")

    def mark(self, label: str) -> None:
        if self.meter.device.type == "cuda":
            torch.cuda.synchronize(self.meter.device)
        self.marks.append((label, time.perf_counter(), self.meter.peak_and_reset()))

    def time_of(self, label: str, last: bool = True) -> float:
        times = [t for name, t, _ in self.marks if name == label]
        if not times:
            raise KeyError(f"no {label!r} mark in {[m[0] for m in self.marks]}")
        return times[-1] if last else times[0]


def stage_of(label: str) -> str:
    """The stage that the interval ending at this mark belongs to."""
    if label == "text_end":
        return "text"
    if label.startswith("step_") and label != "step_0":
        return "step"
    if label.startswith("decode"):
        return "decode"
    return "other"


def stage_times(tl: Timeline, steps: int) -> dict:
    """Seconds per stage of one run; "step" is the list of its steps."""
    step_marks = [tl.time_of(f"step_{i}") for i in range(steps + 1)]
    out = {
        "text": tl.time_of("text_end") - tl.time_of("text_start", last=False),
        "step": [b - a for a, b in zip(step_marks, step_marks[1:], strict=False)],
        "decode": tl.time_of("decode_end") - step_marks[-1],
        "total": tl.time_of("end") - tl.time_of("start"),
    }
    out["denoise"] = sum(out["step"])
    out["other"] = out["total"] - out["text"] - out["denoise"] - out["decode"]
    return out


def stage_peaks(tl: Timeline) -> dict[str, float] | None:
    """Peak bytes above the run's starting memory per stage (and total), in GiB."""
    if not tl.meter.enabled:
        return None
    peaks: dict[str, float] = {}
    for label, _, peak in tl.marks[1:]:
        stage = stage_of(label)
        peaks[stage] = max(peaks.get(stage, 0.0), (peak - tl.baseline) / GIB)
    peaks["denoise"] = peaks.get("step", 0.0)
    peaks["total"] = max(peaks.values())
    return peaks


# ----------------------------------------------------------------------------- one run of each side


# Our Progress events (stage, step) -> marks; ("denoise", i) is step_i: before step i, or after the last one.
OUR_MARKS = {
    ("encode_text", 0): "text_start",
    ("encode_text", 1): "text_end",
    ("decode", 0): "decode_start",
    ("decode", 1): "decode_end",
}


@dataclass(frozen=True)
class Job:
    size: int
    steps: int
    guidance: float
    seed: int


def steps_and_guidance(info: ModelInfo, steps: int | None) -> tuple[int, float]:
    return steps or info.num_steps, info.guidance


def run_ours(pipe: Flux2Pipeline, job: Job, prompt: str, tl: Timeline) -> np.ndarray:
    def on_progress(p: Progress) -> None:
        label = f"step_{p.step}" if p.stage == "denoise" else OUR_MARKS.get((p.stage, p.step))
        if label:
            tl.mark(label)

    tl.start()
    settings = dict(width=job.size, height=job.size, seed=job.seed, num_steps=job.steps, guidance=job.guidance)
    [out] = pipe.generate(prompt, callback=on_progress, **settings)
    tl.mark("end")
    return np.asarray(out.image)


def marking(fn: Callable, tl: Timeline, before: str | None, after: tuple[str, ...]) -> Callable:
    """`fn` with marks before (the first call only) and after each call."""

    @wraps(fn)
    def wrapped(*args, **kwargs):
        if before and not any(label == before for label, _, _ in tl.marks):
            tl.mark(before)
        result = fn(*args, **kwargs)
        for label in after:
            tl.mark(label)
        return result

    return wrapped


def run_diffusers(pipe, job: Job, prompt: str, tl: Timeline) -> np.ndarray:
    """encode_prompt and vae.decode are wrapped on the instances for this run; the pipeline calls them as methods."""

    def on_step_end(_pipe, i, _t, _tensors):
        tl.mark(f"step_{i + 1}")
        return {}

    pipe.encode_prompt = marking(type(pipe).encode_prompt.__get__(pipe), tl, "text_start", ("text_end", "step_0"))
    pipe.vae.decode = marking(type(pipe.vae).decode.__get__(pipe.vae), tl, None, ("decode_end",))
    try:
        tl.start()
        image = pipe(
            prompt=prompt,
            height=job.size,
            width=job.size,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="pil",
            callback_on_step_end=on_step_end,
        ).images[0]
        tl.mark("end")
    finally:
        del pipe.encode_prompt, pipe.vae.decode
    return np.asarray(image)


# ----------------------------------------------------------------------------- timing: interleaved, medians


@dataclass
class SideRuns:
    times: list[dict]
    peaks: list[dict]


def timed_runs(ours, theirs, job: Job, s: Settings) -> tuple[SideRuns, SideRuns, int]:
    """Warm-up, then ours and theirs alternately, the order flipped every round; also the largest uint8
    difference between the two images (a check that both sides hold the same weights)."""
    meter = MemoryMeter(s.device, rss=False)
    sides = {"ours": (ours, run_ours, SideRuns([], [])), "diffusers": (theirs, run_diffusers, SideRuns([], []))}
    max_diff = 0
    for i in range(s.warmup + s.iters):
        order = ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")
        images, totals = {}, {}
        for name in order:
            pipe, run, runs = sides[name]
            tl = Timeline(meter)
            images[name] = run(pipe, job, f"{PROMPT} #{job.size}.{i}", tl)
            times = stage_times(tl, job.steps)
            totals[name] = times["total"]
            if i >= s.warmup:
                runs.times.append(times)
                runs.peaks.append(stage_peaks(tl))
        diff = np.abs(images["ours"].astype(np.int16) - images["diffusers"].astype(np.int16)).max()
        max_diff = max(max_diff, int(diff))
        totals_text = ", ".join(f"{name} {t * 1e3:.0f} ms" for name, t in totals.items())
        log(f"  round {i + 1}/{s.warmup + s.iters}{' (warm-up)' if i < s.warmup else ''}: total {totals_text}")
    return sides["ours"][2], sides["diffusers"][2], max_diff


def medians_ms(runs: SideRuns) -> dict[str, float]:
    out = {stage: statistics.median(t[stage] for t in runs.times) * 1e3 for stage in STAGES if stage != "step"}
    out["step"] = statistics.median(x for t in runs.times for x in t["step"]) * 1e3
    return out


def paired_ratios(ours: SideRuns, theirs: SideRuns) -> dict[str, float]:
    """Median over rounds of ours / theirs within the round: steadier than a ratio of medians when the machine's
    load drifts, since both runs of a round see about the same load."""
    out = {}
    for stage in STAGES:
        pairs = [(o[stage], t[stage]) for o, t in zip(ours.times, theirs.times, strict=True)]
        if stage == "step":
            pairs = [(statistics.median(o), statistics.median(t)) for o, t in pairs]
        if all(t > 0 for _, t in pairs):
            out[stage] = statistics.median(o / t for o, t in pairs)
    return out


def max_peaks(runs: SideRuns) -> dict[str, float] | None:
    if not runs.peaks or runs.peaks[0] is None:
        return None
    return {stage: max(p.get(stage, 0.0) for p in runs.peaks) for stage in runs.peaks[0]}


# ----------------------------------------------------------------------------- CPU memory: a fresh process


def cpu_memory_probe(argv: list[str], config: str, size: int, side: str) -> dict[str, float] | None:
    """Peak RSS per stage of one cold run of one side, in a fresh interpreter (this script with --probe)."""
    cmd = [sys.executable, __file__, *strip_flags(argv), "--config", config, "--size", str(size), "--probe", side]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log(f"  memory probe ({side}) failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def strip_flags(argv: list[str]) -> list[str]:
    """The caller's flags without those the probe sets itself or must not repeat."""
    drop = {"--config", "--size", "--json-out", "--plot", "--probe"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in drop:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def probe(s: Settings) -> int:
    """One cold run of one side; prints its per-stage peak RSS above the start, in GiB, as a JSON line."""
    arch = architecture(s.configs[0], s.model_for(s.configs[0]))
    ours = our_pipeline(arch, s)
    pipe, run = (ours, run_ours) if s.probe == "ours" else (diffusers_pipeline(ours), run_diffusers)
    steps, guidance = steps_and_guidance(arch.info, s.steps)
    tl = Timeline(MemoryMeter(s.device, rss=True))
    run(pipe, Job(s.sizes[0], steps, guidance, s.seed), PROMPT, tl)
    print(json.dumps(stage_peaks(tl)))
    return 0


# ----------------------------------------------------------------------------- one configuration


def bench_config(config: str, s: Settings, argv: list[str]) -> list[dict]:
    arch = architecture(config, s.model_for(config))
    log(f"[{config}] building {arch.info.name}-shaped pipelines ({s.weights} weights) on {s.device} ...")
    ours = our_pipeline(arch, s)
    theirs = diffusers_pipeline(ours)
    steps, guidance = steps_and_guidance(arch.info, s.steps)
    results = []
    for size in s.sizes:
        log(f"[{config} {size}x{size}] {s.warmup} warm-up + {s.iters} timed rounds, {steps} steps")
        job = Job(size, steps, guidance, s.seed)
        ours_runs, their_runs, max_diff = timed_runs(ours, theirs, job, s)
        results.append(config_result(config, arch, ours, job, ours_runs, their_runs, max_diff))
        if s.cpu_memory:
            for side in ("ours", "diffusers"):
                results[-1]["peak_gib"][side] = cpu_memory_probe(argv, config, size, side)
    return results


def config_result(config, arch, ours, job, ours_runs, their_runs, max_diff) -> dict:
    ours_ms, their_ms = medians_ms(ours_runs), medians_ms(their_runs)
    return {
        "config": config,
        "model": arch.info.name,
        "size": job.size,
        "steps": job.steps,
        "params": {
            "transformer": sum(p.numel() for p in ours.flow_model.parameters()),
            "autoencoder": sum(p.numel() for p in ours.ae.parameters()),
            "text_encoder": sum(p.numel() for p in ours.text_encoder.model.parameters()),
        },
        "iters": len(ours_runs.times),
        "ours_ms": ours_ms,
        "diffusers_ms": their_ms,
        "ratio": {stage: ours_ms[stage] / their_ms[stage] for stage in STAGES if their_ms[stage] > 0},
        "paired_ratio": paired_ratios(ours_runs, their_runs),
        "peak_gib": {"ours": max_peaks(ours_runs), "diffusers": max_peaks(their_runs)},
        "image_max_diff_uint8": max_diff,
    }


# ----------------------------------------------------------------------------- report


def environment(s: Settings) -> dict:
    env = {
        "torch": torch.__version__,
        "diffusers": importlib.metadata.version("diffusers"),
        "transformers": importlib.metadata.version("transformers"),
        "threads": torch.get_num_threads(),
        "device": str(s.device),
        "dtype": str(s.dtype).removeprefix("torch."),
        "ae_dtype": str(s.ae_dtype).removeprefix("torch."),
        "weights": s.weights,
    }
    if s.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(s.device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    env["memory"] = memory_measure(s)
    return env


def memory_measure(s: Settings) -> str:
    if s.device.type == "cuda":
        return "CUDA max allocated, timed runs"
    return "peak RSS, fresh process, one cold run" if s.cpu_memory else "not measured (--cpu-memory off)"


def format_table(report: dict) -> str:
    env = report["env"]
    lines = [
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['threads']} threads on {env['device']}"
        f" ({env.get('gpu') or env.get('cpu')}); {env['dtype']}, AE {env['ae_dtype']}, {env['weights']} weights",
        "times: medians in ms; ratio = ours / diffusers of the medians, paired = median of per-round ratios",
        f"peak: GiB above the run's start ({env['memory']})",
    ]
    for r in report["results"]:
        lines += result_table(r)
    return "\n".join(lines)


def result_table(r: dict) -> list[str]:
    n = r["params"]
    lines = [
        "",
        f"{r['config']} ({r['model']} settings) {r['size']}x{r['size']}, {r['steps']} steps, {r['iters']} timed runs;"
        f" params: transformer {n['transformer'] / 1e6:.1f}M, AE {n['autoencoder'] / 1e6:.1f}M,"
        f" text {n['text_encoder'] / 1e6:.1f}M; images differ by <= {r['image_max_diff_uint8']} levels",
        f"{'stage':<8} {'ours ms':>10} {'diffusers':>10} {'ratio':>6} {'paired':>6} {'ours peak':>9} {'diff peak':>9}",
    ]
    peaks = r["peak_gib"]
    for stage in STAGES:
        ratio = r["ratio"].get(stage)
        lines.append(
            f"{stage:<8} {r['ours_ms'][stage]:>10.1f} {r['diffusers_ms'][stage]:>10.1f}"
            f" {_ratio(ratio):>6} {_ratio(r['paired_ratio'].get(stage)):>6}"
            f" {_gib(peaks['ours'], stage):>9} {_gib(peaks['diffusers'], stage):>9}"
        )
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gib(peaks: dict | None, stage: str) -> str:
    if not peaks or stage not in peaks:
        return "-"
    return f"{peaks[stage]:.3f}"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"--plot {path}: matplotlib is not installed, no plot written (pip install matplotlib)")
        return
    results = report["results"]
    stages = [st for st in STAGES if st != "denoise"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        x = np.arange(len(stages))
        ax.bar(x - 0.2, [r["ours_ms"][st] for st in stages], 0.4, label="flux2")
        ax.bar(x + 0.2, [r["diffusers_ms"][st] for st in stages], 0.4, label="diffusers")
        ax.set_xticks(x, stages)
        ax.set_title(f"{r['config']} {r['size']}px ({r['steps']} steps)")
        ax.set_ylabel("ms (median)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot written to {path}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s = resolve(parse_args(argv))
    if s.probe:
        return probe(s)
    report = {"env": environment(s), "results": []}
    for config in s.configs:
        report["results"] += bench_config(config, s, argv)
    print(format_table(report), file=sys.stderr)
    line = json.dumps(report)
    print(line)
    if s.json_out:
        s.json_out.write_text(line + "\n")
    if s.plot:
        plot(report, s.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
