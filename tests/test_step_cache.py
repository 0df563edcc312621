"""Step cache (flux2.transforms.step_cache): exact at threshold 0, measured cost above it, one cache per CFG pass,
and nothing carried from one generation to the next.

A random-weight model gives the cache nothing to exploit: its modulation follows the high-frequency time
features, so the first block's residual moves 50-130 % between adjacent steps and nothing is ever skipped. A
trained model is smooth in t; `smooth_model` imitates that by keeping only the slow half of the time features,
after which the residual moves 1.6-20 % per step (rising towards t = 0). The quality measured here is that of
this toy; a real model's must be measured with its weights.
"""

import math

import pytest
import torch

from flux2.pipeline import Flux2Pipeline
from flux2.registry import TINY_PARAMS
from flux2.sampling import batched_prc_img, batched_prc_txt, denoise, denoise_cached, denoise_cfg, get_schedule
from flux2.tiny import random_flow_model
from flux2.transforms.step_cache import StepCache, disable_step_cache, enable_step_cache

STEPS = 50  # the step count of [dev] and the klein base models
SMOOTH_FROM = 64  # of the 128 frequencies of timestep_embedding, the slowest 64 (period >= 2 pi * 10000**0.5 / 1000)


def smooth_model():
    model = random_flow_model(TINY_PARAMS)
    with torch.no_grad():
        half = model.time_in.in_layer.weight.shape[1] // 2  # [cos | sin] columns
        model.time_in.in_layer.weight[:, :SMOOTH_FROM] = 0
        model.time_in.in_layer.weight[:, half : half + SMOOTH_FROM] = 0
    return model


@pytest.fixture
def model(one_thread):
    return smooth_model()


@pytest.fixture(scope="module")
def inputs():
    """A 4x4-token image and two 8-token prompts [uncond; cond]."""
    g = torch.Generator().manual_seed(0)
    img, img_ids = batched_prc_img(torch.randn(1, TINY_PARAMS.in_channels, 4, 4, generator=g))
    txt, txt_ids = batched_prc_txt(torch.randn(2, 8, TINY_PARAMS.context_in_dim, generator=g))
    return img, img_ids, txt, txt_ids, get_schedule(STEPS, img.shape[1])


def run(model, inputs, prompt: int = 1, threshold: float | None = None, timesteps=None):
    img, img_ids, txt, txt_ids, schedule = inputs
    cache = None if threshold is None else enable_step_cache(model, threshold)
    try:
        out = denoise(model, img, img_ids, txt[prompt : prompt + 1], txt_ids[:1], timesteps or schedule, None)
    finally:
        if cache is not None:
            disable_step_cache(model)
    return out, cache


def test_threshold_zero_is_bit_exact(model, inputs):
    plain, _ = run(model, inputs)
    cached, cache = run(model, inputs, threshold=0.0)
    assert torch.equal(cached, plain)
    assert cache.stats == {"steps": STEPS, "calls": STEPS, "skipped": 0}


def test_threshold_skips_steps_at_a_measured_cost(model, inputs):
    plain, _ = run(model, inputs)
    cached, cache = run(model, inputs, threshold=0.1)
    # Measured: 27 of 50 skipped, relative L2 5.9e-5, PSNR 95 dB over the latents' peak (decoded: 92 dB).
    assert 20 <= cache.stats["skipped"] <= 35
    assert cache.stats["steps"] == cache.stats["calls"] == STEPS
    rel_l2 = ((cached - plain).norm() / plain.norm()).item()
    psnr = 10 * math.log10(plain.abs().max().item() ** 2 / (cached - plain).pow(2).mean().item())
    assert 1e-6 < rel_l2 < 1e-3
    assert psnr > 60
    # A larger threshold skips more and costs more.
    looser, loose = run(model, inputs, threshold=0.3)
    assert loose.stats["skipped"] > cache.stats["skipped"]
    assert (looser - plain).norm() > (cached - plain).norm()


def test_each_generation_starts_afresh(model, inputs, monkeypatch):
    """An unbounded threshold skips every step it can; only the first step of a generation must run in full."""
    img, img_ids, txt, txt_ids, schedule = inputs
    short = schedule[::10]
    fresh, _ = run(model, inputs, prompt=1, threshold=math.inf, timesteps=short)

    cache = enable_step_cache(model, math.inf)
    denoise(model, img, img_ids, txt[:1], txt_ids[:1], short, None)  # another prompt first
    second = denoise(model, img, img_ids, txt[1:], txt_ids[:1], short, None)
    assert torch.equal(second, fresh)
    assert cache.stats == {"steps": 5, "calls": 5, "skipped": 4}
    assert cache.totals == {"steps": 10, "calls": 10, "skipped": 8}

    disable_step_cache(model)

    # Negative control: a cache that is never reset carries the first prompt's residual into the second.
    cache = enable_step_cache(model, math.inf)
    monkeypatch.setattr(cache, "reset", lambda: None)
    other = denoise(model, img, img_ids, txt[:1], txt_ids[:1], short, None)
    stale = denoise(model, img, img_ids, txt[1:], txt_ids[:1], short, None)
    disable_step_cache(model)
    # Measured: the stale result is 0.043 from the right one, 0.023 from the other prompt's (which is 0.044 away).
    assert (stale - fresh).norm() > 0.5 * (other - fresh).norm()


