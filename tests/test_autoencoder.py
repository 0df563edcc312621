"""Autoencoder: parity with diffusers' AutoencoderKLFlux2, the key mapping, sizes and BN semantics."""

import copy
import logging

import pytest
import torch
from diffusers import AutoencoderKLFlux2

from flux2.autoencoder import AutoEncoder, AutoEncoderParams, channels_last
from flux2.checkpoints.autoencoder import ae_diffusers_to_original, ae_original_to_diffusers, is_diffusers_ae

REL_TOL = 1e-5  # max-abs difference / max-abs value, fp32 (measured: 5e-7 encode, 2e-6 decode)
# diffusers' layers_per_block is BFL's num_res_blocks: both use one more resnet per decoder level.
TINY = AutoEncoderParams(ch=8, ch_mult=[1, 1, 2, 2], num_res_blocks=2, z_channels=4, norm_groups=4)
TINY_DIFFUSERS = dict(
    sample_size=64,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
)
log = logging.getLogger(__name__)  # see the measured differences with --log-cli-level=INFO


@pytest.fixture(scope="module")
def models() -> tuple[AutoEncoder, AutoencoderKLFlux2]:
    torch.manual_seed(0)
    ours = AutoEncoder(TINY).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))  # also moves norm scales off 1 and biases off 0
        ours.bn.running_mean.copy_(0.5 * torch.randn_like(ours.bn.running_mean))
        # Small variances make the eps (1e-4) matter, so the eps negative control bites.
        ours.bn.running_var.copy_(0.01 + 0.05 * torch.rand_like(ours.bn.running_var))
        ours.bn.num_batches_tracked.fill_(123)
    theirs = AutoencoderKLFlux2(**TINY_DIFFUSERS).eval()
    theirs.load_state_dict(ae_original_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


# The oracle side: what diffusers' Flux2 pipelines do around the VAE, written from the spec.
def oracle_patchify(z: torch.Tensor, channel_major: bool = True) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2)
    order = (0, 1, 3, 5, 2, 4) if channel_major else (0, 3, 5, 1, 2, 4)  # else: c + C·(2·pi + pj)
    return z.permute(*order).reshape(b, 4 * c, h // 2, w // 2)


def oracle_unpatchify(z: torch.Tensor, channel_major: bool = True) -> torch.Tensor:
    b, c4, h, w = z.shape
    c = c4 // 4
    if channel_major:
        return z.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
    return z.view(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)


def bn_mean_std(vae: AutoencoderKLFlux2, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return vae.bn.running_mean.view(1, -1, 1, 1), torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + eps)


def oracle_encode(vae: AutoencoderKLFlux2, x: torch.Tensor, eps: float = 1e-4, channel_major: bool = True):
    mean, std = bn_mean_std(vae, eps)
    return (oracle_patchify(vae.encode(x).latent_dist.mode(), channel_major) - mean) / std


def oracle_decode(vae: AutoencoderKLFlux2, z: torch.Tensor, eps: float = 1e-4, channel_major: bool = True):
    mean, std = bn_mean_std(vae, eps)
    return vae.decode(oracle_unpatchify(z * std + mean, channel_major)).sample


def rel_diff(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max-abs difference relative to the oracle's max-abs value (normalised latents reach ~20)."""
    return ((ours - oracle).abs().max() / oracle.abs().max()).item()


@torch.no_grad()
def test_encode_matches_diffusers(models):
    ours, theirs = models
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    z = ours.encode(x)
    assert z.shape == (2, 16, 4, 3)
    diff = rel_diff(z, oracle_encode(theirs, x))
    wrong_eps = rel_diff(z, oracle_encode(theirs, x, eps=1e-6))
    wrong_order = rel_diff(z, oracle_encode(theirs, x, channel_major=False))
    log.info("encode: relative diff %.2e; controls: eps %.2e, order %.2e", diff, wrong_eps, wrong_order)
    assert diff < REL_TOL
    assert wrong_eps > 10 * REL_TOL and wrong_order > 10 * REL_TOL


@torch.no_grad()
def test_decode_matches_diffusers(models):
    ours, theirs = models
    z = torch.randn(2, 16, 4, 3)
    img = ours.decode(z)
    assert img.shape == (2, 3, 64, 48)
    diff = rel_diff(img, oracle_decode(theirs, z))
    wrong_eps = rel_diff(img, oracle_decode(theirs, z, eps=1e-6))
    wrong_order = rel_diff(img, oracle_decode(theirs, z, channel_major=False))
    log.info("decode: relative diff %.2e; controls: eps %.2e, order %.2e", diff, wrong_eps, wrong_order)
    assert diff < REL_TOL
    assert wrong_eps > 10 * REL_TOL and wrong_order > 10 * REL_TOL


@torch.no_grad()
def test_decode_inverts_normalisation(models):
    ours, _ = models
    z = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(ours.normalize(ours.inv_normalize(z)), z)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_original_diffusers_original(models):
    ours, theirs = models
    original = ours.state_dict()
    diffusers_sd = ae_original_to_diffusers(original)
    assert diffusers_sd.keys() == theirs.state_dict().keys()  # every key covered, nothing extra
    assert is_diffusers_ae(diffusers_sd) and not is_diffusers_ae(original)
    assert_same_tensors(ae_diffusers_to_original(diffusers_sd), original)


def test_round_trip_diffusers_original_diffusers():
    torch.manual_seed(1)
    theirs = AutoencoderKLFlux2(**TINY_DIFFUSERS).state_dict()
    original = ae_diffusers_to_original(theirs)
    assert original.keys() == AutoEncoder(TINY).state_dict().keys()
    assert_same_tensors(ae_original_to_diffusers(original), theirs)


def test_unknown_keys_are_reported(models):
    ours, theirs = models
    extra = {"encoder.extra.weight": torch.zeros(1), "decoder.mid.attn_1.foo": torch.zeros(1)}
    sd = dict(ours.state_dict(), **extra)
    with pytest.raises(ValueError, match=r"2 unknown .*decoder\.mid\.attn_1\.foo.*encoder\.extra\.weight"):
        ae_original_to_diffusers(sd)
    with pytest.raises(ValueError, match="unknown.*'bn.weight'"):
        ae_diffusers_to_original(dict(theirs.state_dict(), **{"bn.weight": torch.zeros(1)}))


def test_real_config_sizes_on_meta():
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams())
        reference = AutoencoderKLFlux2()  # its defaults are the real FLUX.2 VAE
    assert len(ae.state_dict()) == 251
    assert sum(p.numel() for p in ae.encoder.parameters()) == 34_425_856
    assert sum(p.numel() for p in ae.decoder.parameters()) == 49_620_259
    converted = ae_original_to_diffusers(ae.state_dict())
    expected = reference.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)


