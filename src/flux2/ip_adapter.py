"""IP-Adapter for FLUX.2: an image prompt as a few extra tokens on the transformer's text stream.

    image --CLIP image processor--> pixels --CLIPVisionModelWithProjection--> image_embeds [N, D]
          --ImageProjection (Linear, reshape, LayerNorm)--> [N, T, H] --concatenate--> [1, N * T, H]

D is the image encoder's projection dim (768 for the default openai/clip-vit-large-patch14), T the number of tokens
per image (4 by default, read from the weights), H the transformer's hidden size (3072 klein-4B, 4096 klein-9B,
6144 [dev], 64 tiny). The caller appends the tokens to the text stream after `txt_in`. Several images give their
tokens one after another (image 0's T tokens first), rather than one averaged embedding, so each image keeps its
own tokens. `ip_adapter_scale` is applied by the sampler (flux2.sampling): the velocity moves from the run
without the tokens (0) to the run with them (1) and beyond; 0 is exactly the run without the adapter.

Weights format: one .safetensors file with exactly these keys (T, H and D are read from the shapes):
    image_proj.proj.weight  [T * H, D]      image_proj.norm.weight  [H]
    image_proj.proj.bias    [T * H]         image_proj.norm.bias    [H]
The prefix `ip_adapter_proj_model.` (XLabs' name for the same module) is accepted as an alias of `image_proj.`.
No key is ignored: any other key is an error that names it. In particular XLabs' per-block attention weights
(`double_blocks.*.processor.*`) are refused, since this design has no per-block IP attention.

Status of weights: no public FLUX.2 IP-Adapter exists as of this writing, so this module defines the format and is
tested with random weights. XLabs-AI/flux-ip-adapter is a FLUX.1 adapter: its projection makes 4 tokens of width
4096 (T5-XXL's, FLUX.1's context width) that feed new K/V projections to FLUX.1's hidden size 3072 in every double
block. Note that its projection alone (the alias prefix, 768 -> 4 x 4096) loads for klein-9B, whose hidden size is
also 4096, but was never trained for klein-9B's text stream: the alias saves a rename, it does not make such a
file meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, CLIPImageProcessorPil, CLIPVisionModelWithProjection

from flux2.checkpoints import CheckpointError, load_strict, read_safetensors
from flux2.registry import FLUX2_MODEL_INFO
from flux2.text_encoder import DEFAULT_DTYPE, PathLike

CLIP_MODEL_ID = "openai/clip-vit-large-patch14"
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")  # a full CLIP repo (as the default one) or a vision-only save
NUM_TOKENS = 4  # tokens per image, as the studio app's ImageProjModel and the original IP-Adapter
PREFIX = "image_proj."
XLABS_PREFIX = "ip_adapter_proj_model."
PROJ_WEIGHT, NORM_WEIGHT = PREFIX + "proj.weight", PREFIX + "norm.weight"
KEYS = (PROJ_WEIGHT, PREFIX + "proj.bias", NORM_WEIGHT, PREFIX + "norm.bias")


class ImageProjection(nn.Module):
    """One CLIP image embedding -> `num_tokens` tokens of the transformer's width (the standard IP-Adapter
    "image proj"): Linear to num_tokens * hidden, reshape, LayerNorm (eps 1e-5, torch's default) per token."""

    def __init__(self, clip_dim: int, hidden_size: int, num_tokens: int = NUM_TOKENS) -> None:
        super().__init__()
        for name, value in (("clip_dim", clip_dim), ("hidden_size", hidden_size), ("num_tokens", num_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.clip_dim, self.hidden_size, self.num_tokens = clip_dim, hidden_size, num_tokens
        self.proj = nn.Linear(clip_dim, num_tokens * hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, embeds: Tensor) -> Tensor:
        # [B, D] -> [B, T * H] -> [B, T, H]: token t is output features t * H ... (t + 1) * H - 1
        return self.norm(self.proj(embeds).view(-1, self.num_tokens, self.hidden_size))


# ----------------------------------------------------------------------------- weights file


def save_image_projection(image_proj: ImageProjection, path: PathLike) -> None:
    """Write `image_proj` as this module's weights file (keys image_proj.*)."""
    sd = {PREFIX + key: value.detach().cpu().contiguous() for key, value in image_proj.state_dict().items()}
    save_file(sd, str(path))


def read_image_projection(
    path: PathLike, hidden_size: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> ImageProjection:
    """Load a weights file strictly (built on meta, assigned), checking that its tokens are `hidden_size` wide."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IP-Adapter weights not found: {path} (expected one .safetensors file)")
    sd = _canonical_keys(read_safetensors(path))
    _reject_block_attention(sd, path)
    clip_dim, num_tokens, adapter_hidden = _architecture(sd)
    _check_hidden_size(adapter_hidden, hidden_size)
    with torch.device("meta"):
        holder = nn.ModuleDict({"image_proj": ImageProjection(clip_dim, adapter_hidden, num_tokens)})
    sd = {key: value.to(device=device, dtype=dtype or DEFAULT_DTYPE) for key, value in sd.items()}
    return load_strict(holder, sd, f"IP-Adapter {path}")["image_proj"].eval().requires_grad_(False)


def _canonical_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the XLabs prefix to ours; a weight present under both names is an error."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = PREFIX + key.removeprefix(XLABS_PREFIX) if key.startswith(XLABS_PREFIX) else key
        if name in out:
            alias = XLABS_PREFIX + name.removeprefix(PREFIX)
            raise CheckpointError(
                f"IP-Adapter checkpoint has both {name} and {alias}, two names of one weight "
                f"({XLABS_PREFIX!r} is an alias of {PREFIX!r}); keep one of them"
            )
        out[name] = value
    return out


def _reject_block_attention(sd: dict[str, Tensor], path: Path) -> None:
    blocks = sorted(k for k in sd if k.startswith(("double_blocks.", "single_blocks.")) and ".processor." in k)
    if blocks:
        raise CheckpointError(
            f"{path} has {len(blocks)} per-block IP attention weights (e.g. {blocks[0]}): it is an XLabs-style "
            f"FLUX.1 IP-Adapter (as XLabs-AI/flux-ip-adapter), whose tokens feed extra attention in each double "
            f"block. This FLUX.2 IP-Adapter appends its tokens to the text stream and has no such weights; use an "
            f"adapter with exactly the keys {', '.join(KEYS)}"
        )


def _architecture(sd: dict[str, Tensor]) -> tuple[int, int, int]:
    """(clip_dim, num_tokens, hidden) from proj.weight [T * H, D] and norm.weight [H]."""
    missing = [key for key in (PROJ_WEIGHT, NORM_WEIGHT) if key not in sd]
    if missing:
        raise CheckpointError(
            f"IP-Adapter checkpoint lacks {', '.join(missing)}, whose shapes give its architecture; it has "
            f"{sorted(sd)[:10]}, expected exactly {', '.join(KEYS)} (or with the prefix {XLABS_PREFIX!r})"
        )
    proj, norm = tuple(sd[PROJ_WEIGHT].shape), tuple(sd[NORM_WEIGHT].shape)
    if len(proj) != 2 or len(norm) != 1 or min(*proj, *norm) < 1 or proj[0] % norm[0]:
        raise CheckpointError(
            f"IP-Adapter checkpoint: {PROJ_WEIGHT} has shape {proj} and {NORM_WEIGHT} {norm}; expected "
            f"[num_tokens * hidden, clip_dim] and [hidden], with the first a whole multiple of hidden"
        )
    return proj[1], proj[0] // norm[0], norm[0]


def _check_hidden_size(found: int, expected: int) -> None:
    if found != expected:
        raise CheckpointError(
            f"IP-Adapter checkpoint: {NORM_WEIGHT} has shape ({found},), expected ({expected},): this adapter was "
            f"made for a transformer of hidden size {found}{_models(found)}; the loaded model has "
            f"{expected}{_models(expected)}. Use an IP-Adapter made for this model"
        )


def _models(hidden_size: int) -> str:
    names = [name for name, info in FLUX2_MODEL_INFO.items() if info.params.hidden_size == hidden_size]
    return f" ({', '.join(names)})" if names else ""


# ----------------------------------------------------------------------------- image encoder


def load_image_encoder(
    path_or_id: PathLike = CLIP_MODEL_ID, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessorPil]:
    """A CLIP vision model with its projection, and its image processor, from a folder or a Hub id.

    The processor is the PIL one: transformers' default CLIP image processor needs torchvision."""
    source = str(path_or_id)
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type not in CLIP_MODEL_TYPES:
            # from_pretrained would build a CLIP model with random weights from another model's checkpoint
            raise ValueError(
                f"image encoder {source!r} is a {model_type!r} model; the IP-Adapter needs a CLIP vision model "
                f"with projection (model_type one of {list(CLIP_MODEL_TYPES)}), e.g. {CLIP_MODEL_ID}"
            )
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            source, dtype=dtype or DEFAULT_DTYPE, device_map=str(torch.device(device)), output_loading_info=True
        )
        if info["missing_keys"]:
            raise CheckpointError(
                f"image encoder {source!r} lacks {sorted(info['missing_keys'])}, which would be random; the "
                f"IP-Adapter needs CLIPVisionModelWithProjection weights (with visual_projection), as {CLIP_MODEL_ID}"
            )
        processor = CLIPImageProcessorPil.from_pretrained(source)
    except OSError as err:
        raise OSError(
            f"cannot load the IP-Adapter image encoder {source!r}: expected a folder with config.json, the weights "
            f"and preprocessor_config.json, or a reachable Hub id such as {CLIP_MODEL_ID} ({err})"
        ) from err
    return model.eval().requires_grad_(False), processor


# ----------------------------------------------------------------------------- adapter


def _check_images(images: object) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        raise ValueError("ip_adapter images must be a sequence of PIL images, got a single image; wrap it as [image]")
    if not isinstance(images, Sequence) or isinstance(images, str):
        raise ValueError(f"ip_adapter images must be a sequence of PIL images, got {type(images).__name__}")
    if not images:
        raise ValueError("ip_adapter images must hold at least one PIL image, got an empty sequence")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"ip_adapter images[{i}] must be a PIL image, got {type(image).__name__}")
    return [image.convert("RGB") for image in images]


class IPAdapter:
    """A CLIP image encoder, its image processor and an ImageProjection: PIL images -> tokens for the text stream.

    Tokens come out on the projection's device and dtype."""

    def __init__(
        self,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: CLIPImageProcessorPil,
        image_proj: ImageProjection,
    ) -> None:
        clip_dim = image_encoder.config.projection_dim
        if image_proj.clip_dim != clip_dim:
            shape = (image_proj.num_tokens * image_proj.hidden_size, image_proj.clip_dim)
            raise CheckpointError(
                f"IP-Adapter checkpoint: {PROJ_WEIGHT} has shape {shape}, expected {(shape[0], clip_dim)}: the "
                f"adapter takes CLIP image embeddings of dim {image_proj.clip_dim}, but the image encoder "
                f"{image_encoder.name_or_path!r} gives {clip_dim} (its config.projection_dim); load the image "
                f"encoder the adapter was made with (image_encoder=...)"
            )
        self.image_encoder, self.image_processor, self.image_proj = image_encoder, image_processor, image_proj

    @classmethod
    def from_files(
        cls,
        adapter_path: PathLike,
        hidden_size: int,
        image_encoder: PathLike = CLIP_MODEL_ID,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> IPAdapter:
        """Load the weights file (checked against `hidden_size`, the transformer's) and then, eagerly, the image
        encoder from a folder or Hub id, both on `device` in `dtype` (default bf16)."""
        image_proj = read_image_projection(adapter_path, hidden_size, device, dtype)  # small: fail fast
        return cls(*load_image_encoder(image_encoder, device, dtype), image_proj)

    @property
    def device(self) -> torch.device:
        return self.image_proj.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.proj.weight.dtype

    @property
    def num_tokens(self) -> int:
        return self.image_proj.num_tokens

    @torch.no_grad()
    def embeds(self, images: Sequence[Image.Image]) -> Tensor:
        """CLIP image embeddings [N, D] of N images, on the adapter's device and dtype."""
        pixels = self.image_processor(images=_check_images(images), return_tensors="pt")["pixel_values"]
        encoder = self.image_encoder
        embeds = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype)).image_embeds
        return embeds.to(self.device, self.dtype)

    @torch.no_grad()
    def tokens(self, images: Sequence[Image.Image]) -> Tensor:
        """[1, num_tokens * len(images), hidden]: image 0's tokens, then image 1's, ...

        How much they count (`ip_adapter_scale`) is applied by the sampler to the velocity, not here: the
        transformer re-normalises the text stream in every block, so scaled tokens would change almost nothing.
        """
        tokens = self.image_proj(self.embeds(images))  # [N, T, H]
        return tokens.reshape(1, -1, tokens.shape[-1])
