"""IP-Adapter on tiny random models saved to folders: the projection's maths against a hand computation, the weights
file format (round trip, XLabs alias, strict errors), image-encoder loading, and tokens() shapes and the scale check."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_classifier import save_tiny_image_classifier
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers import CLIPVisionModelWithProjection as CLIPVision

from flux2.checkpoints import CheckpointError
from flux2.ip_adapter import (
    ImageProjection,
    IPAdapter,
    load_image_encoder,
    read_image_projection,
    save_image_projection,
)
from flux2.registry import TINY_PARAMS
from flux2.request import GenerationRequest
from flux2.tiny import seeded

HIDDEN = TINY_PARAMS.hidden_size  # 64
CLIP_DIM = 16
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_projection(clip_dim: int, hidden_size: int, num_tokens: int = 4, seed: int = 0) -> ImageProjection:
    """Random Linear and LayerNorm weights (the norm's too, so that every weight matters)."""

    def build() -> ImageProjection:
        proj = ImageProjection(clip_dim, hidden_size, num_tokens)
        torch.nn.init.normal_(proj.norm.weight, 1.0, 0.1)
        torch.nn.init.normal_(proj.norm.bias, 0.0, 0.1)
        return proj

    return seeded(build, seed)


def save_tiny_clip(folder: Path, projection_dim: int = CLIP_DIM, seed: int = 0) -> Path:
    """A tiny random CLIPVisionModelWithProjection and its PIL image processor (32 px), saved as a folder."""
    config = CLIPVisionConfig(**TINY_CLIP, projection_dim=projection_dim)
    seeded(lambda: CLIPVision(config), seed).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_ip_adapter(folder: Path, hidden_size: int, seed: int = 0) -> tuple[Path, Path]:
    """(weights file, image encoder folder) of a tiny random IP-Adapter for a transformer of `hidden_size`."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = save_tiny_clip(folder / "image_encoder", seed=seed)
    save_image_projection(random_projection(CLIP_DIM, hidden_size, seed=seed + 1), folder / "ip_adapter.safetensors")
    return folder / "ip_adapter.safetensors", encoder


def noise_image(seed: int, w: int = 50, h: int = 40) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_ip_adapter(tmp_path_factory.mktemp("ip_adapter"), HIDDEN)


@pytest.fixture(scope="module")
def adapter(files) -> IPAdapter:
    return IPAdapter.from_files(files[0], HIDDEN, image_encoder=files[1], dtype=torch.float32)


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a weights file with its state dict changed by edit(sd) (which mutates sd in place)."""
    sd = load_file(str(src))
    edit(sd)
    save_file(sd, str(dst))
    return dst


# ----------------------------------------------------------------------------- projection


def test_projection_shape():
    assert ImageProjection(CLIP_DIM, HIDDEN)(torch.randn(3, CLIP_DIM)).shape == (3, 4, HIDDEN)


def test_projection_matches_hand_computation():
    proj = random_projection(CLIP_DIM, HIDDEN, num_tokens=3)
    x = torch.randn(2, CLIP_DIM)
    flat = F.linear(x, proj.proj.weight, proj.proj.bias)  # [2, 3 * H]
    norm = (proj.norm.weight, proj.norm.bias)

    expected = F.layer_norm(flat.reshape(2, 3, HIDDEN), (HIDDEN,), *norm, eps=1e-5)
    torch.testing.assert_close(proj(x), expected)

    wrong_order = F.layer_norm(flat.reshape(2, HIDDEN, 3).transpose(1, 2), (HIDDEN,), *norm, eps=1e-5)
    assert not torch.allclose(proj(x), wrong_order, atol=1e-2)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_projection_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        ImageProjection(CLIP_DIM, HIDDEN, num_tokens=bad)


# ----------------------------------------------------------------------------- weights file


def test_round_trip_gives_identical_tokens(files, adapter):
    in_memory = IPAdapter(
        CLIPVision.from_pretrained(files[1]).eval(),
        CLIPImageProcessorPil.from_pretrained(files[1]),
        random_projection(CLIP_DIM, HIDDEN, seed=1),
    )
    images = [noise_image(0), noise_image(1)]
    assert torch.equal(adapter.tokens(images), in_memory.tokens(images))
    assert type(adapter.image_processor) is CLIPImageProcessorPil  # no torchvision here


def test_architecture_is_read_from_shapes(tmp_path, files):
    path = tmp_path / "three.safetensors"
    save_image_projection(random_projection(CLIP_DIM, HIDDEN, num_tokens=3), path)
    proj = read_image_projection(path, HIDDEN, dtype=torch.float32)
    assert (proj.clip_dim, proj.num_tokens, proj.hidden_size) == (CLIP_DIM, 3, HIDDEN)
    assert IPAdapter(*load_image_encoder(files[1]), proj).tokens([noise_image(0)]).shape == (1, 3, HIDDEN)


def test_bf16_by_default(files):
    proj = read_image_projection(files[0], HIDDEN)
    assert proj.proj.weight.dtype == torch.bfloat16 and proj.proj.weight.device.type == "cpu"


def test_xlabs_prefix_is_an_alias(tmp_path, files, adapter):
    def to_xlabs(sd):
        for key in list(sd):
            sd[key.replace("image_proj.", "ip_adapter_proj_model.")] = sd.pop(key)

    path = rewrite(files[0], tmp_path / "xlabs.safetensors", to_xlabs)
    other = IPAdapter.from_files(path, HIDDEN, image_encoder=files[1], dtype=torch.float32)
    assert torch.equal(other.tokens([noise_image(2)]), adapter.tokens([noise_image(2)]))


def test_both_prefixes_is_an_error(tmp_path, files):
    def both(sd):
        sd["ip_adapter_proj_model.norm.bias"] = sd["image_proj.norm.bias"].clone()

    path = rewrite(files[0], tmp_path / "both.safetensors", both)
    with pytest.raises(CheckpointError, match="both image_proj.norm.bias and ip_adapter_proj_model.norm.bias"):
        read_image_projection(path, HIDDEN)


def test_missing_key_is_an_error(tmp_path, files):
    path = rewrite(files[0], tmp_path / "missing.safetensors", lambda sd: sd.pop("image_proj.norm.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n\s+image_proj.norm.bias"):
        read_image_projection(path, HIDDEN)


def test_missing_shape_key_is_an_error(tmp_path, files):
    path = rewrite(files[0], tmp_path / "no_proj.safetensors", lambda sd: sd.pop("image_proj.proj.weight"))
    with pytest.raises(CheckpointError, match="lacks image_proj.proj.weight, whose shapes give its architecture"):
        read_image_projection(path, HIDDEN)


def test_unexpected_key_is_an_error(tmp_path, files):
    def extra(sd):
        sd["image_proj.extra.weight"] = torch.zeros(2)

    path = rewrite(files[0], tmp_path / "extra.safetensors", extra)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n\s+image_proj.extra.weight"):
        read_image_projection(path, HIDDEN)


def test_xlabs_block_attention_is_an_error(tmp_path, files):
    def xlabs_blocks(sd):
        sd["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)

    path = rewrite(files[0], tmp_path / "blocks.safetensors", xlabs_blocks)
    with pytest.raises(CheckpointError) as err:
        read_image_projection(path, HIDDEN)
    for fragment in ["1 per-block IP attention", "double_blocks.0.processor.ip_adapter_double_stream_k_proj", "XLabs"]:
        assert fragment in str(err.value)


def test_wrong_hidden_size_names_the_models(tmp_path):
    path = tmp_path / "klein4b.safetensors"
    save_image_projection(random_projection(CLIP_DIM, 3072), path)
    with pytest.raises(CheckpointError) as err:
        read_image_projection(path, 4096)
    message = str(err.value)
    assert "image_proj.norm.weight has shape (3072,), expected (4096,)" in message
    assert "hidden size 3072 (flux.2-klein-4b, flux.2-klein-base-4b)" in message
    assert "the loaded model has 4096 (flux.2-klein-9b" in message


def test_wrong_hidden_size_from_files(files):
    with pytest.raises(CheckpointError, match=r"hidden size 64 \(tiny\); the loaded model has 3072"):
        IPAdapter.from_files(files[0], 3072, image_encoder=files[1])


def test_wrong_clip_dim_is_an_error(tmp_path, files):
    encoder = save_tiny_clip(tmp_path / "clip24", projection_dim=24)
    with pytest.raises(CheckpointError) as err:
        IPAdapter.from_files(files[0], HIDDEN, image_encoder=encoder)
    message = str(err.value)
    assert f"image_proj.proj.weight has shape ({4 * HIDDEN}, 16), expected ({4 * HIDDEN}, 24)" in message
    assert "CLIP image embeddings of dim 16" in message and "image_encoder=" in message


def test_missing_weights_file(tmp_path, files):
    with pytest.raises(FileNotFoundError, match="IP-Adapter weights not found"):
        IPAdapter.from_files(tmp_path / "nope.safetensors", HIDDEN, image_encoder=files[1])


# ----------------------------------------------------------------------------- image encoder


def test_encoder_from_a_full_clip_folder(tmp_path):
    """The default Hub repo holds a whole CLIPModel (text tower too): its vision tower and projection load.
    (Its config repeats projection_dim in vision_config, which CLIPVisionModelWithProjection reads.)"""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(TINY_CLIP, projection_dim=CLIP_DIM)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_DIM)
    clip = seeded(lambda: CLIPModel(config), 0)
    clip.save_pretrained(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    encoder, processor = load_image_encoder(tmp_path, dtype=torch.float32)
    pixels = processor(images=[noise_image(0)], return_tensors="pt")["pixel_values"]
    expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(encoder(pixel_values=pixels).image_embeds, expected)


def test_encoder_without_projection_is_an_error(tmp_path):
    seeded(lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)), 0).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="lacks \\['visual_projection.weight'\\]"):
        load_image_encoder(tmp_path)


