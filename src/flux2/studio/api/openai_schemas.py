"""The OpenAI images API's requests, answers and errors, as the `openai` client packages send and read them, mapped
onto this service's model: which `model` names run it, what `size` and `quality` become, and the error shape
`{"error": {"message", "type", "param", "code"}}` that makes those clients raise their own exceptions.

What is not honoured is refused with an error naming the parameter, never ignored silently; the only fields taken
and not used are `user` and `safety_identifier` (end-user ids OpenAI keeps for abuse monitoring).
"""

import re
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flux2.registry import FLUX2_MODEL_INFO, ModelInfo
from flux2.request import MAX_SEED, MAX_SIDE, PIXELS_PER_TOKEN, PROMPT_MAX_CHARS, request_params

MAX_IMAGES = 10  # `n`: OpenAI's own limit per request
# Clients default to OpenAI's model names; these run the served model (see `served_model`).
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")
# `quality` as a share of the model's default steps, on models whose steps may change. Every value from "standard"
# up is the default: a model's default steps are its best (more add time, not detail).
QUALITY_STEPS = {"low": 0.5, "medium": 0.75, "auto": 1.0, "standard": 1.0, "hd": 1.0, "high": 1.0, "xhigh": 1.0,
                 "max": 1.0}  # fmt: skip
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
SIZE_RULE = (f"'auto' or WIDTHxHEIGHT, each side a positive multiple of {PIXELS_PER_TOKEN} px, at most {MAX_SIDE} "
             "(for example 1024x1024, 1536x1024, 1024x1536)")  # fmt: skip
Quality = Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"]
ImageFormat = Literal["png", "jpeg", "webp"]


