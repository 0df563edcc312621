"""Winograd F(4×4, 3×3) convs: the same conv as torch's, from 4× fewer multiply-adds.

Oracles: float64 `F.conv2d` for one layer, and diffusers' AutoencoderKLFlux2 with the same weights for the whole
autoencoder. The negative control is on the layer: kernels and data transformed for different interpolation points."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_autoencoder import REL_TOL, models, oracle_decode, oracle_encode, rel_diff  # noqa: F401  (models is a fixture)

from flux2.autoencoder import channels_last
from flux2.transforms import winograd
from flux2.transforms.winograd import WinogradConv2d, plain_convs, winograd_conv3x3, winograd_convs


def test_transforms_compute_a_correlation_exactly():
    """y = A^T [(G g) ⊙ (B^T d)] is the 4 outputs of correlating a 6-long signal with 3 taps (float64, exact)."""
    a_t, g, b_t = winograd.transforms_1d()
    taps, signal = torch.randn(3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = torch.stack([(taps * signal[i : i + 3]).sum() for i in range(4)])
    torch.testing.assert_close(a_t @ ((g @ taps) * (b_t @ signal)), expected, rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("size", [(12, 16), (13, 7), (1, 1)])
@pytest.mark.parametrize("chunk", [4, winograd.CHUNK_ELEMENTS])
def test_layer_matches_conv2d(size, chunk):
    """Sides that are not whole tiles, a batch of 2, C_in ≠ C_out, a bias, and one tile row per chunk."""
    h, w = size
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    out = winograd_conv3x3(x, winograd.transformed_kernels(conv.weight), conv.bias, chunk_elements=chunk)
    torch.testing.assert_close(out, conv(x), rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last)
    no_bias = winograd_conv3x3(x, winograd.transformed_kernels(conv.weight), None, chunk_elements=chunk)
    torch.testing.assert_close(no_bias, F.conv2d(x, conv.weight, padding=1), rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_fp32_rounding_is_close_to_a_direct_conv(monkeypatch):
    """In fp32 the error against float64 stays within a few times that of the direct channels-last conv it replaces
    on a CPU, and below that of Lavin & Gray's points (0, ±1, ±2): the reason for the points chosen."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 64, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 32, 32).contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)

    def winograd_error() -> float:
        winograd.matrices.cache_clear()
        return rel_diff(WinogradConv2d.from_conv(conv)(x).double(), exact)

    error, direct_error = winograd_error(), rel_diff(conv(x).double(), exact)
    monkeypatch.setattr(winograd, "POINTS", (0.0, 1.0, -1.0, 2.0, -2.0))
    lavin_error = winograd_error()
    monkeypatch.undo()
    winograd.matrices.cache_clear()
    assert error < 4 * direct_error and error < 1e-5, (error, direct_error)
    assert error < 0.7 * lavin_error, (error, lavin_error)


@torch.no_grad()
def test_wrong_points_are_caught(monkeypatch):
    """Negative control: kernels transformed for other points than the data transforms must fail."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    kernels = winograd.transformed_kernels(conv.weight)
    winograd.matrices.cache_clear()
    monkeypatch.setattr(winograd, "POINTS", (0.0, 1.0, -1.0, 2.0, -2.0))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    try:
        assert rel_diff(winograd_conv3x3(x, kernels, conv.bias), conv(x)) > 1e-2
    finally:
        winograd.matrices.cache_clear()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_autoencoder_matches_diffusers(models, layout):  # noqa: F811
    """Every stride-1 3×3 conv of the (tiny, 8/16-wide) autoencoder swapped; checkpoints load into it unchanged."""
    ours, theirs = models
    fast = copy.deepcopy(ours)
    fast = winograd_convs(channels_last(fast) if layout == "channels_last" else fast, min_channels=1)
    swapped = [m for m in fast.modules() if isinstance(m, WinogradConv2d)]
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(swapped) == sum(m.kernel_size == (3, 3) and m.stride == (1, 1) for m in convs)
    assert fast.state_dict().keys() == ours.state_dict().keys()
    z, x = torch.randn(2, 16, 4, 3), torch.rand(2, 3, 64, 48) * 2 - 1
    assert rel_diff(fast.decode(z), oracle_decode(theirs, z)) < REL_TOL
    assert rel_diff(fast.encode(x), oracle_encode(theirs, x)) < REL_TOL


@torch.no_grad()
def test_narrow_convs_stay_direct_and_plain_convs_undoes(models):  # noqa: F811
    ours, _ = models
    fast = winograd_convs(copy.deepcopy(ours))  # the default 256: none of the tiny decoder's convs
    assert not any(isinstance(m, WinogradConv2d) for m in fast.modules())
    fast = plain_convs(winograd_convs(fast, min_channels=1))
    assert not any(isinstance(m, WinogradConv2d) for m in fast.modules())
    z = torch.randn(1, 16, 4, 4)
    assert torch.equal(fast.decode(z), ours.decode(z))


def test_new_weights_take_effect_and_autograd_runs_the_plain_conv():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    fast, x = WinogradConv2d.from_conv(conv), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        before = fast(x)
        conv.weight.mul_(2)  # the shared parameter, updated in place
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, fast(x))
    fast(x).sum().backward()  # grad enabled: the plain conv, so weights get gradients
    assert conv.weight.grad is not None
    with torch.no_grad():  # cast after the swap: bf16 runs the plain conv (the transforms would lose too much)
        fast.to(torch.bfloat16)
        torch.testing.assert_close(fast(x.bfloat16()), conv(x.bfloat16()), rtol=0, atol=0)
