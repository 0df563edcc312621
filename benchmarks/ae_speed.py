"""Autoencoder decode/encode speed and decode peak memory: ours vs diffusers' AutoencoderKLFlux2, same weights.

Random weights cost exactly what real ones do. fp32 on the CPU. Variants:
  ours        AutoEncoder as built (NCHW)
  ours_cl     `channels_last(ae)`: conv weights, hence activations, NHWC
  ours_cpu    `cpu_autoencoder(ae)`: channels-last, upsample convs folded into transposed convs, Winograd for the
              wide 3×3 convs: what Flux2Pipeline does on a CPU
  diffusers   AutoencoderKLFlux2 loaded with the same weights (the pipeline's patchify/BN maths excluded)
Timing: the variants run interleaved, round after round, so machine noise hits them alike; medians and the
ratio to diffusers. Memory: one decode per variant in a fresh subprocess; the peak RSS during the decode (VmHWM,
reset after building the model) and its rise over the RSS before it (weights and imports excluded).
`ours_tiled` decodes in tiles (--tile, default 512 px tiles with 128 px overlap).

  python benchmarks/ae_speed.py                                   # the full set (long on a small CPU)
  python benchmarks/ae_speed.py --widths tiny --sizes 256 --memory-size 512 --iters 3
Last stdout line: JSON.
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from flux2.autoencoder import AutoEncoder, AutoEncoderParams, channels_last, unpatchify
from flux2.checkpoints.autoencoder import ae_original_to_diffusers, diffusers_ae_config
from flux2.registry import TINY_AE_PARAMS
from flux2.tiny import random_ae
from flux2.transforms.cpu_autoencoder import cpu_autoencoder
from flux2.transforms.tiling import TilingConfig, tiled_decode

WIDTHS = {"tiny": TINY_AE_PARAMS, "real": AutoEncoderParams()}  # the default is the real FLUX.2 AE


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(width: str):
    """Our AE, its channels-last and CPU-setup copies and the diffusers twin, all with the same weights."""
    from diffusers import AutoencoderKLFlux2

    ours = random_ae(WIDTHS[width])
    ours_cl = channels_last(random_ae(WIDTHS[width]))  # same seed: same weights
    ours_cpu = cpu_autoencoder(random_ae(WIDTHS[width]))
    theirs = AutoencoderKLFlux2(**diffusers_ae_config(ours.params)).eval()
    theirs.load_state_dict(ae_original_to_diffusers(ours.state_dict()), strict=True)
    return ours, ours_cl, ours_cpu, theirs


def diffusers_decode(ae: AutoEncoder, twin, z: Tensor) -> Tensor:
    """The VAE call alone; the BN/unpatchify maths are negligible and kept outside, as in ours they are inside."""
    return twin.decode(unpatchify(ae.inv_normalize(z))).sample


def calls(width: str, size: int) -> dict[str, Callable[[], Tensor]]:
    ours, ours_cl, ours_cpu, theirs = build(width)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4 * ours.params.z_channels, size // 16, size // 16, generator=gen)
    x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    return {
        "decode/ours": lambda: ours.decode(z),
        "decode/ours_cl": lambda: ours_cl.decode(z),
        "decode/ours_cpu": lambda: ours_cpu.decode(z),
        "decode/diffusers": lambda: diffusers_decode(ours, theirs, z),
        "encode/ours": lambda: ours.encode(x),
        "encode/ours_cl": lambda: ours_cl.encode(x),
        "encode/diffusers": lambda: theirs.encode(x).latent_dist.mode(),
    }


def time_interleaved(fns: dict[str, Callable[[], Tensor]], iters: int) -> dict[str, float]:
    """One untimed warm-up each, then `iters` rounds of every variant; median seconds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """Each variant's median over diffusers' median for the same operation."""
    return {
        name: round(t / medians[name.split("/")[0] + "/diffusers"], 3)
        for name, t in medians.items()
        if not name.endswith("diffusers")
    }


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM, so building the models does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(width: str, variant: str, size: int, tiling: TilingConfig) -> dict:
    """Runs in a fresh process: one decode of `variant`; the peak RSS during it and its rise over the RSS before."""
    ours = random_ae(WIDTHS[width])
    z = torch.randn(1, 4 * ours.params.z_channels, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
    if variant == "diffusers":  # the twin alone stays resident, as `ours` alone does for the other variants
        from diffusers import AutoencoderKLFlux2

        twin = AutoencoderKLFlux2(**diffusers_ae_config(ours.params)).eval()
        twin.load_state_dict(ae_original_to_diffusers(ours.state_dict()), strict=True)
        z_vae = unpatchify(ours.inv_normalize(z))
        del ours
        fn = lambda: twin.decode(z_vae).sample  # noqa: E731
    elif variant == "ours_tiled":
        fn = lambda: tiled_decode(ours, z, tiling)  # noqa: E731
    else:
        ae = {"ours_cl": channels_last, "ours_cpu": cpu_autoencoder}.get(variant, lambda ae: ae)(ours)
        fn = lambda: ae.decode(z)  # noqa: E731
    gc.collect()
    reset_peak_rss()
    before = rss_bytes("VmRSS")
    with torch.inference_mode():
        fn()
    peak = rss_bytes("VmHWM")
    return {"peak_rss_mib": round(peak / 2**20), "rise_mib": round((peak - before) / 2**20)}


def memory(width: str, size: int, variants: list[str], tile: list[int]) -> dict[str, dict]:
    out = {}
    for variant in variants:
        log(f"memory: {width} {variant} decode at {size}²")
        cmd = [sys.executable, __file__, "--memory-child", variant, "--widths", width, "--memory-size", str(size)]
        cmd += ["--tile", *map(str, tile)]
        out[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    p.add_argument("--sizes", nargs="*", type=int, default=[256, 512], help="image sides for the timing")
    p.add_argument("--iters", type=int, default=3, help="timed rounds per width and size")
    p.add_argument("--memory-size", type=int, default=1024, help="image side of the memory run (0: skip)")
    p.add_argument("--memory-width", choices=list(WIDTHS), default="real")
    p.add_argument("--memory-variants", nargs="+", default=["ours", "ours_cl", "ours_cpu", "ours_tiled", "diffusers"])
    p.add_argument("--tile", nargs=2, type=int, default=[32, 8], help="tile and overlap (latent cells) of ours_tiled")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        tiling = TilingConfig(*args.tile)
        print(json.dumps(memory_child(args.widths[0], args.memory_child, args.memory_size, tiling)))
        return 0
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "timing": {}}
    for width in args.widths:
        for size in args.sizes:
            log(f"timing: {width} at {size}², {args.iters} interleaved rounds")
            medians = time_interleaved(calls(width, size), args.iters)
            report["timing"][f"{width}/{size}"] = {"median_s": medians, "vs_diffusers": ratios(medians)}
            log(json.dumps(report["timing"][f"{width}/{size}"]))
    if args.memory_size:
        key = f"{args.memory_width}/{args.memory_size}"
        report["memory"] = {key: memory(args.memory_width, args.memory_size, args.memory_variants, args.tile)}
        report["memory"]["tile"] = args.tile
        log(json.dumps(report["memory"]))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
