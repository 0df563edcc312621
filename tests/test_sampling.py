"""Packing, ids, reference preparation and the schedule, against the spec's exact values and recipe."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flux2.sampling import (
    batched_prc_img,
    batched_prc_txt,
    compress_time,
    compute_empirical_mu,
    default_prep,
    denoise,
    denoise_cfg,
    encode_image_refs,
    euler,
    get_schedule,
    listed_prc_img,
    prc_img,
    prc_txt,
    scatter_ids,
)


def spec_linspace(n: int, variant: str = "reference") -> list[np.float32]:
    """torch's CPU float32 linspace(1, 0, n + 1) by spec §3.3 step 1; the variants are the negative controls."""
    f32 = np.float32
    step = f32(-1.0 / n)
    ts = []
    for i in range(n + 1):
        if variant == "two roundings":  # fl32(fl32(step * i) + 1)
            head = f32(f32(step * f32(i)) + f32(1.0))
        else:
            head = f32(1.0 + float(step) * i)  # one rounding, like a fused multiply-add
        tail = f32(-float(step) * (n - i))
        ts.append(head if i < (n + 1) // 2 or variant == "one-sided" else tail)  # one-sided: 1 + step * i to 0
    return ts


def spec_schedule(num_steps: int, image_seq_len: int, linspace: str = "reference") -> list[float]:
    """The exact float32 recipe of spec §3.3, written independently of torch."""
    f32 = np.float32
    e_mu = f32(math.exp(compute_empirical_mu(image_seq_len, num_steps)))
    out = []
    with np.errstate(divide="ignore"):
        for t in spec_linspace(num_steps, linspace):
            inv = f32(1.0) / t
            den = f32(inv - f32(1.0)) + e_mu
            out.append(float((f32(1.0) / den) * e_mu))
    return out


@pytest.mark.parametrize(
    "steps,tokens",
    [(4, 4096), (4, 4300), (4, 4301), (50, 4080), (50, 4300), (28, 1024), (28, 4096), (28, 16384), (1, 256)],
)
def test_schedule_bit_exact_with_spec_recipe(steps, tokens):
    assert get_schedule(steps, tokens) == spec_schedule(steps, tokens)


def test_schedule_exact_values_from_spec():
    assert get_schedule(50, 4300)[0] == np.float32(0.99999994)
    assert round(compute_empirical_mu(4300, 4), 4) == 2.3085
    assert round(compute_empirical_mu(4301, 4), 4) == 1.1847
    # above 4300 tokens mu no longer depends on the step count
    assert compute_empirical_mu(8000, 4) == compute_empirical_mu(8000, 50)
    assert compute_empirical_mu(4000, 4) != compute_empirical_mu(4000, 50)
    schedule = get_schedule(4, 4096)
    assert len(schedule) == 5 and schedule[-1] == 0.0
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False))


# Combinations where the linspace details of the recipe change the float32 result (28 steps at 1024² and
# 50 steps at the default 1360x768 among them; at 4 steps every variant happens to agree).
@pytest.mark.parametrize("steps,tokens", [(28, 4096), (50, 4080)])
@pytest.mark.parametrize("variant", ["two roundings", "one-sided"])
def test_schedule_negative_control(steps, tokens, variant):
    """The bit-exact comparison can fail: a near-miss linspace (first half rounded twice, or 1 + step * i
    one-sided all the way) gives other float32 values where the recipe itself matches."""
    schedule = get_schedule(steps, tokens)
    assert schedule == spec_schedule(steps, tokens)
    near_miss = spec_schedule(steps, tokens, linspace=variant)
    assert near_miss != schedule
    assert max(abs(a - b) for a, b in zip(near_miss, schedule, strict=True)) < 1e-6  # a few float32 ulps only


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 4096)


def test_text_and_image_ids():
    _, ids = prc_txt(torch.zeros(5, 3))
    assert ids.tolist() == [[0, 0, 0, j] for j in range(5)]
    assert ids.dtype == torch.int64
    latent = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)  # [C, h, w]
    tokens, ids = prc_img(latent, t_coord=10)
    assert ids.tolist() == [[10, y, x, 0] for y in range(2) for x in range(3)]
    assert torch.equal(tokens[4], latent[:, 1, 1])  # row-major: token y*W + x


