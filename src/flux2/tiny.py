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


def save_tiny_image_classifier(folder, labels: dict[int, str], seed: int = 0):
    """A tiny random ViT image classifier (e.g. labels {0: "normal", 1: "nsfw"}) with its image processor,
    saved as a folder that the real loading code reads as it reads a downloaded one."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    seeded(lambda: ViTForImageClassification(config), seed).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
