"""Safety checks on tiny random-weight models: NSFW classifier thresholds, the restricted yes/no LLM answer, policy
modes (the integrity model is never built outside "full"), and the reference-named checks on an embedder."""

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from forced_answers import forced_logits, with_yes_no_tokens
from PIL import Image
from tiny_classifier import save_tiny_image_classifier
from tiny_encoders import tiny_mistral3
from transformers import (
    Mistral3ForConditionalGeneration,
    PixtralImageProcessorPil,
    ProcessorMixin,
    Qwen3ForCausalLM,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from flux2.safety import (
    ANSWER_NO,
    ANSWER_YES,
    INTEGRITY_IMAGE_PIXELS,
    ContentFlagged,
    IntegrityChecker,
    NSFWClassifier,
    RestrictToTokens,
    SafetyPolicy,
    SafetyVerdict,
    resize_to_pixels,
    test_image,
    test_txt,
)
from flux2.system_messages import PROMPT_TEXT_INTEGRITY, SYSTEM_PROMPT_CONTENT_FILTER
from flux2.text_encoder import Mistral3SmallEmbedder
from flux2.tiny_text_encoders import tiny_qwen3

MERGED_PATCH = 32  # Mistral-3 merges 2x2 Pixtral patches of 16 px: one image token per 32x32 px


class TinyPixtralProcessor(ProcessorMixin):
    """PixtralProcessor's image-token expansion (rows of [IMG], [IMG_BREAK] between rows, [IMG_END] last) without
    its torchvision requirement, around transformers' PIL Pixtral image processor. Records the image sizes it gets."""

    def __init__(self, image_processor, tokenizer, chat_template=None):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = "[IMG]"
        self.seen_sizes: list[tuple[int, int]] = []

    def _process_images(self, images, **kwargs):
        self.seen_sizes += [im.size for batch in images for im in batch]
        return super()._process_images(images, **{**kwargs, "patch_size": MERGED_PATCH})

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        height, width = image_inputs["image_sizes"][image_idx].tolist()
        row = "[IMG]" * (width // MERGED_PATCH) + "[IMG_BREAK]"
        return (row * (height // MERGED_PATCH)).removesuffix("[IMG_BREAK]") + "[IMG_END]"


@contextmanager
def counted_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def image(w: int = 96, h: int = 64) -> Image.Image:
    return Image.new("RGB", (w, h), (200, 30, 60))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nsfw_folder(tmp_path_factory):
    return save_tiny_image_classifier(tmp_path_factory.mktemp("nsfw"), {0: "normal", 1: "nsfw"})


@pytest.fixture(scope="module")
def mistral():
    model, tokenizer = with_yes_no_tokens(*tiny_mistral3(seed=0))
    processor = TinyPixtralProcessor(
        PixtralImageProcessorPil(patch_size=16, size={"longest_edge": 64}), tokenizer, tokenizer.chat_template
    )
    return model, tokenizer, processor


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory, mistral):
    model, tokenizer, _ = mistral
    folder = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # AutoProcessor loads it back as this tokenizer
    return folder


@pytest.fixture(scope="module")
def checker(mistral):
    model, _, processor = mistral
    return IntegrityChecker(model, processor)


def token_ids(tokenizer) -> tuple[int, int, int]:
    yes, no, other = tokenizer.convert_tokens_to_ids([ANSWER_YES, ANSWER_NO, "z"])
    return yes, no, other


# ----------------------------------------------------------------------------- NSFW classifier


def test_classifier_score_is_the_nsfw_probability(nsfw_folder):
    classifier = NSFWClassifier(nsfw_folder)
    model = ViTForImageClassification.from_pretrained(nsfw_folder).eval()
    pixels = ViTImageProcessorPil.from_pretrained(nsfw_folder)(image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1)[0, 1].item()
    assert classifier.score(image()) == pytest.approx(expected, abs=1e-6)


def test_classifier_threshold_is_strict(nsfw_folder):
    score = NSFWClassifier(nsfw_folder).score(image())
    assert 0.0 < score < 1.0
    below = NSFWClassifier(nsfw_folder, threshold=score - 1e-4).check(image(), "output")
    above = NSFWClassifier(nsfw_folder, threshold=score + 1e-4).check(image(), "output")
    equal = NSFWClassifier(nsfw_folder, threshold=score).check(image(), "reference")
    assert below.flagged and not above.flagged and not equal.flagged  # flagged iff score > threshold
    assert (below.check, below.stage, equal.stage) == ("nsfw_classifier", "output", "reference")
    assert "> threshold" in below.detail and "<= threshold" in equal.detail


def test_classifier_loads_lazily_and_needs_an_nsfw_label(tmp_path):
    NSFWClassifier(tmp_path / "not-there")  # nothing is read until the first check
    classifier = NSFWClassifier(save_tiny_image_classifier(tmp_path / "pets", {0: "cat", 1: "dog"}))
    with pytest.raises(ValueError, match=r"labels are \['cat', 'dog'\], with no 'nsfw' label"):
        classifier.score(image())
    with pytest.raises(ValueError, match="threshold must be a probability"):
        NSFWClassifier(threshold=1.5)


def test_classifier_accepts_paths_and_tensors(nsfw_folder, tmp_path):
    classifier = NSFWClassifier(nsfw_folder)
    path = tmp_path / "img.png"
    image().save(path)
    pixels = torch.tensor([200, 30, 60]).view(1, 3, 1, 1).expand(1, 3, 64, 96) / 127.5 - 1.0
    assert classifier.score(path) == classifier.score(image()) == pytest.approx(classifier.score(pixels), abs=1e-3)
    with pytest.raises(ValueError, match="image not found"):
        classifier.score(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- integrity LLM


def test_yes_and_no_must_be_single_tokens():
    model, tokenizer = tiny_mistral3(seed=1)
    assert len(tokenizer.encode("yes", add_special_tokens=False)) == 3  # byte-level tiny vocabulary
    with pytest.raises(ValueError, match="needs 'yes' to be one token"):
        IntegrityChecker(model, tokenizer)


def test_restrict_to_tokens_sets_others_to_global_min_minus_one():
    scores = torch.tensor([[3.0, -2.0, 5.0, 1.0], [0.0, 4.0, -7.0, 2.0]])
    expected = torch.tensor([[-8.0, -2.0, -8.0, 1.0], [-8.0, 4.0, -8.0, 2.0]])
    assert torch.equal(RestrictToTokens([1, 3])(torch.zeros(2, 1, dtype=torch.long), scores), expected)


def test_answer_is_restricted_to_yes_or_no(mistral, checker):
    model, tokenizer, processor = mistral
    yes, no, other = token_ids(tokenizer)
    conversation = checker.text_conversation("a cat in a hat")
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    for answer, boosts in ((ANSWER_YES, {other: 100.0, yes: 50.0}), (ANSWER_NO, {other: 100.0, no: 50.0})):
        with forced_logits(model, boosts):
            unrestricted = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
            assert unrestricted == other
            assert checker.answer(conversation) == answer
            assert checker.check_text("a cat in a hat").flagged == (answer == ANSWER_YES)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_unforced_answer_follows_the_yes_no_logits(mistral, checker, kind):
    """Oracle: with random weights, flagged iff logit(yes) > logit(no) at the last position of a plain forward."""
    model, tokenizer, processor = mistral
    yes, no, _ = token_ids(tokenizer)
    if kind == "text":
        conversation, verdict = checker.text_conversation("x"), checker.check_text("x")
    else:
        conversation = checker.image_conversation(resize_to_pixels(image()))
        verdict = checker.check_image(image())
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    assert logits[yes] != logits[no]
    assert verdict.flagged == bool(logits[yes] > logits[no])
    assert (verdict.check, verdict.stage) == ("integrity_llm", "prompt" if kind == "text" else "output")


def test_text_conversation_wraps_the_prompt(checker):
    text = checker.processor.apply_chat_template(
        checker.text_conversation("Mickey [IMG]{x}"), add_generation_prompt=True, tokenize=False
    )
    assert SYSTEM_PROMPT_CONTENT_FILTER in text
    assert PROMPT_TEXT_INTEGRITY.format(prompt="Mickey {x}") in text  # [IMG] removed, braces kept


def test_check_image_sees_the_pixels_resized_to_512_squared(mistral, checker, tmp_path):
    model, tokenizer, processor = mistral
    yes, no, _ = token_ids(tokenizer)
    path = tmp_path / "ref.png"
    image(300, 200).save(path)
    processor.seen_sizes.clear()
    with counted_calls(model.model.vision_tower) as vision_calls:
        with forced_logits(model, {yes: 50.0}):
            assert checker.check_image(path, "reference") == SafetyVerdict(
                True, "integrity_llm", "reference", "the model answered 'yes'"
            )
        with forced_logits(model, {no: 50.0}):
            assert not checker.check_image(torch.zeros(1, 3, 200, 300)).flagged
    f = (INTEGRITY_IMAGE_PIXELS / (300 * 200)) ** 0.5
    assert processor.seen_sizes == [(int(f * 300), int(f * 200))] * 2 == [(627, 418)] * 2
    assert len(vision_calls) == 2  # the image reached the vision tower


def test_check_image_needs_an_image_processor(mistral):
    model, tokenizer, _ = mistral
    with pytest.raises(ValueError, match="needs a processor that handles images"):
        IntegrityChecker(model, tokenizer).check_image(image())


def test_from_pretrained_loads_vlm_and_causal_lm(tmp_path, mistral, mistral_folder):
    model, tokenizer, _ = mistral
    qwen, qwen_tokenizer = with_yes_no_tokens(*tiny_qwen3(seed=0))
    qwen.save_pretrained(tmp_path / "qwen")
    qwen_tokenizer.save_pretrained(tmp_path / "qwen")

    loaded = IntegrityChecker.from_pretrained(mistral_folder, dtype=torch.float32)
    assert isinstance(loaded.model, Mistral3ForConditionalGeneration)
    assert loaded.check_text("a dog").flagged == IntegrityChecker(model, tokenizer).check_text("a dog").flagged
    text_only = IntegrityChecker.from_pretrained(tmp_path / "qwen", dtype=torch.float32)
    assert isinstance(text_only.model, Qwen3ForCausalLM)
    yes = qwen_tokenizer.convert_tokens_to_ids(ANSWER_YES)
    with forced_logits(text_only.model, {yes: 50.0}):
        assert text_only.check_text("a dog").flagged


# ----------------------------------------------------------------------------- policy


class Factory:
    """An integrity factory that records its calls."""

    def __init__(self, checker: IntegrityChecker | None = None):
        self.checker = checker
        self.calls = 0

    def __call__(self) -> IntegrityChecker:
        self.calls += 1
        if self.checker is None:
            raise AssertionError("the integrity model must not be loaded")
        return self.checker


def test_policy_validates_mode():
    with pytest.raises(ValueError, match=r"one of \['off', 'classifier', 'full'\], got 'strict'"):
        SafetyPolicy("strict")
    with pytest.raises(ValueError, match="'full' needs the integrity model"):
        SafetyPolicy("full")


def test_policy_off_checks_nothing(tmp_path):
    factory = Factory()
    policy = SafetyPolicy("off", classifier=NSFWClassifier(tmp_path / "not-there"), integrity=factory)
    assert policy.check_prompt("x") is None
    assert policy.check_reference(image()) is None and policy.check_output(image()) is None
    assert factory.calls == 0


def test_policy_classifier_never_loads_the_integrity_model(nsfw_folder):
    factory = Factory()
    flags_all = SafetyPolicy("classifier", classifier=NSFWClassifier(nsfw_folder, threshold=0.0), integrity=factory)
    passes_all = SafetyPolicy("classifier", classifier=NSFWClassifier(nsfw_folder, threshold=1.0), integrity=factory)
    assert flags_all.check_prompt("x") is None
    verdict = flags_all.check_output(image())
    assert (verdict.flagged, verdict.check, verdict.stage) == (True, "nsfw_classifier", "output")
    assert flags_all.check_reference(image()).stage == "reference"
    assert passes_all.check_output(image()) is None and passes_all.check_reference(image()) is None
    assert factory.calls == 0


def test_policy_full_builds_the_checker_once(nsfw_folder, mistral, checker):
    model, tokenizer, _ = mistral
    yes, no, _ = token_ids(tokenizer)
    factory = Factory(checker)
    policy = SafetyPolicy("full", classifier=NSFWClassifier(nsfw_folder, threshold=1.0), integrity=factory)
    assert factory.calls == 0  # nothing is loaded until a check needs it
    with forced_logits(model, {no: 50.0}):
        assert policy.check_prompt("x") is None
        assert policy.check_output(image()) is None
    with forced_logits(model, {yes: 50.0}):
        assert policy.check_prompt("x") == SafetyVerdict(True, "integrity_llm", "prompt", "the model answered 'yes'")
        assert policy.check_reference(image()).stage == "reference"
        assert policy.check_output(image()).check == "integrity_llm"
    assert factory.calls == 1


def test_policy_full_skips_the_llm_when_the_classifier_flags(nsfw_folder, mistral, checker):
    model, _, _ = mistral
    policy = SafetyPolicy("full", classifier=NSFWClassifier(nsfw_folder, threshold=0.0), integrity=checker)
    with counted_calls(model) as llm_calls:
        assert policy.check_output(image()).check == "nsfw_classifier"
    assert llm_calls == []


def test_policy_from_settings(nsfw_folder, mistral_folder, tmp_path):
    policy = SafetyPolicy.from_settings(
        "classifier", classifier_model=nsfw_folder, threshold=0.0, integrity_model=tmp_path / "not-there"
    )
    assert policy.check_output(image()).check == "nsfw_classifier"  # the integrity model is never read
    full = SafetyPolicy.from_settings(
        "full", classifier_model=nsfw_folder, threshold=1.0, integrity_model=mistral_folder, dtype=torch.float32
    )
    verdict = full.check_prompt("a dog")
    assert isinstance(full.integrity.model, Mistral3ForConditionalGeneration)
    assert verdict is None or verdict.check == "integrity_llm"
    with pytest.raises(ValueError, match="must be one of"):
        SafetyPolicy.from_settings("on")


def test_content_flagged_names_check_and_stage():
    verdict = SafetyVerdict(True, "nsfw_classifier", "output", "nsfw score 0.9100 > threshold 0.85")
    err = ContentFlagged(verdict)
    assert isinstance(err, ValueError) and err.verdict is verdict
    assert str(err) == (
        "output image flagged by the NSFW classifier (check='nsfw_classifier', stage='output'): "
        "nsfw score 0.9100 > threshold 0.85"
    )
    assert "reference image flagged by the integrity check (LLM)" in str(
        ContentFlagged(SafetyVerdict(True, "integrity_llm", "reference", "the model answered 'yes'"))
    )
    with pytest.raises(ValueError, match="stage must be one of"):
        SafetyVerdict(True, "integrity_llm", "input", "")


# ----------------------------------------------------------------------------- reference-named checks


def test_reference_named_checks_run_the_embedders_model(mistral):
    model, tokenizer, processor = mistral
    yes, no, _ = token_ids(tokenizer)
    embedder = Mistral3SmallEmbedder(model, processor=processor)
    for token, flagged in ((yes, True), (no, False)):
        with forced_logits(model, {token: 50.0}):
            assert test_txt(embedder, "a cat") is flagged
            assert test_image(embedder, image()) is flagged
    with pytest.raises(ValueError, match="needs a processor that handles images"):
        test_image(Mistral3SmallEmbedder(model, processor=tokenizer), image())


def test_text_encoder_does_not_import_safety():
    """The dependency runs one way: the encoder only embeds (a fresh interpreter, so nothing is imported yet)."""
    code = "import sys, flux2.text_encoder; print('flux2.safety' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