def test_batched_and_listed_packing():
    x, ids = batched_prc_img(torch.randn(2, 4, 3, 5))
    assert x.shape == (2, 15, 4) and ids.shape == (2, 15, 4)
    t, t_ids = batched_prc_txt(torch.randn(2, 7, 6))
    assert t.shape == (2, 7, 6) and t_ids[1, 6].tolist() == [0, 0, 0, 6]
    tokens, ids = listed_prc_img([torch.randn(4, 2, 2), torch.randn(4, 3, 1)], t_coord=[10, 20])
    assert [tuple(t.shape) for t in tokens] == [(4, 4), (3, 4)]
    assert ids[1][:, 0].tolist() == [20, 20, 20]


def test_scatter_ids_inverts_packing():
    latent = torch.randn(1, 4, 3, 5)
    x, ids = batched_prc_img(latent)
    perm = torch.randperm(x.shape[1])
    (grid,) = scatter_ids(x[:, perm], ids[:, perm])
    assert grid.shape == (1, 4, 1, 3, 5)
    assert torch.equal(grid[:, :, 0], latent)
    assert compress_time(torch.tensor([30, 10, 10, 20])).tolist() == [2, 0, 0, 1]


@pytest.mark.parametrize(
    "size,count,expected",
    [
        ((3000, 2000), 1, (2464, 1648)),
        ((2000, 1500), 2, (1168, 880)),
        ((640, 480), 1, (640, 480)),
        ((70, 90), 1, (64, 80)),
    ],
)
def test_reference_preparation_sizes(size, count, expected):
    limit = 2024**2 if count == 1 else 1024**2
    x = default_prep(Image.new("RGB", size, (200, 10, 10)), limit)
    assert tuple(x.shape) == (3, expected[1], expected[0])
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize(
    "size,message", [((63, 200), "at least 64"), ((64, 600), "aspect ratio"), ((900, 100), "aspect")]
)
def test_reference_too_small_or_too_thin(size, message):
    with pytest.raises(ValueError, match=message):
        default_prep(Image.new("RGB", size), 1024**2)


class ShapeAE(torch.nn.Module):
    """Encodes by 16x average pooling into 4 channels: enough to check token layout and ids."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 16).repeat(1, 4, 1, 1)[:, :4] * self.w


def test_encode_image_refs_offsets_and_layout():
    refs = [Image.new("RGB", (64, 96)), Image.new("RGB", (128, 64))]
    tokens, ids = encode_image_refs(ShapeAE(), refs, dtype=torch.float32)
    assert tokens.shape == (1, 4 * 6 + 8 * 4, 4)
    assert ids[0, :24, 0].unique().tolist() == [10] and ids[0, 24:, 0].unique().tolist() == [20]
    assert ids[0, 23].tolist() == [10, 5, 3, 0]
    assert encode_image_refs(ShapeAE(), []) == (None, None)


class LinearVelocity(torch.nn.Module):
    """A stand-in 'model' whose velocity depends on the text and time, to test the loops' bookkeeping."""

    def forward(self, x, x_ids, t, ctx, ctx_ids, guidance):
        return x * 0.5 + ctx.mean(dim=(1, 2))[:, None, None] + t[:, None, None]


def test_denoise_cfg_formula_and_ref_cropping():
    model = LinearVelocity()
    img = torch.randn(1, 6, 4)
    ids = torch.zeros(1, 6, 4, dtype=torch.long)
    txt = torch.stack([torch.zeros(3, 2), torch.ones(3, 2)])  # [uncond; cond]
    refs, ref_ids = torch.randn(1, 5, 4), torch.zeros(1, 5, 4, dtype=torch.long)
    ts = [1.0, 0.5, 0.0]
    out = denoise_cfg(model, img, ids, txt, ids.repeat(2, 1, 1), ts, 3.0, refs, ref_ids)
    expected = img.clone()
    for t, t_next in [(1.0, 0.5), (0.5, 0.0)]:
        uncond = expected * 0.5 + 0.0 + t
        cond = expected * 0.5 + 1.0 + t
        expected = expected + (t_next - t) * (uncond + 3.0 * (cond - uncond))
    assert torch.allclose(out, expected)
    plain = denoise(model, img, ids, txt[1:], ids, ts, 1.0, refs, ref_ids)
    assert not torch.allclose(plain, out)  # control: guidance 3 is not the cond prediction alone
    with pytest.raises(ValueError, match="uncond"):
        denoise_cfg(model, img, ids, txt[1:], ids, ts, 3.0)


