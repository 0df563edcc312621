"""Inpainting parity with diffusers 0.42.1's `Flux2KleinInpaintPipeline` on tiny random-weight models (fp32, CPU).

Our `Flux2Pipeline.inpaint` and diffusers' klein inpaint pipeline run with the same twins as
tests/test_pipeline_parity.py (its fixtures and helpers are reused): the same weights, text encoder, seed, source
image, mask and extra reference. Both sides must agree on the final latents and on the decoded float image.

The algorithm both sides share: the mask binarised at 0.5 and brought to token resolution by bilinear
interpolation (no threshold, so a token whose 16 x 16 px block is half white in its centre gets 0.5); the
schedule cut as `t_start = int(max(N - min(N * strength, N), 0))`; the start `sigma * noise + (1 - sigma) *
source`; after every step the kept region put back as the source re-noised to the NEXT sigma (clean after the last
step); the clean source latents as reference tokens with t = 10, extra references from t = 20; CFG (klein base)
with the references in both the conditional and the unconditional pass.

Intentional differences, each switched off here (the accounted-for fp32 ones are those of the parity module):
- pixel composite: ours pastes the exact source pixels back where the (feathered) mask is black after decoding,
  diffusers only blends latents (no composite without `padding_mask_crop`). So the decoded image is compared
  BEFORE our composite: `RecordingAE.last_decode`. The composite itself is checked on its own.
- mask feathering: ours blurs the mask by `mask_blur` = 8 px by default (latent mask and composite), diffusers
  applies no blur unless the caller runs `mask_processor.blur`. Here `mask_blur=0`.
- pixel caps: a single reference is capped at 2024² px on our side (the reference implementation's cap), at
  1024² in diffusers; the source is edited at up to 1024² on both sides (ours with `max_pixels`). The images here
  are far below every cap, and aligned to 16 px, so nothing is resampled (diffusers LANCZOS-stretches an
  unaligned source where ours floors the working size).
- `padding_mask_crop` vs our `crop_padding`: diffusers' paste-back of the crop is a centre crop of the generated
  image instead of a downscale (a diffusers bug) and its box ignores the 1 MP cap; ours scales the generated
  region back into the box. Not compared: `crop_padding=None` / `padding_mask_crop=None`.

Run with `--log-cli-level=INFO` to see every measured difference (and the summary at the end).
"""

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import test_pipeline_parity as parity
import torch
from diffusers import Flux2KleinInpaintPipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image, ImageOps
from test_pipeline_parity import (
    BASE,
    BASE_STEPS,
    CFG,
    DISTILLED,
    HEIGHT,
    IMAGE_TOL,
    LATENT_TOL,
    PATCH_PX,
    PROMPT,
    SCHEDULE_TOL,
    SEED,
    WIDTH,
    Result,
    Twins,
    assert_control_fails,
    flux2_scheduler,
    measure,
    oracle_pipeline,
    recorded_calls,
    run_diffusers,
)
from torch import Tensor

import flux2.pipeline
import flux2.sampling
from flux2.editing import binary_mask, latent_mask
from flux2.pipeline import Flux2Pipeline
from flux2.sampling import euler, get_schedule, truncated_schedule

log = logging.getLogger(__name__)