def test_cfg_passes_keep_their_own_cache(model, inputs, monkeypatch):
    img, img_ids, txt, txt_ids, schedule = inputs
    short = schedule[::10]
    plain = denoise_cfg(model, img, img_ids, txt, txt_ids, short, 4.0, batched=False)

    cache = enable_step_cache(model, 0.0)
    exact = denoise_cfg(model, img, img_ids, txt, txt_ids, short, 4.0, batched=False)
    assert torch.equal(exact, plain)
    assert cache.stats == {"steps": 5, "calls": 10, "skipped": 0}

    cache.threshold = math.inf
    keyed = denoise_cfg(model, img, img_ids, txt, txt_ids, short, 4.0, batched=False)
    assert cache.stats == {"steps": 5, "calls": 10, "skipped": 8}  # both passes run in full at the first step

    # Negative control: one cache for both passes hands the uncond residual to the cond pass.
    begin = cache.begin

    def one_slot(timesteps):
        begin(timesteps)
        cache._pass = 0

    monkeypatch.setattr(cache, "begin", one_slot)
    shared = denoise_cfg(model, img, img_ids, txt, txt_ids, short, 4.0, batched=False)
    disable_step_cache(model)
    uncond = denoise(model, img, img_ids, txt[:1], txt_ids[:1], short, None)
    # Measured: 0.171 from the keyed result, which is 0.178 from the unguided uncond one.
    assert (shared - keyed).norm() > 0.5 * (keyed - uncond).norm()

    together = denoise_cfg(model, img, img_ids, txt, txt_ids, short, 4.0, batched=True)
    batched = enable_step_cache(model, 0.0)
    assert torch.equal(denoise_cfg(model, img, img_ids, txt, txt_ids, short, 4.0, batched=True), together)
    assert batched.stats == {"steps": 5, "calls": 5, "skipped": 0}
    disable_step_cache(model)


def test_kv_path_extracts_in_full_and_is_exact_at_zero(model, inputs):
    img, img_ids, txt, txt_ids, schedule = inputs
    refs, ref_ids = batched_prc_img(torch.randn(1, TINY_PARAMS.in_channels, 2, 2), t_coord=torch.tensor([10]))
    short = schedule[::10]
    args = (model, img, img_ids, txt[1:], txt_ids[:1], short, None, refs, ref_ids)
    plain = denoise_cached(*args)
    cache = enable_step_cache(model, 0.0)
    assert torch.equal(denoise_cached(*args), plain)
    cache.threshold = math.inf
    denoise_cached(*args)
    disable_step_cache(model)
    assert cache.stats == {"steps": 5, "calls": 5, "skipped": 3}  # the extract step and the first cached one run


def test_enable_and_disable_leave_the_model_as_it_was(model):
    blocks, keys = (model.double_blocks, model.single_blocks), list(model.state_dict())
    cache = enable_step_cache(model, 0.1)
    assert list(model.state_dict()) == keys  # LoRA, loading and saving see the same model
    assert model.double_blocks[0] is blocks[0][0]
    assert disable_step_cache(model) is cache
    assert (model.double_blocks, model.single_blocks) == blocks
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="StepCache"):
        disable_step_cache(model)
    with pytest.raises(ValueError, match="threshold"):
        enable_step_cache(model, -0.1)


def test_stage_hook_resets_as_sampling_starts():
    cache = StepCache(num_single=1, threshold=0.1)
    cache.begin(torch.tensor([0.5]))
    with cache("encode_text"):
        assert cache.stats["calls"] == 1
    with cache("sample"):
        assert cache.stats["calls"] == 0


def test_in_the_pipeline_with_cfg(one_thread):
    pipe = Flux2Pipeline("tiny", device="cpu", watermark=None)
    settings = {"width": 64, "height": 64, "num_steps": 6, "seed": 1, "true_cfg_scale": 3.0}
    [plain] = pipe.generate("a fox", **settings)
    cache = enable_step_cache(pipe.flow_model, 0.0)
    pipe.stage_hooks.append(cache)
    [cached] = pipe.generate("a fox", **settings)
    assert cached.image.tobytes() == plain.image.tobytes()
    assert cache.stats == {"steps": 6, "calls": 6, "skipped": 0}  # [uncond; cond] in one batch
    pipe.stage_hooks.remove(cache)
    disable_step_cache(pipe.flow_model)