# ----------------------------------------------------------------------------- bf16 Euler steps (spec §3.4)


def time_sensitive_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity whose value moves with t's rounding (1000 t, as the model's embedding sees it), in x's dtype."""
    return torch.cos(7.0 * x.float() + 1000.0 * t.float()[:, None, None]).to(x.dtype)


def spec_euler(img: torch.Tensor, timesteps: list[float], velocity, float32_step: bool = False) -> torch.Tensor:
    """Spec §3.4: t as a bf16 [B] tensor; img + (t_prev - t_curr) * pred in bf16, i.e. the Python-float dt times
    pred rounded to bf16, then the sum rounded to bf16. `float32_step` is the negative control (one rounding)."""
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        t = torch.full((img.shape[0],), t_curr, dtype=torch.float64).to(torch.bfloat16)
        pred = velocity(img, t)
        dt = np.float32(t_prev - t_curr).item()
        if float32_step:
            img = (img.float() + dt * pred.float()).to(torch.bfloat16)
        else:
            img = (img.float() + (dt * pred.float()).to(torch.bfloat16).float()).to(torch.bfloat16)
    return img


def test_euler_steps_in_bf16_with_bf16_timesteps():
    timesteps = get_schedule(4, 4096)
    img = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    seen = []

    def velocity(x, t):
        seen.append(t)
        return time_sensitive_velocity(x, t)

    out = euler(img, timesteps, velocity)
    assert out.dtype == torch.bfloat16
    assert [t.dtype for t in seen] == [torch.bfloat16] * 4
    assert [t.tolist() for t in seen] == [[torch.tensor(t).bfloat16().item()] * 2 for t in timesteps[:-1]]
    assert torch.equal(out, spec_euler(img, timesteps, time_sensitive_velocity))
    # Negative control: the same loop with a float32 update rounds differently.
    assert not torch.equal(out, spec_euler(img, timesteps, time_sensitive_velocity, float32_step=True))


class RecordingVelocityModel(torch.nn.Module):
    """A flow-model stand-in: time-sensitive velocity over the whole sequence (references included)."""

    def __init__(self):
        super().__init__()
        self.timesteps: list[torch.Tensor] = []
        self.guidance: list[torch.Tensor] = []

    def forward(self, x, x_ids, t, ctx, ctx_ids, guidance):
        self.timesteps.append(t)
        self.guidance.append(guidance)
        return time_sensitive_velocity(x, t) + ctx.mean()


def test_denoise_steps_in_bf16_with_bf16_timesteps():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 24, 16, generator=g).bfloat16()
    img_ids = torch.zeros(1, 24, 4, dtype=torch.long)
    txt, txt_ids = torch.randn(1, 3, 8, generator=g).bfloat16(), torch.zeros(1, 3, 4, dtype=torch.long)
    refs, ref_ids = torch.randn(1, 5, 16, generator=g).bfloat16(), torch.full((1, 5, 4), 10, dtype=torch.long)
    timesteps = get_schedule(4, 4096)
    model = RecordingVelocityModel()
    out = denoise(model, img, img_ids, txt, txt_ids, timesteps, 1.0, refs, ref_ids)
    assert out.dtype == torch.bfloat16
    assert [t.dtype for t in model.timesteps] == [g.dtype for g in model.guidance] == [torch.bfloat16] * 4

    def velocity(x, t):  # what the model returns for the target tokens (the references are cropped off)
        return time_sensitive_velocity(x, t) + txt.mean()

    assert torch.equal(out, spec_euler(img, timesteps, velocity))
    assert not torch.equal(out, spec_euler(img, timesteps, velocity, float32_step=True))


# ----------------------------------------------------------------------------- reference resampling and caps


