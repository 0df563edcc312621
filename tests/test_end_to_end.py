"""A tiny-model generation with prompt upsampling (against a loopback chat API), safety and watermark: the saved
image carries its whole record and a verifiable mark; a flagged output is never returned with pixels."""

import pytest
import torch
from chat_api import Reply, completion, running_chat_server
from PIL import Image
from tiny_classifier import save_tiny_image_classifier

from flux2.pipeline import DEFAULT_WATERMARK, Flux2Pipeline
from flux2.provenance import read_exif_tags, read_provenance, save_with_provenance
from flux2.safety import ContentFlagged, NSFWClassifier, SafetyPolicy
from flux2.upsampling import OpenRouterUpsampler
from flux2.watermark import verify

UPSAMPLED = 'A white lighthouse on a cliff at dusk, warm light in its lamp room, a sign reading "FLUX.2"'


@pytest.fixture(scope="module")
def tiny():
    return Flux2Pipeline("tiny", device="cpu")


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    return save_tiny_image_classifier(tmp_path_factory.mktemp("nsfw"), {0: "normal", 1: "nsfw"})


def pipeline(tiny, **options) -> Flux2Pipeline:
    parts = dict(flow_model=tiny.flow_model, ae=tiny.ae, text_encoder=tiny.text_encoder)
    return Flux2Pipeline("tiny", device="cpu", **parts, **options)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_generation_with_upsampling_safety_and_watermark(tiny, classifier_folder, tmp_path, suffix):
    with running_chat_server() as chat:
        chat.replies = [Reply(body=completion(UPSAMPLED))]
        upsampler = OpenRouterUpsampler(base_url=chat.base_url, api_key="test-key", timeout=5.0, backoff=0.01)
        safety = SafetyPolicy("classifier", classifier=NSFWClassifier(classifier_folder, threshold=0.99))
        [out] = pipeline(tiny, upsampler=upsampler, safety=safety).generate("a lighthouse", seed=5)
        assert chat.received[0].body["messages"][-1]["content"] == "a lighthouse"

    path = save_with_provenance(out.image, tmp_path / f"lighthouse{suffix}", out.record.to_dict())
    stored = read_provenance(path)
    assert stored == {"software": out.record.software, "version": stored["version"], **out.record.to_dict()}
    assert stored["prompt"] == "a lighthouse" and stored["upsampled_prompt"] == UPSAMPLED
    assert stored["seed"] == 5 and stored["watermark"] == "lumaTile" and stored["safety"] == "classifier"
    assert read_exif_tags(path) == {"Software": "AI generated;flux2", "Make": "Black Forest Labs"}
    with Image.open(path) as saved:
        assert verify(saved.convert("RGB"), DEFAULT_WATERMARK).detected  # JPEG is saved at quality 95


def test_upsampled_prompt_is_what_the_model_sees(tiny):
    with running_chat_server() as chat:
        chat.replies = [Reply(body=completion(UPSAMPLED))]
        upsampler = OpenRouterUpsampler(base_url=chat.base_url, api_key="test-key", timeout=5.0, backoff=0.01)
        events = []
        [upsampled] = pipeline(tiny, upsampler=upsampler).generate("a lighthouse", seed=5, width=32, height=32,
                                                                   callback=events.append)  # fmt: skip
    [direct] = tiny.generate(UPSAMPLED, seed=5, width=32, height=32)
    assert upsampled.image.tobytes() == direct.image.tobytes()
    [done] = [e for e in events if e.stage == "upsample" and e.step == 1]  # says the prompt as soon as it is known
    assert done.upsampled_prompt == UPSAMPLED and done.detail == ""