def test_encoder_of_another_model_type_is_an_error(tmp_path):
    save_tiny_image_classifier(tmp_path, {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="is a 'vit' model; the IP-Adapter needs a CLIP vision model"):
        load_image_encoder(tmp_path)


def test_encoder_not_found(tmp_path):
    with pytest.raises(OSError, match="cannot load the IP-Adapter image encoder"):
        load_image_encoder(tmp_path / "absent")


# ----------------------------------------------------------------------------- tokens


def test_tokens_shape_and_order(adapter):
    one, two = adapter.tokens([noise_image(0)]), adapter.tokens([noise_image(0), noise_image(1)])
    assert one.shape == (1, 4, HIDDEN) and two.shape == (1, 8, HIDDEN)
    torch.testing.assert_close(two, torch.cat([one, adapter.tokens([noise_image(1)])], dim=1))


@pytest.mark.parametrize("scale", [-0.1, math.nan, math.inf, True, "1"])
def test_bad_scale_is_an_error(scale):
    with pytest.raises(ValueError, match="ip_adapter_scale must be a finite number >= 0"):
        GenerationRequest(ip_adapter_scale=scale).check()  # checked with every request, like all settings


def test_different_images_give_different_tokens(adapter):
    assert not torch.allclose(adapter.tokens([noise_image(0)]), adapter.tokens([noise_image(1)]), atol=1e-3)


@pytest.mark.parametrize(
    "images, fragment",
    [([], "at least one PIL image"), ("a.png", "got str"), ([torch.zeros(3, 8, 8)], "images[0] must be a PIL")],
)
def test_bad_images_are_an_error(adapter, images, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        adapter.tokens(images)


def test_single_image_not_in_a_list(adapter):
    with pytest.raises(ValueError, match=r"wrap it as \[image\]"):
        adapter.tokens(noise_image(0))
