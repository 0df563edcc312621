"""Inpainting, outpainting, image-to-image and CFG on the tiny model, through the pipeline object: what a user
sees (kept pixels exactly kept, the seed reproducing, strength moving between the source and a new image) and
the mechanics behind it (the known region re-noised with the same noise at every step, CFG halves)."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from flux2.editing import binary_mask, feathered
from flux2.images import image_to_tensor
from flux2.pipeline import Flux2Pipeline
from flux2.sampling import batched_prc_img, get_schedule, noised, truncated_schedule

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 96, 64


@pytest.fixture(scope="module")
def pipe() -> Flux2Pipeline:
    return Flux2Pipeline("tiny", device="cpu", watermark=None)  # the watermark would touch every pixel


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(H, W, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (32, 16, 80, 48))
    return mask


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@contextmanager
def model_inputs(pipe: Flux2Pipeline):
    """(x, kwargs) of every transformer call inside the block."""
    calls = []
    hook = pipe.flow_model.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


@contextmanager
def decoded_latents(pipe: Flux2Pipeline):
    """The normalised latents [1, C, h, w] handed to the autoencoder's decode, one per image."""
    seen, decode = [], pipe.ae.decode
    pipe.ae.decode = lambda z: decode(seen.append(z.clone()) or z)
    try:
        yield seen
    finally:
        del pipe.ae.decode


def source_tokens(pipe: Flux2Pipeline, image: Image.Image) -> torch.Tensor:
    with torch.inference_mode():
        return batched_prc_img(pipe.ae.encode(image_to_tensor(image)[None]))[0]


# ----------------------------------------------------------------------------- inpainting


def test_kept_pixels_are_the_source_exactly_and_the_masked_region_changes(pipe, source, mask):
    [out] = pipe.inpaint("a red door", source, mask, seed=5)
    result, original, kept = array(out.image), array(source), np.asarray(mask) == 0
    assert out.image.size == source.size and kept.sum() > 4000
    assert np.array_equal(result[kept], original[kept])  # every black pixel of the mask, exactly
    inside = np.asarray(feathered(mask, 8.0, inward=True)) == 255  # the mask minus its soft inner edge
    assert inside.sum() > 500 and (np.abs(result - original).sum(axis=2)[inside] > 0).mean() > 0.9
    record = out.record
    assert (record.mode, record.strength, record.seed) == ("inpaint", 1.0, 5) and record.source is not None
    [again] = pipe.inpaint("a red door", source, mask, seed=5)
    assert np.array_equal(array(again.image), result)  # the same seed gives the same image
    [other] = pipe.inpaint("a red door", source, mask, seed=6)
    assert not np.array_equal(array(other.image), result)


