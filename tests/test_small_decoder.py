"""The FLUX.2 small decoder: BFL's distilled, narrower decoder (widths (96, 192, 384, 384) instead of
(128, 256, 512, 512), encoder unchanged). Its width is read from the tensor shapes; diffusers'
`AutoencoderKLFlux2(decoder_block_out_channels=...)` is the oracle."""

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from safetensors.torch import save_file

from flux2.autoencoder import AutoEncoderParams, unpatchify
from flux2.checkpoints import CheckpointError
from flux2.checkpoints.autoencoder import ae_original_to_diffusers, ae_params_from_state_dict, diffusers_ae_config
from flux2.registry import TINY_AE_PARAMS
from flux2.tiny import random_ae
from flux2.util import load_ae

SMALL = replace(TINY_AE_PARAMS, decoder_widths=(32, 32, 32, 32))  # the tiny encoder is (32, 32, 64, 64)


@pytest.fixture(scope="module")
def small_ae():
    return random_ae(SMALL, seed=3)


def test_real_small_decoder_sizes_on_meta():
    params = AutoEncoderParams(decoder_widths=(96, 192, 384, 384))
    with torch.device("meta"):
        theirs = AutoencoderKLFlux2(**diffusers_ae_config(params))
    assert [b.resnets[0].conv1.out_channels for b in theirs.decoder.up_blocks] == [384, 384, 192, 96]
    assert theirs.encoder.down_blocks[0].resnets[0].conv1.out_channels == 128  # encoder unchanged


def test_small_decoder_loads_from_shapes_and_matches_diffusers(small_ae, tmp_path):
    sd = small_ae.state_dict()
    assert ae_params_from_state_dict(sd).decoder_widths == (32, 32, 32, 32)
    assert ae_params_from_state_dict(random_ae(TINY_AE_PARAMS).state_dict()).decoder_widths is None
    save_file(sd, tmp_path / "small_decoder.safetensors")
    theirs = AutoencoderKLFlux2(**diffusers_ae_config(SMALL)).eval()
    theirs.load_state_dict(ae_original_to_diffusers(sd))
    theirs.save_pretrained(tmp_path / "vae")
    for path in (tmp_path / "small_decoder.safetensors", tmp_path / "vae"):
        ours = load_ae("tiny", device="cpu", path=path)
        assert ours.params.decoder_widths == (32, 32, 32, 32)
        assert ours.decoder.conv_out.weight.shape[1] == 32
        z = torch.randn(1, 4 * SMALL.z_channels, 2, 2, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            img = ours.decode(z)
            mean = small_ae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(small_ae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
            oracle = theirs.decode(unpatchify(z * std + mean)).sample
        assert ((img - oracle).norm() / oracle.norm()).item() < 1e-5


def test_small_decoder_into_the_full_width_model_names_the_keys(small_ae, tmp_path):
    """Negative control: the widths really come from the file; forcing the usual decoder fails strictly."""
    save_file(small_ae.state_dict(), tmp_path / "small_decoder.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*\n\s+decoder\."):
        load_ae("tiny", device="cpu", path=tmp_path / "small_decoder.safetensors", params=TINY_AE_PARAMS)


def test_a_decoder_alone_replaces_the_full_autoencoders(small_ae, tmp_path):
    """BFL ships the small decoder also as a decoder-only file (its keys without `decoder.`): it goes with the
    model's own autoencoder, whose encoder stays."""
    full = random_ae(TINY_AE_PARAMS, seed=5)
    save_file(full.state_dict(), tmp_path / "ae.safetensors")
    decoder_only = {k.removeprefix("decoder."): v for k, v in small_ae.state_dict().items() if k.startswith("decoder.")}
    save_file(decoder_only, tmp_path / "small_decoder.safetensors")
    save_file(small_ae.state_dict(), tmp_path / "whole_small.safetensors")
    z = torch.randn(1, 4 * SMALL.z_channels, 2, 2, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for decoder in ("small_decoder.safetensors", "whole_small.safetensors"):
        ours = load_ae("tiny", device="cpu", path=tmp_path / "ae.safetensors", decoder_path=tmp_path / decoder)
        assert ours.params.decoder_widths == (32, 32, 32, 32)
        with torch.no_grad():
            # The decoder is the small one...
            assert torch.equal(ours.decoder.conv_out.weight, small_ae.decoder.conv_out.weight)
            assert not torch.equal(ours.decode(z), full.decode(z))
            # ...and the encoder (with the latent statistics) is still the full autoencoder's.
            assert torch.equal(ours.encode(image), full.encode(image))
