"""Folded upsample convs: the decoder's "nearest ×2, then 3×3 conv" as one stride-2 transposed conv on the
low-resolution input.

The oracle is diffusers' AutoencoderKLFlux2 holding the same weights (it upsamples, then convolves); the folded
decode must agree with it as closely as our plain decode does, do fewer multiply-adds, and make no 4× tensor."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_autoencoder import REL_TOL, models, oracle_decode, rel_diff  # noqa: F401  (models is a fixture)

from flux2.autoencoder import channels_last
from flux2.transforms import upsample_conv
from flux2.transforms.upsample_conv import FoldedUpsample, fold_upsample_convs, unfold_upsample_convs


@torch.no_grad()
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_folded_decode_matches_diffusers(models, layout):  # noqa: F811
    ours, theirs = models
    fast = copy.deepcopy(ours)
    fast = fold_upsample_convs(channels_last(fast) if layout == "channels_last" else fast)
    assert sum(isinstance(level.upsample, FoldedUpsample) for level in fast.decoder.up) == len(fast.decoder.up) - 1
    assert fast.state_dict().keys() == ours.state_dict().keys()  # checkpoints load into it unchanged
    z = torch.randn(2, 16, 4, 3)
    assert rel_diff(fast.decode(z), oracle_decode(theirs, z)) < REL_TOL


@torch.no_grad()
def test_a_wrong_fold_is_caught(models, monkeypatch):  # noqa: F811
    """Negative control: the transposed kernel's rows in the wrong order (even outputs taking the odd outputs'
    taps) must fail."""
    ours, theirs = models
    monkeypatch.setattr(upsample_conv, "TAPS", upsample_conv.TAPS[[1, 0, 3, 2]])
    wrong = fold_upsample_convs(copy.deepcopy(ours))
    z = torch.randn(1, 16, 4, 4)
    assert rel_diff(wrong.decode(z), oracle_decode(theirs, z)) > 1e-2


@torch.no_grad()
def test_fold_matches_upsample_then_conv_with_fewer_multiply_adds():
    """One layer alone, odd sizes and a bias: the same values as upsampling then convolving, from a stride-2
    transposed conv over the low-resolution input (each output pixel sees 2×2 of its 4×4 taps: 4 multiply-adds
    per channel pair instead of 9)."""
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(2, 8, 31, 29)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(FoldedUpsample(conv)(x), expected, rtol=1e-5, atol=1e-5)
    weight = upsample_conv.transposed_kernel(conv.weight)
    assert weight.shape == (8, 6, 4, 4)
    macs_folded = weight.numel() * 31 * 29  # every input pixel meets all 16 taps once
    macs_plain = conv.weight.numel() * 62 * 58
    assert macs_folded < 0.5 * macs_plain


@torch.no_grad()
def test_new_weights_take_effect():
    """The transposed kernel is derived once per weight; loading other weights re-derives it."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    folded, x = FoldedUpsample(conv), torch.randn(1, 4, 5, 5)
    before = folded(x)
    conv.load_state_dict({"weight": torch.randn(4, 4, 3, 3), "bias": torch.zeros(4)})
    after = folded(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, conv(F.interpolate(x, scale_factor=2.0)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unfold_restores_the_plain_modules(models):  # noqa: F811
    ours, _ = models
    model = fold_upsample_convs(copy.deepcopy(ours))
    unfold_upsample_convs(model)
    assert not any(isinstance(level.upsample, FoldedUpsample) for level in model.decoder.up)
    z = torch.randn(1, 16, 4, 4)
    assert torch.equal(model.decode(z), ours.decode(z))
