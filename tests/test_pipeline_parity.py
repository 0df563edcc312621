"""Whole-pipeline parity with diffusers 0.42.1's FLUX.2 pipelines on tiny random-weight models (fp32, CPU).

Our `Flux2Pipeline` and diffusers' `Flux2KleinPipeline` / `Flux2KleinKVPipeline` / `Flux2Pipeline` run with the
same random weights (our state dicts mapped through `flux2.checkpoints`, loaded strictly), the same text encoder
objects, the same seed and the same reference image; the final latents and decoded images must agree.
Each comparison has a negative control: one documented ingredient changed must move the result by at least
CONTROL_FACTOR times the tolerance.

Known, accounted-for divergences (so agreement is to fp32 rounding, not bit-exact):
- schedule: diffusers builds sigmas as float32 numpy `linspace(1, 1/N, N)` + shift; ours torch `linspace(1, 0, N+1)`
  (measured: at most one float32 ulp apart, 1.2e-7);
- diffusers passes `timestep = sigma * 1000` and divides by 1000 before the model; it does the Euler step in fp32
  with float32 `sigma_next - sigma`; its RoPE tables are float64, ours float32;
- decoded images: diffusers' "pt"/"np" output is `(x / 2 + 0.5).clamp(0, 1)`; its "pil" rounds to uint8, while
  ours (like the reference) truncates, so uint8 images are compared within one level;
- reference images: diffusers caps each at 1024² px, ours a single one at 2024² (the reference's cap) and each
  of several at 1024², so the references used here are small enough for no cap to apply; diffusers' output size
  defaults to the first reference's size, so height/width are always passed.

Run with `--log-cli-level=INFO` to see every measured difference (and the summary at the end).
"""

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE
from PIL import Image, ImageChops
from tiny_encoders import tiny_mistral3
from torch import Tensor, nn

from flux2.autoencoder import AutoEncoder, AutoEncoderParams
from flux2.checkpoints.autoencoder import ae_original_to_diffusers, diffusers_ae_config
from flux2.checkpoints.transformer import (
    DIFFUSERS_SCHEDULER_CONFIG,
    diffusers_transformer_config,
    transformer_original_to_diffusers,
)
from flux2.model import Flux2
from flux2.pipeline import Flux2Pipeline
from flux2.registry import TINY_AE_PARAMS, TINY_PARAMS
from flux2.sampling import get_schedule
from flux2.text_encoder import SYSTEM_MESSAGE, Mistral3SmallEmbedder, Qwen3Embedder
from flux2.tiny import random_ae, random_flow_model
from flux2.tiny_text_encoders import tiny_qwen3

log = logging.getLogger(__name__)

PROMPT = "a red fox jumping over a frozen creek at dawn"
SEED = 1234
WIDTH, HEIGHT = 96, 64  # non-square, so a swapped h/w anywhere shows; a 6 x 4 latent grid (24 tokens)
PATCH_PX = 16  # pixels per latent token: 8x VAE downsampling, then the 2x2 patchify

# Max-abs tolerances, fp32. Latents are normalised (max |z| about 4 here), images are in [0, 1]. Measured with
# one torch thread: at most 2.2e-6 (latents) and 3.1e-6 (images), the fp32 rounding that the divergences above
# add up to over 3-4 steps; the weakest negative control moves both by about 4e-4.
LATENT_TOL = 1e-5
IMAGE_TOL = 2e-5
SCHEDULE_TOL = 1e-6
UINT8_TOL = 1  # a float difference of ~1e-6 can still cross a truncation boundary
CONTROL_FACTOR = 10  # a negative control must exceed the tolerance by at least this factor

DISTILLED = dict(num_inference_steps=4, guidance_scale=1.0)  # the distilled klein models' fixed settings
BASE_STEPS, CFG = 3, 4.0
BASE = dict(num_inference_steps=BASE_STEPS, guidance_scale=CFG)