class OpenAIError(Exception):
    """An answer in the OpenAI error shape. `retry=False` tells the openai clients not to repeat the request (they
    retry every 5xx otherwise): a failed or cancelled job fails again the same way."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry: bool | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry = status, message, param, code, retry

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = {} if self.retry is None else {"x-should-retry": str(self.retry).lower()}
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str | None


class ErrorAnswer(BaseModel):
    """Every error of the /v1 routes (for the OpenAPI document)."""

    error: ErrorDetail


ERROR_ANSWERS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer, "description": what}
    for status, what in ((400, "A parameter is wrong: `param` names it"), (401, "Missing or wrong API token"),
                         (404, "The model is not the one this service runs"), (500, "A job failed or was cancelled"),
                         ("default", "Any other error (503: the service is stopping)"))
}  # fmt: skip


class ImageOptions(BaseModel):
    """What generations and edits share. Unknown parameters are refused (as OpenAI does), so a setting a client
    relies on is never dropped without a word."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    model: str | None = Field(None, description="the served model's name; OpenAI image model names run it too")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images to make, with seeds seed, seed + 1, ...")
    size: str | None = Field(None, description=f"{SIZE_RULE}; auto: the model's default (edits: the image's)")
    quality: Quality | None = Field(None, description="low and medium run fewer steps (models with free steps)")
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="default: url for dall-e-* model names, else b64_json (as OpenAI)"
    )
    output_format: ImageFormat | None = Field(None, description="b64_json: png (default), jpeg or webp; url: jpeg")
    background: Literal["auto", "opaque"] | None = Field(None, description="images are opaque: no transparency")
    stream: bool | None = None
    partial_images: int | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="flux2's own: the first image's seed")
    user: str | None = Field(None, max_length=256, description="accepted, not used")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted, not used")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        parse_size(value)
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("streaming is not supported: send stream false or leave it out")
        return value

    @field_validator("partial_images")
    @classmethod
    def _no_partials(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("partial images are not supported (they come with streaming): send 0 or leave it out")
        return value

    def answer_format(self) -> str:
        if self.response_format is not None:
            return self.response_format
        return "url" if (self.model or "").lower().startswith("dall-e-") else "b64_json"

    def image_format(self) -> str:
        """The format of the images answered: a URL serves the stored JPEG, b64_json is PNG unless asked."""
        if self.answer_format() == "url":
            if self.output_format not in (None, "jpeg"):
                raise OpenAIError(400, f"output_format {self.output_format!r} cannot go with response_format url, "
                                       "which serves the stored JPEG: use response_format b64_json for "
                                       f"{self.output_format}, or output_format jpeg", "output_format",
                                  "invalid_value")  # fmt: skip
            return "jpeg"
        return self.output_format or "png"


class ImageGenerationBody(ImageOptions):
    """POST /v1/images/generations (JSON)."""

    style: str | None = Field(None, description="not supported: describe the look in the prompt")

    @field_validator("style")
    @classmethod
    def _no_style(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(f"style {value!r} is not supported: FLUX models have no style switch; describe the "
                             "look in the prompt (vivid colours, natural light...) and leave style out")  # fmt: skip
        return value


class ImageEditFields(ImageOptions):
    """The text fields of POST /v1/images/edits (multipart); the files are `image` (or `image[]`, several) and
    an optional `mask`."""


class ImageDatum(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None  # the upsampled prompt, when the service's prompt upsampler changed it


class ImagesAnswer(BaseModel):
    created: int  # Unix seconds
    data: list[ImageDatum]
    output_format: ImageFormat
    size: str  # WIDTHxHEIGHT of the images
    quality: Quality | None = None


def edit_form_schema() -> dict[str, Any]:
    """The OpenAPI request body of the edits route, which reads its multipart form itself."""
    fields = ImageEditFields.model_json_schema()
    picture = {"type": "string", "format": "binary"}
    files = {"image": picture, "image[]": {"type": "array", "items": picture}, "mask": picture}
    schema = {**fields, "properties": {**files, **fields["properties"]}, "required": ["image", "prompt"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def parse_size(value: str | None) -> tuple[int, int] | None:
    """(width, height), or None for "auto" (and no size); ValueError saying what is allowed."""
    if value is None or value == "auto":
        return None
    match = SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"size must be {SIZE_RULE}, got {value!r}")
    width, height = int(match[1]), int(match[2])
    try:
        for name, side in (("width", width), ("height", height)):
            request_params()["width"].check(name, side)
    except ValueError as err:
        raise ValueError(f"size must be {SIZE_RULE}, got {value!r}: its {err}") from None
    return width, height


def served_model(name: str | None, info: ModelInfo) -> None:
    """The served model's name, an OpenAI image model name (which runs it) or nothing; anything else is a 404, as
    OpenAI answers an unknown model."""
    if name is None or name.lower() == info.name or name.lower().startswith(OPENAI_MODEL_PREFIXES):
        return
    if name.lower() in FLUX2_MODEL_INFO:
        message = (f"model {name!r} is not loaded: this service runs {info.name} (start it with --model {name} "
                   f"to use that one), or send model {info.name}")  # fmt: skip
    else:
        message = f"model {name!r} does not exist here: send {info.name} (OpenAI image model names run it too)"
    raise OpenAIError(404, message, "model", "model_not_found")


def quality_steps(quality: str | None, info: ModelInfo) -> int | None:
    """The denoising steps `quality` asks for; None: the model's default."""
    share = QUALITY_STEPS[quality or "auto"]
    if share == 1.0:
        return None
    if "num_steps" in info.fixed_params:
        full = ", ".join(q for q, s in QUALITY_STEPS.items() if s == 1.0)
        raise OpenAIError(400, f"quality {quality!r}: {info.name} is distilled and always runs its "
                               f"{info.num_steps} steps; send one of {full} (all the same here) or leave it out",
                          "quality", "invalid_value")  # fmt: skip
    return max(1, round(info.num_steps * share))


def from_validation(errors: list[dict[str, Any]], fields: type[BaseModel]) -> OpenAIError:
    """Pydantic's first complaint (about a body or form field) in the OpenAI shape, naming the parameter."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if error.get("type") == "extra_forbidden":
        takes = ", ".join(fields.model_fields)
        return OpenAIError(400, f"unknown parameter {param!r}: this service takes {takes}", param,
                           "unknown_parameter")  # fmt: skip
    if error.get("type") == "missing":
        return OpenAIError(400, f"missing required parameter {param!r}", param, "missing_required_parameter")
    if error.get("type") == "json_invalid":
        return OpenAIError(400, "the body is not valid JSON", None, "invalid_json")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    given = error.get("input")
    shown = "" if param and message.startswith(param) else f"{param}: " if param else ""
    suffix = "" if given is None or isinstance(given, dict) or repr(given) in message else f", got {_short(given)}"
    return OpenAIError(400, f"{shown}{message}{suffix}", param, "invalid_value")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def validated(fields: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return fields.model_validate(data)
    except ValidationError as err:
        raise from_validation(err.errors(include_url=False), fields) from None
