"""FLUX.2 text encoders: prompts -> per-token context for the flow transformer.

Both encoders run a chat LLM over the prompt, padded to `MAX_LENGTH` tokens, and concatenate three
intermediate hidden states per token:

    Klein  (Qwen3):          [layer 9  | layer 18 | layer 27]  -> [B, 512, 3 * hidden]  (7680 for 4B, 12288 for 8B)
    [dev]  (Mistral-Small):  [layer 10 | layer 20 | layer 30]  -> [B, 512, 3 * 5120 = 15360]

Layer k is the output of decoder layer k (1-based; index 0 is the embedding output), without the final norm.
Pad positions keep their (non-zero) hidden states: the transformer sees all 512 tokens, unmasked.

Prompt upsampling and safety checks are separate objects; these classes only embed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    Mistral3ForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from flux2.system_messages import SYSTEM_MESSAGE

OUTPUT_LAYERS_QWEN3 = (9, 18, 27)
OUTPUT_LAYERS_MISTRAL = (10, 20, 30)
MAX_LENGTH = 512


# The reference loads `Qwen/Qwen3-{4B,8B}-FP8`, whose FP8 kernels need GPU compute capability >= 8.9
# (flux2 issue #54) and give different embeddings from bf16. The bf16 checkpoints run on any device, as in
# the open reference change (flux2 PR #53) and diffusers' Klein repos.
QWEN3_MODEL_IDS = {"4B": "Qwen/Qwen3-4B", "8B": "Qwen/Qwen3-8B"}
MISTRAL_MODEL_ID = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
# The 3.2 repo ships no transformers processor files, so the reference takes the processor from 3.1.
MISTRAL_PROCESSOR_ID = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
DEFAULT_DTYPE = torch.bfloat16  # used when loading by name; bf16 matmuls run on CPU, CUDA and MPS

PathLike = str | os.PathLike[str]
# Anything with the model's chat template: a tokenizer, or (for Mistral) a processor or a tokenizer.
TextPreprocessor = PreTrainedTokenizerBase | ProcessorMixin


def _check_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single str; wrap it as [prompt]")
    if not isinstance(prompts, list | tuple):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    return list(prompts)


def _check_max_length(max_length: object) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    return max_length


def _load_model(
    model_cls: type, model_spec: PathLike | PreTrainedModel, device: str | torch.device, dtype: torch.dtype | None
) -> PreTrainedModel:
    """From a Hub id / folder (in `dtype`, default bf16), or take a built model (cast only if `dtype` is given)."""
    if isinstance(model_spec, str | os.PathLike):
        model = model_cls.from_pretrained(
            model_spec, dtype=dtype or DEFAULT_DTYPE, device_map=str(torch.device(device))
        )
    elif isinstance(model_spec, PreTrainedModel):
        model = model_spec.to(device=device, dtype=dtype) if dtype is not None else model_spec.to(device)
    else:
        raise ValueError(
            f"model_spec must be a Hub id, a local folder or a transformers model, got {type(model_spec).__name__}"
        )
    return model.eval().requires_grad_(False)


def _check_depth(model: PreTrainedModel, layers: tuple[int, ...]) -> None:
    num_layers = model.config.get_text_config().num_hidden_layers
    if num_layers < max(layers):
        raise ValueError(
            f"model_spec has {num_layers} decoder layers but the embedding reads hidden states {layers}; "
            f"it needs at least {max(layers)} layers"
        )


def _text_preprocessor(
    spec: PathLike | TextPreprocessor | None,
    default: PathLike | None,
    name: str,
    loader: Callable[[PathLike], TextPreprocessor],
) -> TextPreprocessor:
    """Resolve a tokenizer/processor argument: an object with a chat template, a path/id, or the default."""
    spec = default if spec is None else spec
    if spec is None:
        raise ValueError(f"{name} is required when model_spec is a model object (pass the {name} or its path)")
    if isinstance(spec, str | os.PathLike):
        return loader(spec)
    if not callable(getattr(spec, "apply_chat_template", None)):
        raise ValueError(f"{name} must be a path, a Hub id or an object with apply_chat_template, got {spec!r}")
    return spec


def _stacked_hidden_states(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, layers: tuple[int, ...]
) -> Tensor:
    """Run the LLM and return [B, L, len(layers) * hidden], per token [layer a | layer b | layer c]."""
    device = model.device
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,  # only the hidden states are used; skip the [B, L, vocab] logits
    )
    return torch.stack([output.hidden_states[k] for k in layers], dim=2).flatten(2)  # [B, L, 3, D] -> [B, L, 3D]


class Qwen3Embedder(nn.Module):
    """Klein text encoder: Qwen3 hidden states 9, 18, 27 of each prompt as a user turn (no system message).

    `model_spec` is a Hub id or folder (loaded with `AutoModelForCausalLM`, in `dtype`, default bf16) or a built
    transformers model (moved to `device`, cast only when `dtype` is given; put in eval mode, gradients off).
    `tokenizer` defaults to `model_spec` when that is a path or id.
    """

    def __init__(
        self,
        model_spec: PathLike | PreTrainedModel,
        device: str | torch.device = "cpu",
        *,
        tokenizer: PathLike | PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = MAX_LENGTH,
    ) -> None:
        super().__init__()
        default_tokenizer = model_spec if isinstance(model_spec, str | os.PathLike) else None
        self.tokenizer = _text_preprocessor(tokenizer, default_tokenizer, "tokenizer", AutoTokenizer.from_pretrained)
        self.max_length = _check_max_length(max_length)
        self.model = _load_model(AutoModelForCausalLM, model_spec, device, dtype)
        _check_depth(self.model, OUTPUT_LAYERS_QWEN3)
        self.hidden_size: int = self.model.config.get_text_config().hidden_size
        self.output_dim = len(OUTPUT_LAYERS_QWEN3) * self.hidden_size

    def format_prompt(self, prompt: str) -> str:
        """The chat text for one prompt: user turn, assistant header, empty think block."""
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """[B, max_length, 3 * hidden] in the model's dtype and on its device."""
        texts = [self.format_prompt(p) for p in _check_prompts(prompts)]
        # Every row is padded to max_length, so one batched call equals the reference's per-prompt calls.
        tokens = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
        )
        return _stacked_hidden_states(self.model, tokens["input_ids"], tokens["attention_mask"], OUTPUT_LAYERS_QWEN3)


