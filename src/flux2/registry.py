"""The published FLUX.2 models (and the `tiny` self-test model): where their weights live and how they sample.

Insertion order matters: the first entry is the default model.
"""

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flux2.params import AutoEncoderParams, Flux2Params, Klein4BParams, Klein9BParams

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # names of torch's float dtypes random weights may use

# The tiny self-test model: random weights, runs every part through the same code, produces noise images.
TINY_TEXT_HIDDEN = 32  # hidden size of flux2.tiny_text_encoders.tiny_qwen3
TINY_AE_PARAMS = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4)  # 32: FLUX's GroupNorm
TINY_PARAMS = Flux2Params(
    in_channels=4 * TINY_AE_PARAMS.z_channels,
    context_in_dim=3 * TINY_TEXT_HIDDEN,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 8, 8, 8),
    use_guidance_embed=False,
)


@dataclass(frozen=True)
class TextEncoderInfo:
    kind: str  # "qwen3" | "mistral3" | "tiny" (flux2.tiny_text_encoders.tiny_qwen3: random weights only)
    repo_id: str  # default Hub id of the weights
    env_var: str  # folder of the weights (transformers layout)
    tokenizer_repo_id: str
    tokenizer_env_var: str
    hidden_size: int = 0  # the published model's (its config.json); 0: not known


QWEN3_4B = TextEncoderInfo("qwen3", "Qwen/Qwen3-4B", "QWEN3_4B_PATH", "Qwen/Qwen3-4B", "QWEN3_4B_TOKENIZER_PATH", 2560)
QWEN3_8B = TextEncoderInfo("qwen3", "Qwen/Qwen3-8B", "QWEN3_8B_PATH", "Qwen/Qwen3-8B", "QWEN3_8B_TOKENIZER_PATH", 4096)
# The reference loads the Mistral weights and its processor from two different repos.
MISTRAL_SMALL = TextEncoderInfo(
    "mistral3",
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
    "MISTRAL_PATH",
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    "MISTRAL_TOKENIZER_PATH",
    5120,
)
PUBLISHED_TEXT_ENCODERS = (QWEN3_4B, QWEN3_8B, MISTRAL_SMALL)
TINY_TEXT = TextEncoderInfo("tiny", "", "", "", "")


@dataclass(frozen=True)
class SideModel:
    """A model that an option loads besides the image model, and the option that points at another one."""

    label: str
    repo_id: str  # default Hub id
    option: str


# The reference's NSFW classifier (--safety classifier / full), and the chat model of the "full" safety check and
# of local prompt upsampling (Mistral-Small 3.2; on [dev] its own loaded text encoder serves instead).
NSFW_CLASSIFIER = SideModel("the NSFW image classifier", "Falconsai/nsfw_image_detection", "--nsfw-model")
CHAT_MODEL = SideModel("the chat model (safety 'full', local upsampling)", MISTRAL_SMALL.repo_id, "--upsample-model")


@dataclass(frozen=True)
class HubWeights:
    """Published weights: found through environment variables, a weights folder or the Hugging Face Hub
    (`flux2.weights` says where it looks)."""


@dataclass(frozen=True)
class RandomWeights:
    """No files: the transformer and autoencoder are built with random weights from `seed` (`flux2.tiny`), in
    `dtype` unless the caller asks for another; so is the text encoder, which must be the "tiny" kind. Such a model
    runs the whole code path offline and produces noise images."""

    seed: int = 0
    dtype: str = "float32"  # a torch dtype's name

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"RandomWeights.dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype)


WeightSource = HubWeights | RandomWeights


@dataclass(frozen=True)
class ModelInfo:
    name: str
    repo_id: str
    filename: str  # original single-file transformer checkpoint in the repo
    params: Flux2Params = field(compare=False)
    text_encoder: TextEncoderInfo
    env_var: str  # path of the transformer checkpoint
    num_steps: int
    guidance: float
    fixed_params: frozenset[str] = frozenset()  # settings a distilled model does not allow to change
    guidance_distilled: bool = True  # False: true CFG against an (empty) negative prompt
    use_kv_cache: bool = False
    ae_repo_id: str = "black-forest-labs/FLUX.2-dev"
    filename_ae: str = "ae.safetensors"
    ae_params: AutoEncoderParams = field(default_factory=AutoEncoderParams, compare=False)
    width: int = 1024
    height: int = 1024
    licence: str = ""
    description: str = ""
    weights: WeightSource = HubWeights()
    output_note: str = ""  # recorded with every image the model makes (e.g. that it is noise)

    @property
    def uses_cfg(self) -> bool:
        return not self.guidance_distilled

    @property
    def needs_files(self) -> bool:
        """False for a model built from random weights: nothing to find, download or check on disk."""
        return isinstance(self.weights, HubWeights)

    def check_fixed(self, num_steps, guidance) -> None:
        """A distilled model runs only at the settings it was distilled for; anything else is a clear error."""
        given = {"num_steps": num_steps, "guidance": guidance}
        fixed = {"num_steps": self.num_steps, "guidance": self.guidance}
        for key in sorted(self.fixed_params):
            if given[key] != fixed[key]:
                raise ValueError(
                    f"{self.name} is a distilled model: {key} is fixed at {fixed[key]} (got {given[key]}); "
                    f"use a base model (e.g. flux.2-klein-base-4b) to change it"
                )