@pytest.mark.parametrize("size", [(64, 56), (40, 64), (8, 8)])
def test_encode_rejects_sizes_not_multiple_of_16(models, size):
    ours, _ = models
    with pytest.raises(ValueError, match=rf"multiples of 16.*got {size[0]}×{size[1]}"):
        ours.encode(torch.zeros(1, 3, *size))


def test_decode_rejects_wrong_channel_count(models):
    ours, _ = models
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        ours.decode(torch.zeros(1, 4, 2, 2))


@torch.no_grad()
def test_train_mode_keeps_bn_on_running_stats(models):
    ours, _ = models
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    expected = ours.encode(x)
    stats = ours.bn.running_mean.clone(), ours.bn.running_var.clone()
    try:
        ours.train()
        assert not ours.bn.training
        torch.testing.assert_close(ours.encode(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(ours.bn(expected), ours.normalize(expected))  # calling bn directly too
        assert torch.equal(ours.bn.running_mean, stats[0]) and torch.equal(ours.bn.running_var, stats[1])
    finally:
        ours.eval()


@torch.no_grad()
def test_channels_last_matches_diffusers(models):
    ours, theirs = models
    fast = channels_last(copy.deepcopy(ours))
    assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    z, x = torch.randn(2, 16, 4, 3), torch.rand(2, 3, 64, 48) * 2 - 1
    assert rel_diff(fast.decode(z), oracle_decode(theirs, z)) < REL_TOL
    assert rel_diff(fast.encode(x), oracle_encode(theirs, x)) < REL_TOL


def test_decode_with_autograd_matches_no_grad(models):
    """The in-place SiLU and residual add are for inference; with autograd on, the decode still differentiates."""
    ours, _ = models
    z = torch.randn(1, 16, 2, 2, requires_grad=True)
    img = ours.decode(z)
    img.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), img.detach(), rtol=0, atol=0)
