"""Random-weight builders for the `tiny` self-test model (deterministic for a given seed).

The tiny model runs every part of the real code path offline in seconds; its images are noise.
"""

import torch

from flux2.autoencoder import AutoEncoder, AutoEncoderParams
from flux2.model import Flux2, Flux2Params


def seeded(build, seed: int):
    """build() under a fixed seed, without disturbing the caller's random state; the result in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def random_flow_model(params: Flux2Params, seed: int = 0) -> Flux2:
    """A transformer with random weights; RMSNorm scales are randomised too so every weight matters."""

    def build() -> Flux2:
        model = Flux2(params)
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.data = 1.0 + 0.1 * torch.randn_like(p)
        return model

    return seeded(build, seed)


def random_ae(params: AutoEncoderParams, seed: int = 0) -> AutoEncoder:
    """An autoencoder with random weights and non-trivial BatchNorm running statistics."""

    def build() -> AutoEncoder:
        ae = AutoEncoder(params)
        ae.bn.running_mean.copy_(0.1 * torch.randn_like(ae.bn.running_mean))
        ae.bn.running_var.copy_(0.5 + torch.rand_like(ae.bn.running_var))
        return ae

    return seeded(build, seed)
