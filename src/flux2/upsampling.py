"""Prompt upsampling: a chat model rewrites a short prompt into a detailed one before text encoding.

Two back ends with one method, `upsample(prompt, images) -> UpsampleResult`:

- `LocalUpsampler`: any chat model that transformers loads, e.g. the Mistral-Small VLM that [dev] already
  holds as its text encoder (pass `embedder.model, embedder.processor` to share it), or a text-only causal LM.
- `OpenRouterUpsampler`: an OpenAI-style chat-completions API (OpenRouter by default), spoken with httpx.

Upsampling never costs a generation: a failing model, a network error or an empty reply gives back the
original prompt with a short reason in `UpsampleResult.error`, logged as a warning. Only caller bugs (a prompt
that is not a str, images that are not PIL images) raise.

The system message is `SYSTEM_MESSAGE_UPSAMPLING_T2I` without images and `..._I2I` with images, as in the
reference (`Mistral3SmallEmbedder.upsample_prompt` and `OpenRouterAPIClient.upsample_prompt`).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import io
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import httpx
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flux2.images import cap_pixels, concatenate_images
from flux2.system_messages import SYSTEM_MESSAGE_UPSAMPLING_I2I, SYSTEM_MESSAGE_UPSAMPLING_T2I
from flux2.text_encoder import (
    DEFAULT_DTYPE,
    MISTRAL_MODEL_ID,
    MISTRAL_PROCESSOR_ID,
    PathLike,
    TextPreprocessor,
    load_processor,
)
from flux2.util import default_device

log = logging.getLogger(__name__)

UPSAMPLING_MODES = ("none", "local", "openrouter")

# Reference text_encoder.py: every image shown to the local upsampling model is capped at 768^2 pixels.
UPSAMPLING_MAX_IMAGE_SIZE = 768**2
# Reference generation settings for local upsampling (`upsample_prompt`) and the OpenRouter client.
UPSAMPLING_MAX_NEW_TOKENS = 512
UPSAMPLING_TEMPERATURE = 0.15
# Reference `apply_chat_template(..., truncation=True, max_length=2048)`; the image tokens count towards it.
UPSAMPLING_TEMPLATE_MAX_LENGTH = 2048

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
OPENROUTER_DEFAULT_MODEL = "mistralai/pixtral-large-2411"
OPENROUTER_API_KEY_ENV = "OPENROUTER_API_KEY"
# The reference sent images at full size; a 1024^2 cap keeps requests small while leaving detail to see.
OPENROUTER_MAX_IMAGE_PIXELS = 1024**2
# Reference openrouter_api_client.py `DEFAULT_SAMPLING_PARAMS`, read-only so no caller can change the preset.
DEFAULT_SAMPLING_PARAMS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"mistralai/pixtral-large-2411": MappingProxyType({"temperature": UPSAMPLING_TEMPERATURE})}
)
# Request fields the client sets itself; sampling_params must not override them.
_RESERVED_REQUEST_FIELDS = frozenset({"model", "messages", "max_tokens", "stream"})
_MAX_REASON_CHARS = 300
# Qwen3-style models may open with a reasoning block; it is not part of the prompt.
_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)


@dataclass(frozen=True)
class UpsampleResult:
    """`prompt` is what to generate with: the upsampled text when it worked, else the original prompt.

    `upsampled` holds the model's text when it worked (record it with the image); `error` a short reason when
    upsampling fell back to the original prompt.
    """

    prompt: str
    upsampled: str | None = None
    error: str | None = None

    @property
    def used(self) -> bool:
        """True when `prompt` is the model's rewrite."""
        return self.upsampled is not None

    @classmethod
    def success(cls, upsampled: str) -> UpsampleResult:
        return cls(prompt=upsampled, upsampled=upsampled)

    @classmethod
    def fallback(cls, prompt: str, error: str) -> UpsampleResult:
        return cls(prompt=prompt, error=error)


@runtime_checkable
class PromptUpsampler(Protocol):
    def upsample(self, prompt: str, images: Sequence[Image.Image] = ()) -> UpsampleResult:
        """Rewrite `prompt` (an edit request when `images` are given); never raises on a model failure."""
        ...


class UpsamplingError(Exception):
    """A failure whose message is already the human reason (no exception type prefix needed)."""


def upsampling_system_message(images: Sequence[Image.Image]) -> str:
    """The reference's choice: the image-editing instruction when there are images, else text-to-image."""
    return SYSTEM_MESSAGE_UPSAMPLING_I2I if images else SYSTEM_MESSAGE_UPSAMPLING_T2I


