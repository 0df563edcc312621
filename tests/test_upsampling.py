"""Prompt upsampling: tiny local chat models, and a real chat-completions HTTP server on loopback."""

from __future__ import annotations

import base64
import io
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from chat_api import ChatServer, Reply, completion, running_chat_server
from PIL import Image
from tiny_encoders import save_tiny_mistral3, save_tiny_qwen3, tiny_mistral3
from transformers import Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from flux2.images import cap_pixels
from flux2.system_messages import SYSTEM_MESSAGE_UPSAMPLING_I2I, SYSTEM_MESSAGE_UPSAMPLING_T2I
from flux2.tiny_text_encoders import tiny_qwen3
from flux2.upsampling import (
    UPSAMPLING_MAX_IMAGE_SIZE,
    LocalUpsampler,
    OpenRouterUpsampler,
    PromptUpsampler,
    UpsampleResult,
    make_upsampler,
)

PROMPT = "a cat on a red sofa"


def solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


# ----------------------------------------------------------------------------- local model


class RecordingProcessor:
    """The real tiny tokenizer, recording every conversation given to its chat template."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.conversations: list[list[dict]] = []

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> Any:
        self.conversations.append(conversation)
        return self.inner.apply_chat_template(conversation, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def mistral() -> tuple[Mistral3ForConditionalGeneration, Any]:
    return tiny_mistral3()


@pytest.fixture(scope="module")
def qwen() -> tuple[Qwen3ForCausalLM, Any]:
    return tiny_qwen3()


def rendered(processor: RecordingProcessor) -> str:
    (conversation,) = processor.conversations
    return processor.inner.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_local_text_to_image_uses_the_t2i_message_and_returns_new_text(mistral):
    model, tokenizer = mistral
    processor = RecordingProcessor(tokenizer)
    result = LocalUpsampler(model, processor, do_sample=False, max_new_tokens=8).upsample(PROMPT)

    assert rendered(processor) == (
        f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE_UPSAMPLING_T2I}[/SYSTEM_PROMPT][INST]{PROMPT}[/INST]"
    )
    assert result.used and result.error is None
    assert result.prompt == result.upsampled and result.upsampled  # random weights: gibberish, but new text
    assert result.upsampled != PROMPT


def test_local_vision_model_sees_images_capped_and_side_by_side(mistral):
    model, tokenizer = mistral
    processor = RecordingProcessor(tokenizer)
    # The tiny processor is the tokenizer (PixtralProcessor needs torchvision), so ask for vision explicitly:
    # the template renders one [IMG]; the model then runs without pixel values.
    upsampler = LocalUpsampler(model, processor, vision=True, max_new_tokens=8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [solid((1200, 900), colours[0]), solid((500, 1400), colours[1]), solid((64, 48), colours[2])]
    torch.manual_seed(0)
    result = upsampler.upsample(PROMPT, images)  # do_sample=True, temperature 0.15: the reference's settings

    system, image_turn, text_turn = processor.conversations[0]
    assert system == {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE_UPSAMPLING_I2I}]}
    assert text_turn == {"role": "user", "content": [{"type": "text", "text": PROMPT}]}
    ((part,),) = [image_turn["content"]]
    assert image_turn["role"] == "user" and part["type"] == "image"
    shown = part["image"]
    # Side by side first (1764 x 1400), then the whole capped at 768² px: several images cost no more than one.
    joined_w, joined_h = sum(im.width for im in images), max(im.height for im in images)
    assert shown.size == cap_pixels(Image.new("RGB", (joined_w, joined_h)), UPSAMPLING_MAX_IMAGE_SIZE).size
    assert shown.width * shown.height <= UPSAMPLING_MAX_IMAGE_SIZE
    scale, x = shown.width / joined_w, 0
    for image, colour in zip(images, colours, strict=True):  # left to right, in the given order
        assert shown.getpixel((int((x + image.width / 2) * scale), shown.height // 2)) == colour
        x += image.width
    assert rendered(processor).count("[IMG]") == 1
    assert result.used and result.upsampled


def test_local_vlm_with_a_plain_tokenizer_says_images_are_not_visible(mistral):
    model, tokenizer = mistral
    upsampler = LocalUpsampler(model, tokenizer, do_sample=False, max_new_tokens=4)
    assert not upsampler.vision  # no image processor: the images cannot reach the model
    system, user = upsampler.messages(PROMPT, [solid((32, 32), (0, 0, 0)), solid((32, 32), (9, 9, 9))])
    assert system == {"role": "system", "content": SYSTEM_MESSAGE_UPSAMPLING_I2I}
    assert user["role"] == "user" and "2 input image(s)" in user["content"] and "cannot see" in user["content"]
    assert user["content"].endswith(PROMPT)


def test_local_text_only_model(qwen):
    model, tokenizer = qwen
    upsampler = LocalUpsampler(model, tokenizer, do_sample=False, max_new_tokens=8)
    result = upsampler.upsample(PROMPT, [solid((100, 100), (1, 2, 3))])
    assert result.used and result.upsampled
    text = tokenizer.apply_chat_template(
        upsampler.messages(PROMPT, [solid((100, 100), (1, 2, 3))]),
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_MESSAGE_UPSAMPLING_I2I}<|im_end|>\n<|im_start|>user\n(1 input")
    assert text.endswith(f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_local_failure_falls_back_to_the_original_prompt(mistral, caplog):
    _, tokenizer = mistral
    # A real model too small for the tokenizer: its embedding lookup fails inside generate.
    config = Qwen3Config(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    upsampler = LocalUpsampler(Qwen3ForCausalLM(config).eval(), tokenizer, do_sample=False, max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="flux2.upsampling"):
        result = upsampler.upsample(PROMPT)
    assert result == UpsampleResult(prompt=PROMPT, upsampled=None, error=result.error)
    assert not result.used and result.error.startswith("local upsampling model: IndexError")
    assert "original prompt" in caplog.text and "IndexError" in caplog.text


def test_local_empty_output_falls_back():
    model, tokenizer = tiny_qwen3()
    eos = model.generation_config.eos_token_id
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i != eos]
    result = LocalUpsampler(model, tokenizer, do_sample=False, max_new_tokens=4).upsample(PROMPT)
    assert result.prompt == PROMPT and result.upsampled is None
    assert "empty" in result.error


def test_local_from_pretrained_folders(tmp_path):
    qwen = LocalUpsampler.from_pretrained(
        save_tiny_qwen3(tmp_path / "qwen"), device="cpu", dtype=torch.float32, do_sample=False, max_new_tokens=4
    )
    assert isinstance(qwen.model, Qwen3ForCausalLM) and qwen.upsample(PROMPT).used
    mistral = LocalUpsampler.from_pretrained(save_tiny_mistral3(tmp_path / "mistral"), device="cpu")
    assert isinstance(mistral.model, Mistral3ForConditionalGeneration)
    assert mistral.model.dtype == torch.bfloat16 and not mistral.vision  # tokenizer-only processor


def test_bad_arguments_raise():
    model, tokenizer = tiny_qwen3()
    upsampler = LocalUpsampler(model, tokenizer)
    with pytest.raises(ValueError, match="prompt must be a str"):
        upsampler.upsample(["a cat"])
    with pytest.raises(ValueError, match=r"wrap it as \[image\]"):
        upsampler.upsample(PROMPT, solid((8, 8), (0, 0, 0)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        LocalUpsampler(model, tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        LocalUpsampler(model, tokenizer, temperature=0.0)


# ----------------------------------------------------------------------------- OpenRouter-compatible server


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with running_chat_server() as chat:
        yield chat


def client(server: ChatServer, **kwargs: Any) -> OpenRouterUpsampler:
    options = {"base_url": server.base_url, "api_key": "test-key", "timeout": 2.0, "backoff": 0.01}
    return OpenRouterUpsampler(**{**options, **kwargs})


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_openrouter_text_request(server):
    server.replies = [Reply(body=completion("  A tabby cat curled up on a crimson velvet sofa.\n"))]
    with client(server) as upsampler:
        result = upsampler.upsample(PROMPT)
    assert result == UpsampleResult.success("A tabby cat curled up on a crimson velvet sofa.")
    (request,) = server.received
    assert request.path == "/api/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.body == {
        "model": "mistralai/pixtral-large-2411",
        "messages": [
            {"role": "system", "content": SYSTEM_MESSAGE_UPSAMPLING_T2I},
            {"role": "user", "content": PROMPT},
        ],
        "max_tokens": 512,
        "temperature": 0.15,
    }


def test_openrouter_image_request(server, monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "env-key")
    server.replies = [Reply(body=completion("Make the sofa blue."))]
    images = [solid((300, 200), (255, 0, 0)), solid((50, 40), (0, 0, 255))]
    with client(server, api_key=None, model="some/other-model", max_image_pixels=100 * 100) as upsampler:
        result = upsampler.upsample(PROMPT, images)
    assert result.prompt == "Make the sofa blue." and result.used
    (request,) = server.received
    assert request.headers["authorization"] == "Bearer env-key"
    assert request.body["model"] == "some/other-model" and "temperature" not in request.body  # no preset for it
    system, user = request.body["messages"]
    assert system == {"role": "system", "content": SYSTEM_MESSAGE_UPSAMPLING_I2I}
    *image_parts, text_part = user["content"]
    assert text_part == {"type": "text", "text": PROMPT}
    sent = [decode_data_url(part["image_url"]["url"]) for part in image_parts]
    assert [im.size for im in sent] == [(122, 81), (50, 40)]  # the first capped to 100^2 px, one part per image
    assert all(abs(a - b) <= 3 for a, b in zip(sent[0].getpixel((60, 40)), (255, 0, 0), strict=True))  # JPEG 90


def test_openrouter_429_then_success_honours_retry_after(server):
    limited = {"error": {"message": "Rate limit exceeded", "code": 429}}
    server.replies = [Reply(429, limited, {"Retry-After": "0.3"}), Reply(body=completion("ok"))]
    with client(server) as upsampler:
        result = upsampler.upsample(PROMPT)
    assert result.prompt == "ok"
    first, second = server.received
    assert 0.3 <= second.at - first.at < 1.5  # backoff alone would wait 0.01 s


def test_openrouter_retry_after_is_capped(server):
    server.replies = [Reply(503, b"", {"Retry-After": "3600"}), Reply(body=completion("ok"))]
    start = time.monotonic()
    with client(server, max_backoff=0.05) as upsampler:
        assert upsampler.upsample(PROMPT).prompt == "ok"
    assert time.monotonic() - start < 1.0 and len(server.received) == 2


def test_openrouter_timeouts_are_retried_then_fall_back(server, caplog):
    server.replies = [Reply(body=completion("too late"), delay=0.5)] * 2
    start = time.monotonic()
    with client(server, timeout=0.2, max_retries=1) as upsampler, caplog.at_level(logging.WARNING):
        result = upsampler.upsample(PROMPT)
    assert time.monotonic() - start < 1.2
    assert result.prompt == PROMPT and not result.used
    assert result.error == "OpenRouter: no answer within 0.2 s (gave up after 2 attempts)"
    assert len(server.received) == 2 and "original prompt" in caplog.text


def test_openrouter_500_storm_falls_back_after_max_retries(server):
    server.default = Reply(500, {"error": {"message": "Internal Server Error"}})
    with client(server, max_retries=3) as upsampler:
        result = upsampler.upsample(PROMPT)
    assert len(server.received) == 4
    assert result.prompt == PROMPT
    assert result.error == "OpenRouter: HTTP 500: Internal Server Error (gave up after 4 attempts)"


def test_openrouter_client_errors_are_not_retried(server):
    server.default = Reply(401, {"error": {"message": "No auth credentials found", "code": 401}})
    with client(server) as upsampler:
        result = upsampler.upsample(PROMPT)
    assert len(server.received) == 1
    assert result.prompt == PROMPT and result.error == "OpenRouter: HTTP 401: No auth credentials found"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>Bad gateway</html>", "not JSON"),
        ({"choices": []}, "no choices[0].message.content"),
        (completion(""), "empty prompt"),
        (completion(None), "NoneType, not a string"),
        ({"error": {"message": "upstream provider failed", "code": 502}}, "upstream provider failed"),
    ],
)
def test_openrouter_malformed_bodies_fall_back(server, body, reason):
    server.replies = [Reply(body=body)]
    with client(server) as upsampler:
        result = upsampler.upsample(PROMPT)
    assert result.prompt == PROMPT and result.upsampled is None and reason in result.error
    assert len(server.received) == 1


def test_openrouter_missing_key_falls_back_without_a_request(server, monkeypatch, caplog):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    with client(server, api_key=None) as upsampler, caplog.at_level(logging.WARNING):
        result = upsampler.upsample(PROMPT, [solid((16, 16), (0, 0, 0))])
    assert result.prompt == PROMPT and "OPENROUTER_API_KEY" in result.error
    assert server.received == [] and "OPENROUTER_API_KEY" in caplog.text


def test_openrouter_connection_refused_falls_back():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OpenRouterUpsampler(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=1, backoff=0.01) as up:
        result = up.upsample(PROMPT)
    assert result.prompt == PROMPT and "ConnectError" in result.error and "2 attempts" in result.error


def test_openrouter_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_retries"):
        OpenRouterUpsampler(api_key="k", max_retries=-1)
    with pytest.raises(ValueError, match="sampling_params must not set"):
        OpenRouterUpsampler(api_key="k", sampling_params={"model": "x", "top_p": 0.9})


# ----------------------------------------------------------------------------- modes


def test_make_upsampler(qwen):
    assert make_upsampler("none") is None
    with make_upsampler("openrouter", api_key="k", timeout=1.0) as remote:
        assert isinstance(remote, OpenRouterUpsampler) and isinstance(remote, PromptUpsampler)
    model, tokenizer = qwen
    local = make_upsampler("local", model=model, processor=tokenizer)
    assert isinstance(local, LocalUpsampler) and isinstance(local, PromptUpsampler)
    with pytest.raises(ValueError, match="'none', 'local', 'openrouter', got 'remote'"):
        make_upsampler("remote")


def test_the_key_never_shows_in_repr(server):
    with client(server, api_key="sk-secret-123") as upsampler:
        assert "sk-secret-123" not in repr(upsampler)


def test_retry_after_as_an_http_date_is_utc(monkeypatch):
    import email.utils
    import time

    from flux2.upsampling import _retry_after_seconds

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        in_ten = email.utils.formatdate(time.time() + 10, usegmt=False).replace("+0000", "-0000")
        assert 8 <= _retry_after_seconds(in_ten) <= 11
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