# ----------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report() -> Iterator[dict[str, float]]:
    """Every measured max-abs difference, logged one by one and once more together at the end of the module."""
    measured: dict[str, float] = {}
    yield measured
    log.info("pipeline parity, max-abs differences:\n%s", "\n".join(f"  {k}: {v:.3e}" for k, v in measured.items()))


def measure(report: dict[str, float], name: str, ours: Tensor | np.ndarray, theirs: Tensor | np.ndarray) -> float:
    ours_t, theirs_t = torch.as_tensor(ours), torch.as_tensor(theirs)
    assert ours_t.shape == theirs_t.shape, f"{name}: shape {tuple(ours_t.shape)} vs {tuple(theirs_t.shape)}"
    diff = (ours_t.double() - theirs_t.double()).abs().max().item()
    report[name] = diff
    log.info("%s: max-abs diff %.3e", name, diff)
    return diff


def assert_control_fails(diff: float, tol: float, what: str) -> None:
    assert diff > CONTROL_FACTOR * tol, f"negative control ({what}) did not break the comparison: {diff:.3e}"


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Matmuls this small are slower, and erratic, when torch splits them over threads on 2 shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingAE(AutoEncoder):
    """Our autoencoder, keeping the last decode's input latents and float output for the comparisons."""

    last_decode: tuple[Tensor, Tensor] | None = None

    def decode(self, z: Tensor) -> Tensor:
        pixels = super().decode(z)
        self.last_decode = (z.detach().clone(), pixels.detach().clone())
        return pixels


def recording_ae(params: AutoEncoderParams, seed: int) -> RecordingAE:
    ae = RecordingAE(params)
    ae.load_state_dict(random_ae(params, seed=seed).state_dict(), strict=True)
    return ae.eval()


def diffusers_transformer(model: Flux2) -> Flux2Transformer2DModel:
    """diffusers' twin of our transformer: same sizes, our weights through the documented key mapping."""
    theirs = Flux2Transformer2DModel(**diffusers_transformer_config(model.params))
    theirs.load_state_dict(transformer_original_to_diffusers(model.state_dict()), strict=True)
    return theirs.eval()


def diffusers_ae(ae: AutoEncoder) -> AutoencoderKLFlux2:
    """diffusers' twin of our autoencoder; the BatchNorm running statistics travel with the state dict."""
    theirs = AutoencoderKLFlux2(**diffusers_ae_config(ae.params))
    theirs.load_state_dict(ae_original_to_diffusers(ae.state_dict()), strict=True)
    assert torch.equal(theirs.bn.running_var, ae.bn.running_var)
    return theirs.eval()


