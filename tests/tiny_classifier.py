"""A tiny random image classifier saved as a Hub-style folder: the NSFW classifier's stand-in in tests."""

from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from flux2.tiny import seeded


def save_tiny_image_classifier(folder, labels: dict[int, str], seed: int = 0):
    """A tiny random ViT image classifier (e.g. labels {0: "normal", 1: "nsfw"}) with its image processor,
    saved as a folder that the real loading code reads as it reads a downloaded one."""
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    seeded(lambda: ViTForImageClassification(config), seed).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