class PixelAE(torch.nn.Module):
    """Encodes by 16x16 pixel-unshuffle: every token carries its 16x16 block's exact pixels, so any change to the
    resampling filter, the size rounding or the crop offset shows in the tokens."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode(self, x):
        return torch.nn.functional.pixel_unshuffle(x, 16) * self.w


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def spec_ref_tokens(img: Image.Image, limit: int, resample=Image.Resampling.LANCZOS) -> torch.Tensor:
    """Spec §3.2, written out: floor-sized LANCZOS resize to <= limit px, centre crop to 16, [-1, 1], encode."""
    w, h = img.size
    s = math.sqrt(limit / (w * h))
    img = img.resize((int(w * s), int(h * s)), resample)
    w, h = img.size
    left, top = (w - w // 16 * 16) // 2, (h - h // 16 * 16) // 2
    img = img.crop((left, top, left + w // 16 * 16, top + h // 16 * 16))
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 * 2 - 1
    latent = PixelAE().encode(pixels[None])[0]
    return latent.flatten(1).T  # row-major tokens [h * w, C]


BIG_REF = (2100, 2000)  # 4.2 Mpx: above both caps; capped to 2073x1975 (2024²) or 1049x999 (1024²)


@torch.no_grad()
def test_single_reference_is_lanczos_capped_at_2024_squared():
    img = noise_image(*BIG_REF, seed=0)
    tokens, ids = encode_image_refs(PixelAE(), [img], dtype=torch.float32)
    assert tokens.shape == (1, (2064 // 16) * (1968 // 16), 3 * 16 * 16)  # 2073x1975 cropped to 2064x1968
    assert torch.equal(tokens[0], spec_ref_tokens(img, 2024**2))
    # Negative control: on this texture another filter moves the pixels.
    assert not torch.equal(tokens[0], spec_ref_tokens(img, 2024**2, Image.Resampling.BICUBIC))
    assert ids[0, -1].tolist() == [10, 1968 // 16 - 1, 2064 // 16 - 1, 0]


@torch.no_grad()
def test_each_of_two_references_is_lanczos_capped_at_1024_squared():
    first, second = noise_image(*BIG_REF, seed=0), noise_image(1100, 1000, seed=1)  # second: 1073x976 -> 1072x976
    tokens, ids = encode_image_refs(PixelAE(), [first, second], dtype=torch.float32)
    expected = [spec_ref_tokens(first, 1024**2), spec_ref_tokens(second, 1024**2)]
    assert [len(e) for e in expected] == [65 * 62, 67 * 61]  # 1049x999 -> 1040x992; 1073x976 -> 1072x976
    assert torch.equal(tokens[0], torch.cat(expected))
    assert ids[0, : 65 * 62, 0].unique().tolist() == [10] and ids[0, 65 * 62 :, 0].unique().tolist() == [20]


def test_batched_packing_takes_one_t_per_item():
    _, ids = batched_prc_img(torch.zeros(2, 4, 2, 3), t_coord=torch.tensor([10, 20]))
    assert ids[0, :, 0].unique().tolist() == [10] and ids[1, :, 0].unique().tolist() == [20]
    with pytest.raises(ValueError, match="t_coord has 3 entries for a batch of 2"):
        batched_prc_txt(torch.zeros(2, 5, 3), t_coord=torch.tensor([1, 2, 3]))


def test_one_set_of_references_serves_a_batch():
    model = LinearVelocity()
    img, ids = torch.randn(2, 6, 4), torch.zeros(2, 6, 4, dtype=torch.long)
    txt, refs, ref_ids = torch.randn(2, 3, 2), torch.randn(1, 5, 4), torch.zeros(1, 5, 4, dtype=torch.long)
    out = denoise(model, img, ids, txt, ids, [1.0, 0.5, 0.0], 1.0, refs, ref_ids)
    first = denoise(model, img[:1], ids[:1], txt[:1], ids[:1], [1.0, 0.5, 0.0], 1.0, refs, ref_ids)
    assert torch.equal(out[:1], first)
    with pytest.raises(ValueError, match="given together"):
        denoise(model, img, ids, txt, ids, [1.0, 0.0], 1.0, refs, None)