def flux2_scheduler(**overrides) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's published scheduler config, which the FLUX.2 repos are taken to share (not checkable offline).

    With `mu` passed by the pipeline, only `use_dynamic_shifting`, `time_shift_type` and `shift_terminal` change
    `set_timesteps`; shift / base_shift / max_shift / the seq-len bounds are not read, so their exact values cannot
    matter here. Without `use_dynamic_shifting`, `mu` is silently ignored and the static `shift` applies instead.
    """
    return FlowMatchEulerDiscreteScheduler(**{**DIFFUSERS_SCHEDULER_CONFIG, **overrides})


@dataclass
class Twins:
    """Our pipeline and the diffusers components holding the same weights."""

    ours: Flux2Pipeline
    transformer: Flux2Transformer2DModel  # diffusers' copy of ours.flow_model
    vae: AutoencoderKLFlux2  # diffusers' copy of ours.ae
    text_model: nn.Module  # the transformers model both sides encode with
    tokenizer: object


# Narrower than TINY_AE_PARAMS: with its random weights the reference latents are larger, so the KV-vs-plain
# negative control moves the output well past the tolerance (with TINY_AE_PARAMS only 9x the tolerance).
PARITY_AE_PARAMS = replace(TINY_AE_PARAMS, ch=8, norm_groups=4)


@pytest.fixture(scope="module")
def ae_pair() -> tuple[RecordingAE, AutoencoderKLFlux2]:
    ae = recording_ae(PARITY_AE_PARAMS, seed=2)
    return ae, diffusers_ae(ae)


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3(seed=0)


@pytest.fixture(scope="module")
def klein_flow() -> Flux2:
    return random_flow_model(TINY_PARAMS, seed=1).eval()  # no guidance embedder, as klein


@pytest.fixture(scope="module")
def klein_transformer(klein_flow) -> Flux2Transformer2DModel:
    return diffusers_transformer(klein_flow)


@pytest.fixture(scope="module")
def klein_encoder(qwen3) -> Qwen3Embedder:
    model, tokenizer = qwen3
    return Qwen3Embedder(model, tokenizer=tokenizer, dtype=torch.float32)


@pytest.fixture(scope="module")
def klein(klein_flow, klein_transformer, klein_encoder, ae_pair, qwen3):
    """Our klein pipeline for a registry name (its loop: distilled, CFG or KV), with its diffusers twins."""
    ae, vae = ae_pair

    def make(name: str, transformer: Flux2Transformer2DModel | None = None) -> Twins:
        ours = Flux2Pipeline(
            name, device="cpu", dtype=torch.float32, flow_model=klein_flow, ae=ae, text_encoder=klein_encoder
        )
        return Twins(ours, transformer or klein_transformer, vae, *qwen3)

    return make


def oracle_pipeline(cls, twins: Twins, scheduler_overrides: dict | None = None, **options):
    """A diffusers pipeline of class `cls` over the twins' shared components, progress bar off."""
    pipe = cls(
        scheduler=flux2_scheduler(**(scheduler_overrides or {})),
        vae=twins.vae,
        text_encoder=twins.text_model,
        tokenizer=twins.tokenizer,
        transformer=twins.transformer,
        **options,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def klein_pipeline(twins: Twins, is_distilled: bool, **scheduler_overrides) -> Flux2KleinPipeline:
    return oracle_pipeline(Flux2KleinPipeline, twins, scheduler_overrides, is_distilled=is_distilled)


@pytest.fixture(scope="module")
def reference_image() -> Image.Image:
    """80 x 72 px: cropped to 80 x 64 by both sides (centre crop, top offset 4); far below either pixel cap."""
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(72, 80, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def second_reference_image() -> Image.Image:
    """64 x 100 px: cropped to 64 x 96 by both sides (top offset 2). Its width is already a multiple of 16, so
    diffusers' "crop" resize mode does not resample it (it would for two unaligned sides; ours only crops).
    Dark noise (levels 0-63), unlike the first reference, so that swapping the two moves the result clearly."""
    rng = np.random.default_rng(8)
    return Image.fromarray(rng.integers(0, 64, size=(100, 64, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- running both sides


@contextmanager
def recorded_calls(module: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """(args, kwargs) of every `module(...)` call made inside the block."""
    calls: list[tuple[tuple, dict]] = []
    handle = module.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@dataclass
class Result:
    latents: Tensor  # final normalised latents [1, 4 * z_channels, h, w], before the BN inverse and decode
    image: Tensor  # [1, 3, H, W] in [0, 1]
    calls: list[tuple[tuple, dict]]  # transformer calls (plain forward only; our KV forwards are not hooked)
    uint8: np.ndarray | None = None  # [H, W, 3], ours only


def run_ours(pipe: Flux2Pipeline, seed: int = SEED, **kwargs) -> Result:
    pipe.ae.last_decode = None
    with recorded_calls(pipe.flow_model) as calls:
        [out] = pipe.generate(PROMPT, width=WIDTH, height=HEIGHT, seed=seed, **kwargs)
    z, pixels = pipe.ae.last_decode
    return Result(z, (pixels / 2 + 0.5).clamp(0, 1), calls, np.asarray(out.image))


def run_diffusers(pipe, seed: int = SEED, prompt: str | None = PROMPT, **kwargs) -> Result:
    """A diffusers FLUX.2 pipeline with a CPU generator (the noise ours draws); latents taken after the last step."""
    final: dict[str, Tensor] = {}

    def keep_latents(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    with recorded_calls(pipe.transformer) as calls:
        images = pipe(
            prompt=prompt,
            height=HEIGHT,
            width=WIDTH,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            callback_on_step_end=keep_latents,
            **kwargs,
        ).images
    return Result(unpack(final["latents"]), images, calls)


def unpack(tokens: Tensor) -> Tensor:
    """diffusers' packed target tokens [B, h*w, C] (row-major) -> [B, C, h, w]."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, HEIGHT // PATCH_PX, WIDTH // PATCH_PX)


def compare(report: dict[str, float], name: str, ours: Result, theirs: Result) -> tuple[float, float]:
    latent_diff = measure(report, f"{name} latents", ours.latents, theirs.latents)
    image_diff = measure(report, f"{name} image", ours.image, theirs.image)
    return latent_diff, image_diff


def assert_parity(report: dict[str, float], name: str, ours: Result, theirs: Result) -> None:
    latent_diff, image_diff = compare(report, name, ours, theirs)
    assert latent_diff < LATENT_TOL, f"{name}: latents differ by {latent_diff:.3e}"
    assert image_diff < IMAGE_TOL, f"{name}: images differ by {image_diff:.3e}"
    if ours.uint8 is not None:
        # Our uint8 image is the truncated float image; diffusers' float image truncated the same way.
        theirs_uint8 = (theirs.image[0].permute(1, 2, 0) * 255.0).to(torch.uint8).numpy()
        uint8_diff = measure(report, f"{name} uint8", ours.uint8.astype(np.int16), theirs_uint8.astype(np.int16))
        assert uint8_diff <= UINT8_TOL, f"{name}: uint8 images differ by {uint8_diff} levels"


def assert_control(report: dict[str, float], name: str, ours: Result, theirs: Result, what: str) -> None:
    latent_diff, image_diff = compare(report, f"{name} [control: {what}]", ours, theirs)
    assert_control_fails(latent_diff, LATENT_TOL, what)
    assert_control_fails(image_diff, IMAGE_TOL, what)


# ----------------------------------------------------------------------------- building blocks first


@pytest.mark.parametrize("steps, seq_len", [(4, 24), (3, 24), (50, 4096), (4, 4301)])
def test_schedule_matches_dynamic_shifting_scheduler(steps, seq_len, report):
    """Our schedule vs the scheduler fed diffusers' sigmas and mu (measured: at most 1 float32 ulp apart);
    without dynamic shifting, mu is ignored. 4301 tokens is just past the discontinuity of the empirical mu."""
    ours = torch.tensor(get_schedule(steps, seq_len))
    mu = compute_empirical_mu(image_seq_len=seq_len, num_steps=steps)
    sigmas = np.linspace(1.0, 1 / steps, steps)  # what the pipelines pass
    for name, scheduler in [("dynamic", flux2_scheduler()), ("static", flux2_scheduler(use_dynamic_shifting=False))]:
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        diff = measure(report, f"schedule {steps} steps, {seq_len} tokens ({name} shifting)", ours, scheduler.sigmas)
        if name == "dynamic":
            assert diff < SCHEDULE_TOL
            assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
        else:
            assert_control_fails(diff, SCHEDULE_TOL, "use_dynamic_shifting=False")


def test_noise_text_and_ids_are_identical(klein, report):
    """The first transformer call of both pipelines: same noise (bit for bit), same text embeddings and ids."""
    twins = klein("flux.2-klein-4b")
    with recorded_calls(twins.ours.flow_model) as ours_calls:
        twins.ours.generate(PROMPT, width=WIDTH, height=HEIGHT, seed=SEED)
    theirs = run_diffusers(klein_pipeline(twins, is_distilled=True), **DISTILLED)
    (x, x_ids, t, ctx, ctx_ids, guidance), _ = ours_calls[0]
    first = theirs.calls[0][1]
    assert torch.equal(x, first["hidden_states"]), "initial noise differs"
    assert torch.equal(x_ids, first["img_ids"])
    assert torch.equal(ctx, first["encoder_hidden_states"])
    assert torch.equal(ctx_ids, first["txt_ids"])
    # The reference's `denoise` always passes the guidance vector; a model without guidance embedder ignores it.
    assert first["guidance"] is None and guidance is not None and not twins.ours.flow_model.use_guidance_embed
    assert len(ours_calls) == len(theirs.calls) == DISTILLED["num_inference_steps"]
    for i, ((ours_args, _), (_, their_kwargs)) in enumerate(zip(ours_calls, theirs.calls, strict=True)):
        assert ours_args[2].dtype == their_kwargs["timestep"].dtype
        diff = measure(report, f"timestep {i}", ours_args[2], their_kwargs["timestep"])
        assert diff < SCHEDULE_TOL, f"timestep {i}: {ours_args[2].item()} vs {their_kwargs['timestep'].item()}"
    other_seed = run_diffusers(klein_pipeline(twins, is_distilled=True), seed=SEED + 1, **DISTILLED)
    assert not torch.equal(x, other_seed.calls[0][1]["hidden_states"])


# ----------------------------------------------------------------------------- 1. klein distilled, text-to-image


def test_klein_distilled_text_to_image(klein, report):
    twins = klein("flux.2-klein-4b")
    ours = run_ours(twins.ours)
    theirs = run_diffusers(klein_pipeline(twins, is_distilled=True), **DISTILLED)
    assert len(theirs.calls) == len(ours.calls) == 4
    assert_parity(report, "klein distilled t2i", ours, theirs)

    other_seed = run_diffusers(klein_pipeline(twins, is_distilled=True), seed=SEED + 1, **DISTILLED)
    assert_control(report, "klein distilled t2i", ours, other_seed, "seed + 1")
    static = klein_pipeline(twins, is_distilled=True, use_dynamic_shifting=False)
    assert_control(report, "klein distilled t2i", ours, run_diffusers(static, **DISTILLED), "no mu")


# ----------------------------------------------------------------------------- 2. klein base, true CFG


def test_klein_base_cfg_text_to_image(klein, report):
    """Ours batches [uncond; cond] in one forward, diffusers runs two; the negative is "" on both sides."""
    twins = klein("flux.2-klein-base-4b")
    ours = run_ours(twins.ours, num_steps=BASE_STEPS, guidance=CFG)
    theirs = run_diffusers(klein_pipeline(twins, is_distilled=False), **BASE)
    assert [args[0].shape[0] for args, _ in ours.calls] == [2] * BASE_STEPS
    assert len(theirs.calls) == 2 * BASE_STEPS
    # Ours is [uncond; cond] in one batch; diffusers calls cond, then uncond, each step.
    uncond, cond = ours.calls[0][0][3]
    assert torch.equal(cond, theirs.calls[0][1]["encoder_hidden_states"][0])
    assert torch.equal(uncond, theirs.calls[1][1]["encoder_hidden_states"][0])
    assert_parity(report, "klein base cfg t2i", ours, theirs)

    wrong_scale = run_diffusers(klein_pipeline(twins, is_distilled=False), **{**BASE, "guidance_scale": 3.0})
    assert_control(report, "klein base cfg t2i", ours, wrong_scale, "guidance 3.0")
    negative = run_ours(twins.ours, num_steps=BASE_STEPS, guidance=CFG, negative_prompt="blurry")
    assert_control(report, "klein base cfg t2i", negative, theirs, 'negative prompt "blurry"')


# ----------------------------------------------------------------------------- 3. klein editing, one reference


@pytest.mark.parametrize("name", ["flux.2-klein-4b", "flux.2-klein-base-4b"])
def test_klein_edit_one_reference(klein, reference_image, name, report):
    """The reference tokens go after the target (t = 10); with CFG they are in both halves, as in diffusers."""
    twins = klein(name)
    is_distilled = not twins.ours.info.uses_cfg
    settings = DISTILLED if is_distilled else BASE
    ours_settings = {} if is_distilled else dict(num_steps=BASE_STEPS, guidance=CFG)
    ours = run_ours(twins.ours, reference_images=[reference_image], **ours_settings)
    theirs = run_diffusers(klein_pipeline(twins, is_distilled), image=[reference_image], **settings)
    num_target = (WIDTH // PATCH_PX) * (HEIGHT // PATCH_PX)
    num_ref = (80 // PATCH_PX) * (64 // PATCH_PX)  # the 80 x 72 reference cropped to 80 x 64
    assert theirs.calls[0][1]["hidden_states"].shape[1] == ours.calls[0][0][0].shape[1] == num_target + num_ref
    ours_ids, their_ids = ours.calls[0][0][1], theirs.calls[0][1]["img_ids"]  # ours: one row per CFG half
    assert torch.equal(ours_ids, their_ids.expand(ours_ids.shape[0], -1, -1))
    assert_parity(report, f"{name} edit", ours, theirs)

    shifted = ImageChops.offset(reference_image, 1, 0)  # the same pixels, one column to the right (wrapped)
    control = run_diffusers(klein_pipeline(twins, is_distilled), image=[shifted], **settings)
    assert_control(report, f"{name} edit", ours, control, "reference shifted by 1 px")
    if not is_distilled:
        with dropping_refs_from_uncond(twins.transformer, num_target):
            control = run_diffusers(klein_pipeline(twins, is_distilled), image=[reference_image], **settings)
        assert len(control.calls) == 2 * BASE_STEPS
        assert_control(report, f"{name} edit", ours, control, "refs dropped from the uncond pass")


def test_klein_edit_two_references(klein, reference_image, second_reference_image, report):
    """Two references, concatenated after the target with t = 10 and t = 20 over their own latent grids. Both are
    below 1024² px, the per-reference cap of several references on both sides, so no resampling happens."""
    twins = klein("flux.2-klein-4b")
    refs = [reference_image, second_reference_image]
    ours = run_ours(twins.ours, reference_images=refs)
    theirs = run_diffusers(klein_pipeline(twins, is_distilled=True), image=refs, **DISTILLED)
    num_target = (WIDTH // PATCH_PX) * (HEIGHT // PATCH_PX)
    num_refs = [(80 // PATCH_PX) * (64 // PATCH_PX), (64 // PATCH_PX) * (96 // PATCH_PX)]
    ours_ids, their_ids = ours.calls[0][0][1], theirs.calls[0][1]["img_ids"]
    assert ours_ids.shape[1] == their_ids.shape[1] == num_target + sum(num_refs)
    assert torch.equal(ours_ids, their_ids)
    ref_t = ours_ids[0, num_target:, 0]
    assert ref_t.tolist() == [10] * num_refs[0] + [20] * num_refs[1]
    assert ours_ids[0, -1].tolist() == [20, 96 // PATCH_PX - 1, 64 // PATCH_PX - 1, 0]
    assert_parity(report, "klein edit two refs", ours, theirs)

    # Measured: the swap moves the latents by 4.8e-4 and the image by 3.0e-4 (thresholds 1e-4 and 2e-4).
    swapped = run_diffusers(klein_pipeline(twins, is_distilled=True), image=refs[::-1], **DISTILLED)
    assert_control(report, "klein edit two refs", ours, swapped, "references swapped")


@contextmanager
def dropping_refs_from_uncond(transformer: Flux2Transformer2DModel, num_target: int) -> Iterator[None]:
    """Make diffusers' CFG run its uncond pass (the second call of each step) on the target tokens only."""
    calls = itertools.count()

    def drop(_module, args, kwargs):
        if next(calls) % 2 == 1:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"][:, :num_target]}
            return args, {**kwargs, "img_ids": kwargs["img_ids"][:, :num_target]}
        return None

    handle = transformer.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- 4. klein KV


def test_klein_kv_edit(klein, klein_flow, reference_image, report):
    """Our KV loop (refs first, their K/V cached at step 0) vs Flux2KleinKVPipeline."""
    # Its own diffusers transformer: Flux2KleinKVPipeline swaps the attention processors of the one it is given.
    twins = klein("flux.2-klein-9b-kv", transformer=diffusers_transformer(klein_flow))
    ours = run_ours(twins.ours, reference_images=[reference_image])
    pipe = oracle_pipeline(Flux2KleinKVPipeline, twins)
    theirs = run_diffusers(pipe, image=[reference_image], num_inference_steps=4)
    assert [kwargs.get("kv_cache_mode") for _, kwargs in theirs.calls] == ["extract"] + ["cached"] * 3
    assert ours.calls == []  # our KV forwards are methods, not hooked calls: the plain forward never ran
    assert_parity(report, "klein kv edit", ours, theirs)

    plain_pipe = klein_pipeline(klein("flux.2-klein-4b"), is_distilled=True)
    plain = run_diffusers(plain_pipe, image=[reference_image], **DISTILLED)
    assert_control(report, "klein kv edit", ours, plain, "plain (non-KV) editing")


# ----------------------------------------------------------------------------- 5. [dev]


@pytest.fixture(scope="module")
def dev(ae_pair) -> Twins:
    model, processor = tiny_mistral3(seed=0)
    flow = random_flow_model(replace(TINY_PARAMS, use_guidance_embed=True), seed=3).eval()
    encoder = Mistral3SmallEmbedder(model, processor=processor, dtype=torch.float32)
    ae, vae = ae_pair
    ours = Flux2Pipeline("flux.2-dev", device="cpu", dtype=torch.float32, flow_model=flow, ae=ae, text_encoder=encoder)
    return Twins(ours, diffusers_transformer(flow), vae, model, processor)


def dev_pipeline(twins: Twins) -> diffusers.Flux2Pipeline:
    return oracle_pipeline(diffusers.Flux2Pipeline, twins)


def test_dev_guidance_embedded(dev, report):
    """[dev]: Mistral-3 encoding with the system message, guidance embedded (4.0), one forward per step."""
    # diffusers' system message is the reference's, line break after "object" included: prompts go in as text.
    assert DIFFUSERS_SYSTEM_MESSAGE == SYSTEM_MESSAGE
    ours = run_ours(dev.ours, num_steps=BASE_STEPS, guidance=CFG)
    theirs = run_diffusers(dev_pipeline(dev), num_inference_steps=BASE_STEPS, guidance_scale=CFG)
    assert len(ours.calls) == len(theirs.calls) == BASE_STEPS
    assert torch.equal(ours.calls[0][0][3], theirs.calls[0][1]["encoder_hidden_states"])
    assert torch.equal(ours.calls[0][0][5], theirs.calls[0][1]["guidance"])
    assert_parity(report, "dev t2i", ours, theirs)

    wrong = run_diffusers(dev_pipeline(dev), num_inference_steps=BASE_STEPS, guidance_scale=2.5)
    assert_control(report, "dev t2i", ours, wrong, "guidance 2.5")
    one_line = diffusers.Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        dev.text_model, dev.tokenizer, [PROMPT], system_message=SYSTEM_MESSAGE.replace("\n", " ")
    )
    flat = run_diffusers(
        dev_pipeline(dev), prompt=None, prompt_embeds=one_line, num_inference_steps=BASE_STEPS, guidance_scale=CFG
    )
    assert_control(report, "dev t2i", ours, flat, "system message without its line break")