def test_failed_upsampling_generates_with_the_original_prompt(tiny):
    with running_chat_server() as chat:
        chat.default = Reply(503, {"error": {"message": "overloaded"}})
        upsampler = OpenRouterUpsampler(
            base_url=chat.base_url, api_key="test-key", timeout=5.0, backoff=0.01, max_retries=1
        )
        events = []
        [out] = pipeline(tiny, upsampler=upsampler).generate("a lighthouse", seed=5, width=32, height=32,
                                                             callback=events.append)  # fmt: skip
    assert out.record.upsampled_prompt is None and "503" in out.record.upsampling_error
    [done] = [e for e in events if e.stage == "upsample" and e.step == 1]
    assert done.upsampled_prompt is None and done.detail == out.record.upsampling_error
    [direct] = tiny.generate("a lighthouse", seed=5, width=32, height=32)
    assert out.image.tobytes() == direct.image.tobytes()


def test_flagged_output_has_no_pixels_and_flagged_reference_stops_the_run(tiny, classifier_folder):
    always = SafetyPolicy("classifier", classifier=NSFWClassifier(classifier_folder, threshold=0.0))
    [out] = pipeline(tiny, safety=always).generate("a lighthouse", seed=5, width=32, height=32)
    assert out.image is None and out.flagged.check == "nsfw_classifier" and out.flagged.stage == "output"
    reference = Image.new("RGB", (64, 64), (90, 120, 200))
    with pytest.raises(ContentFlagged, match="reference"):
        pipeline(tiny, safety=always).edit("make it red", [reference], seed=5, width=32, height=32)


def test_watermark_can_be_turned_off(tiny):
    [out] = pipeline(tiny, watermark=None).generate("a lighthouse", seed=5)
    assert out.record.watermark is None and not verify(out.image, DEFAULT_WATERMARK).detected


def test_safety_by_mode_name_and_dev_reuses_its_encoder_for_the_llm_check(tiny):
    from dataclasses import replace

    from tiny_encoders import tiny_mistral3

    from flux2.registry import TINY_PARAMS
    from flux2.text_encoder import Mistral3SmallEmbedder
    from flux2.tiny import random_flow_model

    assert pipeline(tiny, safety="classifier").safety.mode == "classifier"  # nothing loads until first use
    model, processor = tiny_mistral3()
    processor.add_tokens(["yes", "no"])  # one token each, as in the real Mistral vocabulary
    model.resize_token_embeddings(len(processor))
    encoder = Mistral3SmallEmbedder(model, "cpu", processor=processor, dtype=torch.float32)
    dev = Flux2Pipeline(
        "flux.2-dev", device="cpu", dtype=torch.float32, ae=tiny.ae, text_encoder=encoder, safety="full",
        flow_model=random_flow_model(replace(TINY_PARAMS, use_guidance_embed=True)),
    )  # fmt: skip
    assert dev.safety.integrity.model is encoder.model


class BrokenUpsampler:
    def upsample(self, prompt, images=()):
        raise RuntimeError("a third-party upsampler bug")


def test_an_upsampler_that_raises_never_fails_the_generation(tiny):
    [out] = pipeline(tiny, upsampler=BrokenUpsampler()).generate("a lighthouse", seed=5, width=32, height=32)
    assert out.record.upsampled_prompt is None and "third-party upsampler bug" in out.record.upsampling_error


def test_full_safety_without_image_support_fails_before_any_denoising(tiny, classifier_folder):
    from tiny_encoders import tiny_mistral3

    from flux2.safety import IntegrityChecker

    model, tokenizer = tiny_mistral3()  # a tokenizer, not an image processor: the image check cannot run
    tokenizer.add_tokens(["yes", "no"])
    model.resize_token_embeddings(len(tokenizer))
    policy = SafetyPolicy(
        "full", classifier=NSFWClassifier(classifier_folder), integrity=IntegrityChecker(model.float(), tokenizer)
    )
    stages = []
    with pytest.raises(ValueError, match="needs a processor that handles images"):
        pipeline(tiny, safety=policy).generate("a lighthouse", width=32, height=32, callback=stages.append)
    assert stages == []  # nothing was generated (or upsampled, or encoded) first
