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
    get_schedule,
    listed_prc_img,
    prc_img,
    prc_txt,
    scatter_ids,
)


def spec_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """The exact float32 recipe of spec §3.3, written independently of torch."""
    f32 = np.float32
    n = num_steps
    step = f32(-1.0 / n)
    ts = []
    for i in range(n + 1):
        if i < (n + 1) // 2:
            ts.append(f32(1.0 + float(step) * i))  # one rounding, like a fused multiply-add
        else:
            ts.append(f32(-float(step) * (n - i)))
    e_mu = f32(math.exp(compute_empirical_mu(image_seq_len, num_steps)))
    out = []
    with np.errstate(divide="ignore"):
        for t in ts:
            inv = f32(1.0) / t
            den = f32(inv - f32(1.0)) + e_mu
            out.append(float((f32(1.0) / den) * e_mu))
    return out


@pytest.mark.parametrize(
    "steps,tokens", [(4, 4096), (4, 4300), (4, 4301), (50, 4080), (50, 4300), (28, 1024), (28, 16384), (1, 256)]
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


def test_schedule_negative_control():
    """float64 evaluation of the same formula does not reproduce the float32 values."""
    mu = compute_empirical_mu(4096, 4)
    t = np.linspace(1, 0, 5)[:-1]
    float64 = [math.exp(mu) / (math.exp(mu) + (1 / x - 1)) for x in t]
    assert float64 != get_schedule(4, 4096)[:-1]


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