def test_the_known_region_is_the_source_renoised_with_the_same_noise_at_every_step(pipe, source, mask):
    with model_inputs(pipe) as calls:
        pipe.inpaint("x", source, mask, seed=7, strength=0.75, mask_blur=0, source_as_reference=False)
    src = source_tokens(pipe, source)
    noise = torch.randn(1, 16, H // 16, W // 16, generator=torch.Generator().manual_seed(7))
    noise = batched_prc_img(noise)[0]
    timesteps = truncated_schedule(get_schedule(4, src.shape[1]), 0.75)
    assert len(calls) == len(timesteps) - 1 == 3
    known = torch.from_numpy(np.asarray(mask.resize((W // 16, H // 16), Image.Resampling.NEAREST)) == 0).flatten()
    for (args, _), t in zip(calls, timesteps[:-1], strict=True):
        x = args[0][0]  # [L, C]: the model input at time t
        torch.testing.assert_close(x[known], noised(src, noise, t)[0][known], rtol=0, atol=1e-6)
    wrong_noise = noised(src, torch.randn_like(noise), timesteps[1])[0][known]
    assert (calls[1][0][0][0][known] - wrong_noise).abs().max() > 0.1  # control: other noise is visible


def test_strength_moves_between_the_source_and_a_new_image(pipe, source):
    white = Image.new("L", source.size, 255)
    with torch.inference_mode():
        src = pipe.ae.encode(image_to_tensor(source)[None])

    def distance(image: Image.Image, strength: float) -> float:
        with decoded_latents(pipe) as seen:
            pipe.inpaint("x", image, white, seed=3, strength=strength, num_steps=20, source_as_reference=False)
        return (seen[0] - src).abs().mean().item()

    near, middle, far = distance(source, 0.05), distance(source, 0.5), distance(source, 1.0)
    assert near < 0.5 * middle < 0.5 * far
    other = Image.fromarray(255 - np.asarray(source))
    assert distance(other, 1.0) == far  # at strength 1 the start is pure noise: the source does not matter


def test_all_black_mask_returns_the_source_and_all_white_is_generation_with_the_source_as_reference(pipe, source):
    [kept] = pipe.inpaint("x", source, Image.new("L", source.size, 0), seed=2)
    assert np.array_equal(array(kept.image), array(source))
    [inpainted] = pipe.inpaint("x", source, Image.new("L", source.size, 255), seed=2)
    [generated] = pipe.generate("x", width=W, height=H, reference_images=[source], seed=2)
    assert np.array_equal(array(inpainted.image), array(generated.image))


def test_a_tiny_masked_crop_is_scaled_up_at_most_four_times_per_side():
    """A 40 px mask with crop_padding is edited at 4x its box, not at the 1 MP working size (it took minutes)."""
    from flux2.editing import CROP_MAX_UPSCALE, edit_source
    from flux2.request import GenerationRequest

    image = Image.new("RGB", (1024, 1024), "grey")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (500, 500, 540, 540))
    settings = {"prompt": "x", "image": image, "mask": mask, "crop_padding": 12, "mask_blur": 0}
    request = GenerationRequest.from_settings("inpaint", mode="inpaint", **settings)
    source = edit_source(request)
    box = source.region.size
    assert box == (64, 64)  # 40 px + 12 px a side
    assert source.settings["work_size"] == [int(side * CROP_MAX_UPSCALE) for side in box]  # 256 x 256, not 1024
    assert source.settings["work_size"][0] * source.settings["work_size"][1] < request.max_pixels / 10


def test_crop_around_the_mask_runs_at_its_own_size_and_leaves_the_rest_untouched(pipe):
    big = Image.fromarray(np.random.default_rng(4).integers(0, 256, size=(200, 320, 3), dtype=np.uint8))
    small_mask = Image.new("L", big.size, 0)
    small_mask.paste(255, (200, 120, 232, 152))
    [out] = pipe.inpaint("x", big, small_mask, seed=1, crop_padding=8, mask_blur=2, max_pixels=128 * 128)
    assert out.image.size == big.size and (out.record.width, out.record.height) == big.size
    assert out.record.edit["work_size"] == [128, 128]  # the 64 x 64 px crop, scaled up to max_pixels
    box = (184, 104, 248, 168)  # the mask's box grown by 8 + 2 x 2 px, widened to the 64 px minimum
    outside = np.ones((200, 320), bool)
    outside[box[1] : box[3], box[0] : box[2]] = False
    assert np.array_equal(array(out.image)[outside], array(big)[outside])
    assert not np.array_equal(array(out.image)[~outside], array(big)[~outside])


def test_odd_sizes_and_a_smaller_mask_of_the_same_shape(pipe, source):
    odd = source.resize((101, 67))
    half_mask = Image.new("L", (50, 33), 0)
    half_mask.paste(255, (10, 10, 30, 25))
    [out] = pipe.inpaint("x", odd, half_mask, seed=1)
    assert out.image.size == (101, 67) and out.record.edit["work_size"] == [96, 64]
    with pytest.raises(ValueError, match="mask is 40x40 px but the image is 101x67 px"):
        pipe.inpaint("x", odd, Image.new("L", (40, 40)), seed=1)


# ----------------------------------------------------------------------------- outpainting and image-to-image


def test_outpaint_extends_the_canvas_and_keeps_the_source(pipe, source):
    [out] = pipe.outpaint("x", source, left=16, right=32, top=0, bottom=16, seed=1, mask_blur=4)
    assert out.image.size == (W + 48, H + 16) and out.record.mode == "outpaint"
    inner = array(out.image)[:H, 16 : 16 + W]
    assert np.array_equal(inner[8:-8, 8:-8], array(source)[8:-8, 8:-8])  # away from the feathered border
    with pytest.raises(ValueError, match="both sides must be multiples of 16"):
        pipe.outpaint("x", source, left=10)


def test_img2img_keeps_the_size_and_follows_strength(pipe, source):
    [out] = pipe.img2img("x", source, strength=0.5, seed=1)
    assert out.image.size == source.size and (out.record.mode, out.record.strength) == ("img2img", 0.5)
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got 0"):
        pipe.img2img("x", source, strength=0)
    with pytest.raises(ValueError, match="takes its size from the source image: do not pass width"):
        pipe.img2img("x", source, width=64)


# ----------------------------------------------------------------------------- bad input


def test_bad_masks_are_clear_errors(pipe, source, tmp_path):
    with pytest.raises(ValueError, match="mask must be a single-channel"):
        pipe.inpaint("x", source, source)  # an RGB image as the mask
    (tmp_path / "mask.png").write_text("not an image")
    with pytest.raises(ValueError, match="mask .*mask.png.* is not a readable image"):
        pipe.inpaint("x", source, tmp_path / "mask.png")
    with pytest.raises(ValueError, match="mask not found"):
        pipe.inpaint("x", source, tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got 1.5"):
        pipe.inpaint("x", source, Image.new("L", source.size), strength=1.5)
    assert binary_mask(Image.new("L", (4, 4), 127), (4, 4)).getextrema() == (0, 0)  # under half: kept
    with pytest.raises(ValueError, match="outpaint does not take crop_padding"):
        pipe.outpaint("x", source, left=16, crop_padding=4)


def test_masks_in_other_modes():
    sixteen_bit = Image.fromarray(np.array([[1000, 40000]], dtype=np.uint16))  # "I;16": half is 32767.5
    assert np.asarray(binary_mask(sixteen_bit, (2, 1))).tolist() == [[0, 255]]
    grey_as_rgb = Image.merge("RGB", [Image.new("L", (4, 4), 200)] * 3)  # a grey mask saved as colour
    assert binary_mask(grey_as_rgb, (4, 4)).getextrema() == (255, 255)
    for coloured in (Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGBA", (4, 4), (255, 255, 255, 128))):
        with pytest.raises(ValueError, match="mask must be a single-channel"):
            binary_mask(coloured, (4, 4))


# ----------------------------------------------------------------------------- CFG


@pytest.fixture(scope="module")
def parts(pipe):
    parts = dict(flow_model=pipe.flow_model, ae=pipe.ae, text_encoder=pipe.text_encoder, watermark=None)
    return dict(parts, device="cpu", dtype=torch.float32)


def test_cfg_batched_and_sequential_agree_and_keep_references_in_both_halves(parts, source):
    base = Flux2Pipeline("flux.2-klein-base-4b", **parts)
    run = dict(width=W, height=H, num_steps=3, seed=4, reference_images=[source], negative_prompt="blurry")
    with model_inputs(base) as batched_calls:
        [batched] = base.generate("a fox", cfg_mode="batched", **run)
    with model_inputs(base) as sequential_calls:
        [sequential] = base.generate("a fox", cfg_mode="sequential", **run)
    tokens = (W // 16) * (H // 16)
    assert [args[0].shape[:2] for args, _ in batched_calls] == [(2, 2 * tokens)] * 3  # [uncond; cond], refs in both
    assert [args[0].shape[:2] for args, _ in sequential_calls] == [(1, 2 * tokens)] * 6
    assert np.abs(array(batched.image) - array(sequential.image)).max() <= 1
    [plain_negative] = base.generate("a fox", **{**run, "negative_prompt": None})
    assert not np.array_equal(array(plain_negative.image), array(batched.image))  # the negative prompt matters


def test_out_of_memory_falls_back_to_sequential_cfg(parts, caplog):
    base = Flux2Pipeline("flux.2-klein-base-4b", **parts)

    calls = []

    def no_room_for_two(_module, args):  # the first batched step fits; the second runs out of memory
        calls.append(args[0].shape[0])
        if args[0].shape[0] == 2 and len(calls) == 2:
            raise torch.OutOfMemoryError("injected: no memory for the batched halves")

    [expected] = base.generate("a fox", width=W, height=H, num_steps=2, seed=1, cfg_mode="sequential")
    hook = base.flow_model.register_forward_pre_hook(no_room_for_two)
    try:
        [fallback] = base.generate("a fox", width=W, height=H, num_steps=2, seed=1)
        calls.clear()
        with pytest.raises(torch.OutOfMemoryError):
            base.generate("a fox", width=W, height=H, num_steps=2, seed=1, cfg_mode="batched")
    finally:
        hook.remove()
    assert np.array_equal(array(fallback.image), array(expected.image))
    assert "running them one after the other" in caplog.text


def test_true_cfg_is_an_explicit_opt_in_and_guidance_is_never_a_dead_knob(parts, caplog):
    klein = Flux2Pipeline("flux.2-klein-4b", **parts)
    with pytest.raises(ValueError, match="does not use a negative prompt: only CFG does"):
        klein.generate("a fox", width=32, height=32, negative_prompt="blurry")
    with pytest.raises(ValueError, match="guidance is fixed at 1.0"):
        klein.generate("a fox", width=32, height=32, guidance=3.0)
    tiny = Flux2Pipeline("tiny", **parts)  # no guidance embedding, no CFG, nothing fixed: guidance would do nothing
    with pytest.raises(ValueError, match="tiny has no guidance"):
        tiny.generate("a fox", width=32, height=32, guidance=7.0)
    [plain] = klein.generate("a fox", width=32, height=32, seed=1)
    [cfg] = klein.generate("a fox", width=32, height=32, seed=1, true_cfg_scale=3.0, negative_prompt="blurry")
    assert "twice per step" in caplog.text and cfg.record.true_cfg_scale == 3.0
    assert not np.array_equal(array(plain.image), array(cfg.image))
    with pytest.raises(ValueError, match="true_cfg_scale must be a number > 1"):
        klein.generate("a fox", width=32, height=32, true_cfg_scale=1.0)
    base = Flux2Pipeline("flux.2-klein-base-4b", **parts)
    with pytest.raises(ValueError, match="runs true CFG already: its scale is `guidance`"):
        base.generate("a fox", width=32, height=32, true_cfg_scale=3.0)
    with pytest.raises(ValueError, match="cfg_mode must be one of auto, batched, sequential"):
        base.generate("a fox", width=32, height=32, cfg_mode="parallel")


# ----------------------------------------------------------------------------- IP-Adapter


@pytest.fixture(scope="module")
def ip_pipe(parts, tmp_path_factory):
    from test_ip_adapter import save_tiny_ip_adapter

    from flux2.ip_adapter import IPAdapter
    from flux2.registry import TINY_PARAMS

    weights, encoder = save_tiny_ip_adapter(tmp_path_factory.mktemp("ip"), TINY_PARAMS.hidden_size)
    adapter = IPAdapter.from_files(weights, TINY_PARAMS.hidden_size, image_encoder=encoder, dtype=torch.float32)
    return Flux2Pipeline("tiny", ip_adapter=adapter, **parts)


def test_ip_adapter_tokens_condition_the_text_stream_and_scale_zero_is_the_plain_run(ip_pipe, source):
    run = dict(width=W, height=H, seed=8)
    [plain] = ip_pipe.generate("a fox", **run)
    [zero] = ip_pipe.generate("a fox", ip_adapter_images=[source], ip_adapter_scale=0.0, **run)
    with model_inputs(ip_pipe) as calls:
        [styled] = ip_pipe.generate("a fox", ip_adapter_images=[source], ip_adapter_scale=1.0, **run)
    assert np.array_equal(array(zero.image), array(plain.image))
    assert not np.array_equal(array(styled.image), array(plain.image))
    args, kwargs = calls[0]
    assert kwargs["txt_extra"].shape == (1, 4, 64)
    assert args[4].shape[1] == args[3].shape[1] + 4  # the text ids cover the 4 image tokens, after the text
    assert args[4][0, -4:, 3].tolist() == [args[3].shape[1] + k for k in range(4)]
    assert styled.record.ip_adapter_scale == 1.0 and plain.record.ip_adapter_scale is None


def test_ip_adapter_tokens_stay_out_of_the_unconditional_pass(ip_pipe, source):
    with model_inputs(ip_pipe) as calls:
        ip_pipe.generate("a fox", width=W, height=H, seed=8, true_cfg_scale=2.0, ip_adapter_images=[source])
    assert len(calls) == 8  # CFG runs the halves one after the other: uncond, cond at each of 4 steps
    assert [kwargs.get("txt_extra") is not None for _, kwargs in calls] == [False, True] * 4
    with pytest.raises(ValueError, match="use cfg_mode sequential or auto"):
        ip_pipe.generate("a fox", true_cfg_scale=2.0, cfg_mode="batched", ip_adapter_images=[source])
    with pytest.raises(ValueError, match="ip_adapter_scale must be a finite number >= 0"):
        ip_pipe.generate("a fox", ip_adapter_images=[source], ip_adapter_scale=-1)


def test_true_cfg_on_dev_keeps_its_embedded_guidance_in_both_halves(parts, caplog):
    from dataclasses import replace as replaced

    from flux2.registry import TINY_PARAMS
    from flux2.tiny import random_flow_model

    dev_like = random_flow_model(replaced(TINY_PARAMS, use_guidance_embed=True), seed=2)
    dev = Flux2Pipeline("flux.2-dev", **{**parts, "flow_model": dev_like})
    with model_inputs(dev) as calls:
        [out] = dev.generate("a fox", width=32, height=32, num_steps=2, guidance=2.5, true_cfg_scale=3.0, seed=1)
    assert [args[0].shape[0] for args, _ in calls] == [2, 2]  # [uncond; cond] batched
    assert all(args[5].tolist() == [2.5, 2.5] for args, _ in calls)  # the embedded guidance, in both halves
    assert (out.record.guidance, out.record.true_cfg_scale) == (2.5, 3.0)
    assert "twice per step" in caplog.text


def test_ip_adapter_scale_moves_the_result_in_proportion(ip_pipe, source):
    run = dict(width=W, height=H, seed=8)

    def latents(scale: float) -> torch.Tensor:
        with decoded_latents(ip_pipe) as seen:
            ip_pipe.generate("a fox", ip_adapter_images=[source], ip_adapter_scale=scale, **run)
        return seen[0]

    plain, half, full = latents(0.0), latents(0.5), latents(1.0)
    assert 0.3 < (half - plain).abs().mean() / (full - plain).abs().mean() < 0.7  # not a dead knob above 0


def test_kv_model_inpaints_through_the_kv_path_and_records_it(parts, source, mask):
    kv = Flux2Pipeline("flux.2-klein-9b-kv", **parts)
    [out] = kv.inpaint("x", source, mask, seed=1)
    assert out.record.kv_cache and out.record.mode == "inpaint"
    [plain] = kv.inpaint("x", source, mask, seed=1, source_as_reference=False)
    assert not plain.record.kv_cache  # no references at all: the plain loop


def test_cpu_offload_gives_the_same_inpainting(parts, source, mask):
    on_device = Flux2Pipeline("tiny", **parts)
    offloaded = Flux2Pipeline("tiny", **parts, cpu_offload=True)
    [a] = on_device.inpaint("x", source, mask, seed=2, reference_images=[source])
    [b] = offloaded.inpaint("x", source, mask, seed=2, reference_images=[source])
    assert np.array_equal(array(a.image), array(b.image))