def _klein(name: str, repo: str, params: Flux2Params, text: TextEncoderInfo, env: str, **kw) -> ModelInfo:
    """A [klein] entry: its checkpoint file is named after the model (flux.2-klein-4b -> flux-2-klein-4b)."""
    filename = name.replace("flux.2-", "flux-2-") + ".safetensors"
    return ModelInfo(name=name, repo_id=repo, filename=filename, params=params, text_encoder=text, env_var=env, **kw)


DISTILLED = dict(num_steps=4, guidance=1.0, fixed_params=frozenset({"num_steps", "guidance"}))
BASE = dict(num_steps=50, guidance=4.0, guidance_distilled=False)
NON_COMMERCIAL = "FLUX Non-Commercial"

FLUX2_MODEL_INFO: dict[str, ModelInfo] = {
    info.name: info
    for info in [
        _klein("flux.2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", Klein4BParams(), QWEN3_4B,
               "KLEIN_4B_MODEL_PATH", **DISTILLED, licence="Apache-2.0",
               description="4B, step-distilled (4 steps), Qwen3-4B text encoder"),
        _klein("flux.2-klein-9b", "black-forest-labs/FLUX.2-klein-9B", Klein9BParams(), QWEN3_8B,
               "KLEIN_9B_MODEL_PATH", **DISTILLED, licence=NON_COMMERCIAL,
               description="9B, step-distilled (4 steps), Qwen3-8B text encoder"),
        _klein("flux.2-klein-9b-kv", "black-forest-labs/FLUX.2-klein-9B-kv", Klein9BParams(), QWEN3_8B,
               "KLEIN_9B_KV_MODEL_PATH", **DISTILLED, use_kv_cache=True, licence=NON_COMMERCIAL,
               description="9B, step-distilled, caches reference K/V for faster multi-reference edits"),
        _klein("flux.2-klein-base-4b", "black-forest-labs/FLUX.2-klein-base-4B", Klein4BParams(), QWEN3_4B,
               "KLEIN_4B_BASE_MODEL_PATH", **BASE, licence="Apache-2.0",
               description="4B base model (50 steps, true CFG)"),
        _klein("flux.2-klein-base-9b", "black-forest-labs/FLUX.2-klein-base-9B", Klein9BParams(), QWEN3_8B,
               "KLEIN_9B_BASE_MODEL_PATH", **BASE, licence=NON_COMMERCIAL,
               description="9B base model (50 steps, true CFG)"),
        ModelInfo(name="flux.2-dev", repo_id="black-forest-labs/FLUX.2-dev", filename="flux2-dev.safetensors",
                  params=Flux2Params(), text_encoder=MISTRAL_SMALL, env_var="FLUX2_MODEL_PATH", num_steps=50,
                  guidance=4.0, licence=NON_COMMERCIAL,
                  description="32B, guidance-distilled (embedded guidance), Mistral-Small-3.2 text encoder"),
        ModelInfo(name="tiny", repo_id="", filename="", params=TINY_PARAMS, text_encoder=TINY_TEXT, env_var="",
                  num_steps=4, guidance=1.0, ae_params=TINY_AE_PARAMS, width=256, height=256,
                  description="random-weight self-test model: runs every part offline, PRODUCES NOISE IMAGES",
                  weights=RandomWeights(seed=0), output_note="noise image from the random-weight self-test model"),
    ]
}  # fmt: skip


def model_info(name: str) -> ModelInfo:
    """Exact (case-insensitive) registry lookup with a helpful error."""
    info = FLUX2_MODEL_INFO.get(name.lower())
    if info is None:
        close = difflib.get_close_matches(name.lower(), FLUX2_MODEL_INFO, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown model {name!r}; {hint}choose one of: {', '.join(FLUX2_MODEL_INFO)}")
    return info


DEFAULT_MODEL = next(iter(FLUX2_MODEL_INFO))