def _check_request(prompt: object, images: object) -> list[Image.Image]:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if isinstance(images, Image.Image):
        raise ValueError("images must be a sequence of PIL images, got a single image; wrap it as [image]")
    if not isinstance(images, Sequence):
        raise ValueError(f"images must be a sequence of PIL images, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
    return list(images)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"


def _upsample_or_fall_back(prompt: str, source: str, attempt: Callable[[], str]) -> UpsampleResult:
    """Run `attempt` and return its non-empty text, or the original prompt with the reason (logged)."""
    try:
        text = attempt()
    except Exception as e:  # upsampling must never cost the generation, whatever went wrong
        reason = str(e) if isinstance(e, UpsamplingError) else f"{type(e).__name__}: {e}"
    else:
        if text:
            return UpsampleResult.success(text)
        reason = "the model returned an empty prompt"
    error = _short(f"{source}: {reason}")
    log.warning("prompt upsampling failed, generating with the original prompt (%s)", error)
    return UpsampleResult.fallback(prompt, error)


def _without_image_tags(prompt: str) -> str:
    """A literal [IMG] in a prompt would be read as an image placeholder (as the reference, drop it)."""
    return prompt.replace("[IMG]", "")


def upsampling_image(images: Sequence[Image.Image], max_pixels: int = UPSAMPLING_MAX_IMAGE_SIZE) -> Image.Image:
    """The one image the local model sees: the images side by side, then capped at `max_pixels` (LANCZOS), so
    several references never cost more than one."""
    rgb = [image.convert("RGB") for image in images]
    return cap_pixels(rgb[0] if len(rgb) == 1 else concatenate_images(rgb), max_pixels)


def _model_has_vision(model: PreTrainedModel) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def _processor_has_vision(processor: TextPreprocessor) -> bool:
    return getattr(processor, "image_processor", None) is not None


class LocalUpsampler:
    """Upsampling with a local transformers chat model, as the reference's `upsample_prompt`.

    Messages: the system message; a user message with the image (several images capped at 768^2 px each and
    concatenated side by side into one); a user message with the prompt text.

    `vision` says whether images are given to the processor. By default they are when the model has a vision
    tower and the processor an image processor (a Mistral-3 model with its `PixtralProcessor`, which needs
    torchvision). Otherwise the model cannot see them: a text-only model, or a VLM whose processor fell back to
    its tokenizer. Then the images are left out and one user message says how many were given and that they
    cannot be seen, followed by the prompt; the system message is still the image-editing one.

    Differences from the reference, none of which changes the text: one prompt per call, so no padding to 2048
    tokens; `do_sample=False` is allowed for deterministic output; errors from the chat template (prompt plus
    image tokens longer than 2048) fall back like every other error instead of being raised.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: TextPreprocessor,
        *,
        max_new_tokens: int = UPSAMPLING_MAX_NEW_TOKENS,
        temperature: float = UPSAMPLING_TEMPERATURE,
        do_sample: bool = True,
        device: str | torch.device | None = None,
        vision: bool | None = None,
        max_length: int = UPSAMPLING_TEMPLATE_MAX_LENGTH,
    ) -> None:
        if not callable(getattr(processor, "apply_chat_template", None)):
            raise ValueError(f"processor must have apply_chat_template (a processor or tokenizer), got {processor!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if do_sample and not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
        self.model = model if device is None else model.to(device)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.do_sample = do_sample
        self.max_length = max_length
        self.vision = _model_has_vision(model) and _processor_has_vision(processor) if vision is None else vision
        if _model_has_vision(model) and not self.vision:
            log.info("the upsampling processor has no image processor; input images will not be shown to the model")

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: PathLike = MISTRAL_MODEL_ID,
        *,
        processor: PathLike | TextPreprocessor | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> LocalUpsampler:
        """Load a chat model (a VLM when its config has a vision part, else a causal LM) and its processor.

        The processor defaults to the model's own folder, or for Mistral-Small 3.2 to the 3.1 repo as in the
        reference; without torchvision it falls back to the tokenizer (the model then sees no images).
        `dtype` defaults to bf16, `device` to CUDA, then MPS, then CPU. Other keyword arguments go to __init__.
        """
        device = torch.device(device) if device is not None else default_device()
        config = AutoConfig.from_pretrained(path_or_id)
        model_cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
        model = model_cls.from_pretrained(path_or_id, dtype=dtype or DEFAULT_DTYPE, device_map=str(device))
        if processor is None:
            processor = MISTRAL_PROCESSOR_ID if str(path_or_id) == MISTRAL_MODEL_ID else path_or_id
        if isinstance(processor, str | os.PathLike):
            processor = load_processor(processor)
        return cls(model.eval().requires_grad_(False), processor, **kwargs)

    def messages(self, prompt: str, images: Sequence[Image.Image] = ()) -> list[dict[str, Any]]:
        """The conversation given to the chat template (see the class docstring)."""
        images = _check_request(prompt, images)
        prompt = _without_image_tags(prompt)
        system = upsampling_system_message(images)
        if self.vision:
            conversation = [{"role": "system", "content": [{"type": "text", "text": system}]}]
            if images:
                conversation.append({"role": "user", "content": [{"type": "image", "image": upsampling_image(images)}]})
            conversation.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
            return conversation
        # Plain strings: text-only chat templates (Qwen3's among them) expect string content.
        if images:
            prompt = (
                f"({len(images)} input image(s) came with this request, but you cannot see them; "
                f"work from the text alone.)\n\n{prompt}"
            )
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]

    def upsample(self, prompt: str, images: Sequence[Image.Image] = ()) -> UpsampleResult:
        _check_request(prompt, images)
        return _upsample_or_fall_back(
            prompt, "local upsampling model", lambda: self._generate(self.messages(prompt, images))
        )

    @torch.no_grad()
    def _generate(self, conversation: list[dict[str, Any]]) -> str:
        # Qwen3's template opens a reasoning block unless told not to; other templates ignore the variable.
        template_vars = {"enable_thinking": False} if isinstance(self.processor, PreTrainedTokenizerBase) else {}
        inputs = self.processor.apply_chat_template(
            conversation,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            truncation=True,
            max_length=self.max_length,
            **template_vars,
        )
        device, dtype = self.model.device, self.model.dtype
        inputs = {
            k: v.to(device, dtype) if k == "pixel_values" else v.to(device)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        sampling = {"do_sample": True, "temperature": self.temperature} if self.do_sample else {"do_sample": False}
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, use_cache=True, **sampling)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        text = self.processor.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return _THINK_BLOCK.sub("", text).strip()


def _jpeg_data_url(image: Image.Image, max_pixels: int) -> str:
    """JPEG (quality 90): a tenth of a PNG's size for photos, so several references stay a small request."""
    buffer = io.BytesIO()
    cap_pixels(image.convert("RGB"), max_pixels).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delay-seconds (fractions accepted) or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000" and asctime dates: HTTP dates are always UTC
                when = when.replace(tzinfo=datetime.UTC)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _http_error(response: httpx.Response) -> str:
    """ "HTTP 401: <the API's message>", with the message taken from an OpenAI-style error body if any."""
    detail = response.text
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            detail = str(body["error"].get("message", detail))
    except ValueError:
        pass
    return _short(f"HTTP {response.status_code}: {detail}" if detail.strip() else f"HTTP {response.status_code}")


def _completion_text(response: httpx.Response) -> str:
    """`choices[0].message.content`, stripped, from a chat-completions response; UpsamplingError if malformed."""
    try:
        body = response.json()
    except ValueError:
        raise UpsamplingError(f"the response is not JSON: {response.text[:100]!r}") from None
    if not isinstance(body, dict):
        raise UpsamplingError(f"the response is not a JSON object: {type(body).__name__}")
    if body.get("error") and not body.get("choices"):
        error = body["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise UpsamplingError(f"the API returned an error: {message}")
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UpsamplingError("the response has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise UpsamplingError(f"choices[0].message.content is {type(content).__name__}, not a string")
    return content.strip()


def _check_positive(name: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class OpenRouterUpsampler:
    """Upsampling through an OpenAI-style chat-completions API (OpenRouter by default), with bounded retries.

    One POST to `{base_url}/chat/completions` per prompt, as the reference's client: the system message, then
    the prompt as a plain string, or (with images) a list of `image_url` parts (PNG data URLs, each capped at
    `max_image_pixels`; the reference sent them full size) followed by one text part.

    429, 5xx, timeouts and connection errors are retried up to `max_retries` times, waiting `backoff * 2**k`
    seconds (k = 0, 1, ..., times a random factor in [0.5, 1]) or what a Retry-After header asks, never more
    than `max_backoff`. Other 4xx answers are not retried. The reference had no retries.

    `api_key` defaults to the OPENROUTER_API_KEY environment variable; without a key every call falls back to
    the original prompt and says why. `sampling_params` default to the reference's per-model defaults
    (temperature 0.15 for pixtral-large-2411) and go into the request body as given.
    """

    def __init__(
        self,
        model: str = OPENROUTER_DEFAULT_MODEL,
        *,
        base_url: str = OPENROUTER_BASE_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        sampling_params: Mapping[str, Any] | None = None,
        max_tokens: int = UPSAMPLING_MAX_NEW_TOKENS,
        max_image_pixels: int = OPENROUTER_MAX_IMAGE_PIXELS,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty model name, got {model!r}")
        _check_positive("timeout", timeout)
        _check_positive("max_retries", max_retries, integer=True, allow_zero=True)
        _check_positive("backoff", backoff, allow_zero=True)
        _check_positive("max_backoff", max_backoff, allow_zero=True)
        _check_positive("max_tokens", max_tokens, integer=True)
        _check_positive("max_image_pixels", max_image_pixels, integer=True)
        if sampling_params is None:
            sampling_params = DEFAULT_SAMPLING_PARAMS.get(model, {})
        if not isinstance(sampling_params, Mapping):
            raise ValueError(f"sampling_params must be a mapping, got {type(sampling_params).__name__}")
        if reserved := sorted(_RESERVED_REQUEST_FIELDS & set(sampling_params)):
            raise ValueError(f"sampling_params must not set {reserved}: the client sets them")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.sampling_params = dict(sampling_params)
        self.max_tokens = max_tokens
        self.max_image_pixels = max_image_pixels
        self._api_key = api_key if api_key is not None else os.environ.get(OPENROUTER_API_KEY_ENV)
        self._client = httpx.Client(timeout=self.timeout)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenRouterUpsampler(model={self.model!r}, url={self.url!r}, has_api_key={bool(self._api_key)})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenRouterUpsampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request_body(self, prompt: str, images: Sequence[Image.Image] = ()) -> dict[str, Any]:
        """The chat-completions JSON body for one prompt."""
        images = _check_request(prompt, images)
        if images:
            urls = [_jpeg_data_url(image, self.max_image_pixels) for image in images]
            parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
            content: str | list[dict[str, Any]] = [*parts, {"type": "text", "text": prompt}]
        else:
            content = prompt
        messages = [
            {"role": "system", "content": upsampling_system_message(images)},
            {"role": "user", "content": content},
        ]
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, **self.sampling_params}

    def upsample(self, prompt: str, images: Sequence[Image.Image] = ()) -> UpsampleResult:
        _check_request(prompt, images)
        return _upsample_or_fall_back(prompt, "OpenRouter", lambda: self._complete(prompt, images))

    def _complete(self, prompt: str, images: Sequence[Image.Image]) -> str:
        if not self._api_key:
            raise UpsamplingError(f"no API key: set {OPENROUTER_API_KEY_ENV} or pass api_key")
        body = self.request_body(prompt, images)
        headers = {"Authorization": f"Bearer {self._api_key}"}
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                response = self._client.post(self.url, json=body, headers=headers)
            except httpx.UnsupportedProtocol:
                raise
            except httpx.TimeoutException:
                reason = f"no answer within {self.timeout:g} s"
            except httpx.TransportError as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if response.status_code != 429 and response.status_code < 500:
                    if response.is_error:
                        raise UpsamplingError(_http_error(response))
                    return _completion_text(response)
                reason = _http_error(response)
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            if attempt + 1 < attempts:
                delay = self._delay(attempt, retry_after)
                log.info("upsampling request failed (%s); retrying in %.2f s", reason, delay)
                time.sleep(delay)
        raise UpsamplingError(f"{reason} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)


def _local_upsampler(model: PreTrainedModel | PathLike = MISTRAL_MODEL_ID, **kwargs: Any) -> LocalUpsampler:
    if isinstance(model, PreTrainedModel):
        return LocalUpsampler(model, **kwargs)
    return LocalUpsampler.from_pretrained(model, **kwargs)


def make_upsampler(mode: str, **options: Any) -> PromptUpsampler | None:
    """The upsampler for a mode: "none" -> None; "local" -> LocalUpsampler; "openrouter" -> OpenRouterUpsampler.

    For "local", `model` is a loaded model (then pass `processor` too) or a Hub id / folder to load (default:
    Mistral-Small 3.2, the reference's upsampling model); other options go to `LocalUpsampler`. For
    "openrouter", options go to `OpenRouterUpsampler` (`model` is the API's model name). "none" ignores them.
    """
    if mode == "none":
        return None
    if mode == "local":
        return _local_upsampler(**options)
    if mode == "openrouter":
        return OpenRouterUpsampler(**options)
    raise ValueError(f"upsampling mode must be one of {', '.join(map(repr, UPSAMPLING_MODES))}, got {mode!r}")