# The parity module's fixtures (module-scoped there, so built once more for this module): the twins factory
# `klein` and what it is made of, and the 80 x 72 px extra reference (centre-cropped to 80 x 64 by both sides).
ae_pair, qwen3, klein_flow, klein_transformer, klein_encoder, klein, reference_image = (
    parity.ae_pair,
    parity.qwen3,
    parity.klein_flow,
    parity.klein_transformer,
    parity.klein_encoder,
    parity.klein,
    parity.reference_image,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one torch thread for the whole module

NUM_TARGET = (WIDTH // PATCH_PX) * (HEIGHT // PATCH_PX)  # 6 x 4 = 24 target tokens
HALF_TOKEN = 5  # row 0, column 5: the block whose centre is half white (a 0.5 token)


@pytest.fixture(scope="module")
def report() -> Iterator[dict[str, float]]:
    measured: dict[str, float] = {}
    yield measured
    log.info("inpaint parity, max-abs differences:\n%s", "\n".join(f"  {k}: {v:.3e}" for k, v in measured.items()))


@pytest.fixture(scope="module")
def source() -> Image.Image:
    """96 x 64 px (WIDTH x HEIGHT): the output size on both sides, aligned, so nothing is resampled."""
    rng = np.random.default_rng(11)
    return Image.fromarray(rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """Mode "L", 0/255, white = regenerate: token columns 1-3 of rows 1-2 (block-aligned), plus the top half of the
    block at row 0, column 5. Both sides read a token as the mean of its block's central 2 x 2 px (rows 7-8 of
    the block), so that block gives a 0.5 token; an area average, nearest or a threshold would not."""
    pixels = np.zeros((HEIGHT, WIDTH), np.uint8)
    pixels[16:48, 16:64] = 255
    pixels[0:8, 80:96] = 255
    return Image.fromarray(pixels, mode="L")


def expected_latent_mask() -> Tensor:
    tokens = torch.zeros(HEIGHT // PATCH_PX, WIDTH // PATCH_PX)
    tokens[1:3, 1:4] = 1.0
    tokens[0, HALF_TOKEN] = 0.5
    return tokens.flatten()


def packed(latents: Tensor) -> Tensor:
    """[1, C, h, w] -> row-major tokens [1, h*w, C], the layout of both sides' sequences."""
    return latents.flatten(2).transpose(1, 2)


def run_inpaint(pipe: Flux2Pipeline, source: Image.Image, mask: Image.Image, **kwargs) -> Result:
    """Our inpaint; the latents and float image are those of the decode, before the pixel composite."""
    pipe.ae.last_decode = None
    with recorded_calls(pipe.flow_model) as calls:
        [out] = pipe.inpaint(PROMPT, source, mask, mask_blur=0, seed=SEED, **kwargs)
    z, pixels = pipe.ae.last_decode
    return Result(z, (pixels / 2 + 0.5).clamp(0, 1), calls, np.asarray(out.image))


def run_oracle(twins: Twins, source, mask, reference, *, is_distilled: bool = True, **kwargs) -> Result:
    pipe = oracle_pipeline(Flux2KleinInpaintPipeline, twins, is_distilled=is_distilled)
    settings = DISTILLED if is_distilled else BASE
    return run_diffusers(pipe, image=source, mask_image=mask, image_reference=[reference], **{**settings, **kwargs})


def compare(report, name: str, ours: Result, theirs: Result) -> tuple[float, float]:
    latent_diff = measure(report, f"{name} latents", ours.latents, theirs.latents)
    image_diff = measure(report, f"{name} image (before our composite)", ours.image, theirs.image)
    return latent_diff, image_diff


def assert_parity(report, name: str, ours: Result, theirs: Result) -> None:
    latent_diff, image_diff = compare(report, name, ours, theirs)
    assert latent_diff < LATENT_TOL, f"{name}: latents differ by {latent_diff:.3e}"
    assert image_diff < IMAGE_TOL, f"{name}: images differ by {image_diff:.3e}"


def assert_control(report, name: str, ours: Result, theirs: Result, what: str) -> None:
    latent_diff, image_diff = compare(report, f"{name} [control: {what}]", ours, theirs)
    assert_control_fails(latent_diff, LATENT_TOL, what)
    assert_control_fails(image_diff, IMAGE_TOL, what)


def first_call(result: Result, ours: bool) -> tuple[Tensor, Tensor]:
    """(hidden states [B, L, C], ids [B, L, 4]) of the first transformer call: target tokens, then references."""
    args, kwargs = result.calls[0]
    return (args[0], args[1]) if ours else (kwargs["hidden_states"], kwargs["img_ids"])


# Two wrong ingredients for negative controls, patched into our pipeline inside one test only.


def euler_blending_at_current_sigma(img, timesteps, velocity, callback=None, blend=None):
    """The kept region re-noised to the step's start (sigma_i) instead of its end (sigma_i+1)."""
    current = iter(timesteps[:-1])
    return euler(img, timesteps, velocity, callback, lambda x, _t_next: blend(x, next(current)))


def thresholded_latent_mask(mask: Image.Image, width: int, height: int) -> Tensor:
    """The bilinear token mask rounded to 0/1: the 0.5 token becomes 1."""
    return (latent_mask(mask, width, height) >= 0.5).to(torch.float32)


# ----------------------------------------------------------------------------- klein distilled


@pytest.mark.parametrize("strength, steps", [(1.0, 4), (0.6, 3)])
def test_klein_inpaint_matches_diffusers(klein, source, mask, reference_image, strength, steps, report, monkeypatch):
    """Of 4 steps, strength 0.6 runs 3 (t_start = int(4 - 2.4) = 1) from the source noised to sigma_1. The
    negative controls change our side only; they run at strength 1, the strength control at 0.6."""
    twins = klein("flux.2-klein-4b")
    name = f"klein inpaint strength {strength}"
    ours = run_inpaint(twins.ours, source, mask, strength=strength, reference_images=[reference_image])
    theirs = run_oracle(twins, source, mask, reference_image, strength=strength)
    assert len(ours.calls) == len(theirs.calls) == steps

    # The sequence: target (t = 0), the clean source (t = 10, exactly the latents the blend uses), the reference.
    (ours_x, ours_ids), (their_x, their_ids) = first_call(ours, True), first_call(theirs, False)
    num_ref = (80 // PATCH_PX) * (64 // PATCH_PX)
    assert ours_x.shape[1] == their_x.shape[1] == 2 * NUM_TARGET + num_ref
    assert set(ours_ids[0, :, 0].tolist()) == set(their_ids[0, :, 0].tolist()) == {0, 10, 20}
    assert torch.equal(ours_ids, their_ids)
    source_tokens, their_source_tokens = ours_x[:, NUM_TARGET : 2 * NUM_TARGET], their_x[:, NUM_TARGET : 2 * NUM_TARGET]
    assert measure(report, f"{name} source tokens", source_tokens, their_source_tokens) < LATENT_TOL
    # The start: pure noise at strength 1 (bit for bit), else sigma * noise + (1 - sigma) * source.
    start_diff = measure(report, f"{name} start latents", ours_x[:, :NUM_TARGET], their_x[:, :NUM_TARGET])
    assert start_diff == 0 if strength == 1 else start_diff < LATENT_TOL

    # The kept tokens end exactly on the clean source latents (the last blend is at sigma 0), on both sides.
    kept = expected_latent_mask() == 0
    assert torch.equal(packed(ours.latents)[:, kept], source_tokens[:, kept])
    assert torch.equal(packed(theirs.latents)[:, kept], their_source_tokens[:, kept])
    assert_parity(report, name, ours, theirs)

    # Ours alone: the composite puts the exact source pixels back where the mask is black.
    black = np.asarray(mask) == 0
    assert np.array_equal(ours.uint8[black], np.asarray(source)[black])

    if strength < 1:
        full = run_inpaint(twins.ours, source, mask, strength=1.0, reference_images=[reference_image])
        assert_control(report, name, full, theirs, "ours at strength 1.0")
        return
    inverted = run_inpaint(twins.ours, source, ImageOps.invert(mask), reference_images=[reference_image])
    assert_control(report, name, inverted, theirs, "inverted mask")
    no_source_ref = run_inpaint(twins.ours, source, mask, source_as_reference=False, reference_images=[reference_image])
    assert_control(report, name, no_source_ref, theirs, "source_as_reference=False")
    with monkeypatch.context() as patch:
        patch.setattr(flux2.pipeline, "latent_mask", thresholded_latent_mask)
        thresholded = run_inpaint(twins.ours, source, mask, reference_images=[reference_image])
    assert_control(report, name, thresholded, theirs, "latent mask thresholded at 0.5")
    with monkeypatch.context() as patch:
        patch.setattr(flux2.sampling, "euler", euler_blending_at_current_sigma)
        current_sigma = run_inpaint(twins.ours, source, mask, reference_images=[reference_image])
    assert_control(report, name, current_sigma, theirs, "blend at the current sigma")


def test_latent_mask_matches_diffusers(mask):
    """Both sides' mask at token resolution, the 0.5 token included (diffusers' own preprocessing methods)."""
    ours = latent_mask(binary_mask(mask, mask.size), WIDTH, HEIGHT)
    pipe = Flux2KleinInpaintPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    processed = pipe.mask_processor.preprocess(mask, height=HEIGHT, width=WIDTH)
    theirs = pipe.prepare_mask_latents(processed, 1, 1, HEIGHT, WIDTH, torch.float32, "cpu")
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.flatten(), expected_latent_mask())


# ----------------------------------------------------------------------------- klein base, true CFG


def test_klein_base_inpaint_cfg_matches_diffusers(klein, source, mask, reference_image, report):
    """Ours batches [uncond; cond] in one forward, diffusers runs cond then uncond; the references (the source and
    the extra one) are in both passes on both sides."""
    twins = klein("flux.2-klein-base-4b")
    ours = run_inpaint(twins.ours, source, mask, reference_images=[reference_image], num_steps=BASE_STEPS, guidance=CFG)
    theirs = run_oracle(twins, source, mask, reference_image, is_distilled=False, strength=1.0)
    assert len(ours.calls) == BASE_STEPS and len(theirs.calls) == 2 * BASE_STEPS
    cond, uncond = theirs.calls[0][1]["hidden_states"], theirs.calls[1][1]["hidden_states"]
    assert uncond.shape == cond.shape and cond.shape[1] > NUM_TARGET
    x = ours.calls[0][0][0]
    assert x.shape == (2, cond.shape[1], cond.shape[2])
    assert torch.equal(x[0, NUM_TARGET:], x[1, NUM_TARGET:])  # the same references in the uncond half
    assert (
        measure(report, "klein base inpaint cfg uncond references", x[0, NUM_TARGET:], uncond[0, NUM_TARGET:])
        < LATENT_TOL
    )
    assert_parity(report, "klein base inpaint cfg", ours, theirs)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps, strength, t_start", [(50, 0.8, 10), (4, 0.6, 1), (4, 1.0, 0)])
def test_truncated_schedule_matches_get_timesteps(steps, strength, t_start, report):
    """Ours vs diffusers' own `get_timesteps` on the scheduler its pipeline sets up. (50, 0.8) is why the exact
    float expression matters: int(N * (1 - s)) would skip 9 steps, not 10."""
    seq_len = NUM_TARGET
    scheduler = flux2_scheduler()
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(image_seq_len=seq_len, num_steps=steps)
    )
    timesteps, remaining = Flux2KleinInpaintPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
    )
    ours = truncated_schedule(get_schedule(steps, seq_len), strength)
    assert remaining == len(ours) - 1 == steps - t_start
    assert scheduler.begin_index == t_start
    diff = measure(
        report, f"truncated schedule {steps} steps, strength {strength}", torch.tensor(ours[:-1]), timesteps / 1000
    )
    assert diff < SCHEDULE_TOL
    assert ours[-1] == 0.0