class Mistral3SmallEmbedder(nn.Module):
    """[dev] text encoder: Mistral-Small hidden states 10, 20, 30 of [system SYSTEM_MESSAGE, user prompt].

    `model_spec` is a Hub id or folder (loaded with `Mistral3ForConditionalGeneration`, in `dtype`, default bf16)
    or a built model. `processor` is a processor/tokenizer with the Mistral chat template, or its path; it defaults
    to Mistral-Small-3.1's (loaded with use_fast=False, as the reference does) for the default model, else to
    `model_spec`. A local copy of the 3.2 repo has no processor files: pass `processor` for it.
    """

    def __init__(
        self,
        model_spec: PathLike | PreTrainedModel = MISTRAL_MODEL_ID,
        device: str | torch.device = "cpu",
        *,
        processor: PathLike | TextPreprocessor | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = MAX_LENGTH,
    ) -> None:
        super().__init__()
        if model_spec == MISTRAL_MODEL_ID:
            default_processor = MISTRAL_PROCESSOR_ID
        else:
            default_processor = model_spec if isinstance(model_spec, str | os.PathLike) else None
        self.processor = _text_preprocessor(processor, default_processor, "processor", load_processor)
        self.max_length = _check_max_length(max_length)
        self.model = _load_model(Mistral3ForConditionalGeneration, model_spec, device, dtype)
        _check_depth(self.model, OUTPUT_LAYERS_MISTRAL)
        self.hidden_size: int = self.model.config.get_text_config().hidden_size
        self.output_dim = len(OUTPUT_LAYERS_MISTRAL) * self.hidden_size

    @staticmethod
    def format_conversation(prompt: str) -> list[dict]:
        """System message then the user prompt. Literal "[IMG]" is removed: the processor counts image tokens
        and rejects text whose count changes under truncation."""
        return [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """[B, max_length, 3 * hidden] in the model's dtype and on its device (hidden 5120 for Mistral-Small)."""
        batch = [self.format_conversation(p) for p in _check_prompts(prompts)]
        tokens = self.processor.apply_chat_template(
            batch,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
        )
        return _stacked_hidden_states(self.model, tokens["input_ids"], tokens["attention_mask"], OUTPUT_LAYERS_MISTRAL)


def load_processor(path: PathLike) -> TextPreprocessor:
    try:
        return AutoProcessor.from_pretrained(path, use_fast=False)
    except ImportError:
        # transformers 5's PixtralProcessor needs torchvision; text-only embedding needs just the tokenizer and
        # its chat template, so fall back to it rather than make torchvision a dependency.
        return AutoTokenizer.from_pretrained(path)


def load_qwen3_embedder(
    variant: str,
    device: str | torch.device = "cpu",
    *,
    model_path: PathLike | None = None,
    tokenizer_path: PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Qwen3Embedder:
    """The Klein encoder: variant "4B" (Klein 4B, base-4B) or "8B" (Klein 9B, 9B-KV, base-9B)."""
    if variant not in QWEN3_MODEL_IDS:
        raise ValueError(f"variant must be one of {sorted(QWEN3_MODEL_IDS)}, got {variant!r}")
    model_spec = model_path if model_path is not None else QWEN3_MODEL_IDS[variant]
    return Qwen3Embedder(model_spec, device, tokenizer=tokenizer_path, dtype=dtype)


def load_mistral_small_embedder(
    device: str | torch.device = "cpu",
    *,
    model_path: PathLike | None = None,
    processor_path: PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Mistral3SmallEmbedder:
    """The [dev] encoder, Mistral-Small-3.2 with the 3.1 processor unless paths are given."""
    model_spec = model_path if model_path is not None else MISTRAL_MODEL_ID
    return Mistral3SmallEmbedder(model_spec, device, processor=processor_path, dtype=dtype)
