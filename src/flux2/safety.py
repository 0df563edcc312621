"""Content moderation: an NSFW image classifier and a yes/no integrity check by a chat LLM.

Where the reference moderates (its `scripts/cli.py`):
    prompt     a new prompt typed in the REPL          -> integrity LLM on the text
    reference  each new input image                    -> NSFW classifier, then integrity LLM on the image
    output     the generated image, before saving      -> NSFW classifier, then integrity LLM on the image

The reference folds both checks into its Mistral text encoder (`test_txt`, `test_image`). Here they are separate
objects, `NSFWClassifier` and `IntegrityChecker`, and `SafetyPolicy` decides which of them run: "off" (nothing),
"classifier" (the small image classifier only) or "full" (both, as the reference). The 24B integrity model is
loaded only when a "full" policy first needs it. `test_txt(embedder, prompt)` and `test_image(embedder, image)`
keep the reference's names, taking the encoder instead of being its methods.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from PIL import Image
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    pipeline,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from flux2.images import open_image, tensor_to_image
from flux2.registry import NSFW_CLASSIFIER
from flux2.system_messages import (
    PROMPT_IMAGE_INTEGRITY,
    PROMPT_IMAGE_INTEGRITY_FOLLOW_UP,
    PROMPT_TEXT_INTEGRITY,
    SYSTEM_PROMPT_CONTENT_FILTER,
)
from flux2.text_encoder import (
    DEFAULT_DTYPE,
    MISTRAL_MODEL_ID,
    MISTRAL_PROCESSOR_ID,
    Mistral3SmallEmbedder,
    PathLike,
    TextPreprocessor,
    load_processor,
)

NSFW_MODEL_ID = NSFW_CLASSIFIER.repo_id
NSFW_LABEL = "nsfw"
NSFW_THRESHOLD = 0.85  # the reference's: flagged when the "nsfw" score is strictly above it
# The reference shrinks (or enlarges) every image to about 512^2 px before the LLM check: "enough for checking".
INTEGRITY_IMAGE_PIXELS = 512**2
ANSWER_YES, ANSWER_NO = "yes", "no"

Check = Literal["nsfw_classifier", "integrity_llm"]
Stage = Literal["prompt", "reference", "output"]
SafetyMode = Literal["off", "classifier", "full"]
SAFETY_MODES: tuple[str, ...] = get_args(SafetyMode)
ImageInput = Image.Image | str | os.PathLike[str] | Tensor

_CHECK_NAMES = {"nsfw_classifier": "the NSFW classifier", "integrity_llm": "the integrity check (LLM)"}
_STAGE_NAMES = {"prompt": "prompt", "reference": "reference image", "output": "output image"}


@dataclass(frozen=True)
class SafetyVerdict:
    """One check's decision on one input. `detail` says why, e.g. "nsfw score 0.9123 > threshold 0.85"."""

    flagged: bool
    check: Check
    stage: Stage
    detail: str

    def __post_init__(self) -> None:
        if self.check not in _CHECK_NAMES:
            raise ValueError(f"check must be one of {sorted(_CHECK_NAMES)}, got {self.check!r}")
        if self.stage not in _STAGE_NAMES:
            raise ValueError(f"stage must be one of {sorted(_STAGE_NAMES)}, got {self.stage!r}")


class ContentFlagged(ValueError):
    """Raised by callers that refuse flagged content; `verdict` says which check fired at which stage."""

    def __init__(self, verdict: SafetyVerdict) -> None:
        self.verdict = verdict
        super().__init__(
            f"{_STAGE_NAMES[verdict.stage]} flagged by {_CHECK_NAMES[verdict.check]} "
            f"(check={verdict.check!r}, stage={verdict.stage!r}): {verdict.detail}"
        )

    def __reduce__(self):  # pickled across processes (flux2.parallel): rebuilt from the verdict, not the message
        return ContentFlagged, (self.verdict,)


def as_pil_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, or a [3, H, W] / [B, 3, H, W] tensor in [-1, 1]
    (the first batch element, truncated to uint8 as the reference converts)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        x = image[0] if image.ndim == 4 else image
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
        return tensor_to_image(x)
    if isinstance(image, str | os.PathLike):
        return open_image(image)
    raise ValueError(f"image must be a PIL image, a path or a tensor in [-1, 1], got {type(image).__name__}")


def resize_to_pixels(image: Image.Image, pixels: int = INTEGRITY_IMAGE_PIXELS) -> Image.Image:
    """Scale by sqrt(pixels / (w * h)), up or down, with PIL's default filter, as the reference does."""
    w, h = image.size
    f = math.sqrt(pixels / (w * h))
    return image.resize((max(1, int(f * w)), max(1, int(f * h))))


# ----------------------------------------------------------------------------- NSFW classifier


class NSFWClassifier:
    """An image-classification model with an "nsfw" label (the reference's `Falconsai/nsfw_image_detection`),
    loaded with transformers' pipeline on first use. Flags an image when its "nsfw" probability > `threshold`."""

    def __init__(
        self,
        model_path_or_id: PathLike = NSFW_MODEL_ID,
        threshold: float = NSFW_THRESHOLD,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
        self.model_path_or_id = model_path_or_id
        self.threshold = float(threshold)
        self.device = device
        self._classify: Callable | None = None
        self._lock = threading.Lock()

    def _pipeline(self) -> Callable:
        with self._lock:
            if self._classify is None:
                classify = pipeline("image-classification", model=str(self.model_path_or_id), device=self.device)
                labels = sorted(classify.model.config.id2label.values())
                if NSFW_LABEL not in labels:
                    raise ValueError(
                        f"{self.model_path_or_id} is not an NSFW classifier: its labels are {labels}, "
                        f"with no {NSFW_LABEL!r} label"
                    )
                self._classify = classify
        return self._classify

    def score(self, image: ImageInput) -> float:
        """The probability of the "nsfw" label, in [0, 1]."""
        scores = self._pipeline()(as_pil_image(image), top_k=None)  # every label, not just the top 5
        return next(s["score"] for s in scores if s["label"] == NSFW_LABEL)

    def check(self, image: ImageInput, stage: Stage) -> SafetyVerdict:
        score = self.score(image)
        flagged = score > self.threshold
        detail = f"nsfw score {score:.4f} {'>' if flagged else '<='} threshold {self.threshold}"
        return SafetyVerdict(flagged, "nsfw_classifier", stage, detail)


# ----------------------------------------------------------------------------- integrity LLM


class RestrictToTokens(LogitsProcessor):
    """Keep the logits of `token_ids`; set every other logit to (global min - 1), as the reference does."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        ids = self.token_ids.to(scores.device)
        restricted = torch.full_like(scores, scores.min() - 1)
        restricted[:, ids] = scores[:, ids]
        return restricted


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the yes/no integrity check needs {word!r} to be one token of the tokenizer, but it encodes to "
            f"{len(ids)} tokens {ids}; use a chat model whose vocabulary has it (Mistral-Small and Qwen3 do)"
        )
    return ids[0]


class IntegrityChecker:
    """Asks a chat model whether a prompt or an image shows copyrighted characters, brands or real public figures.

    The answer is one greedy token restricted to "yes" or "no"; "yes" flags. Text checks work with any chat model
    and its tokenizer; image checks need a vision-language model (Mistral-3) and a processor with an image
    processor (transformers' PixtralProcessor, which needs torchvision).
    """

    def __init__(self, model: PreTrainedModel, processor: TextPreprocessor) -> None:
        self.model = model
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", processor)
        self.yes_token_id = _single_token_id(tokenizer, ANSWER_YES)
        self.no_token_id = _single_token_id(tokenizer, ANSWER_NO)
        self.restrict = RestrictToTokens([self.yes_token_id, self.no_token_id])

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike = MISTRAL_MODEL_ID,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        processor: PathLike | None = None,
    ) -> IntegrityChecker:
        """Load a chat model (image-text-to-text when its type has one, else causal LM) in `dtype` (default
        bf16) and its processor; for the default Mistral-Small-3.2 the processor is 3.1's, as in the reference."""
        if processor is None:
            processor = MISTRAL_PROCESSOR_ID if path == MISTRAL_MODEL_ID else path
        multimodal = AutoConfig.from_pretrained(path).model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = model_cls.from_pretrained(path, dtype=dtype or DEFAULT_DTYPE, device_map=str(torch.device(device)))
        return cls(model.eval().requires_grad_(False), load_processor(processor))

    @staticmethod
    def text_conversation(prompt: str) -> list[dict]:
        """System filter prompt, then the prompt inside PROMPT_TEXT_INTEGRITY. Plain-string contents render as the
        reference's typed text parts in Mistral's template and also work in templates without typed parts (Qwen3).
        A literal "[IMG]" is removed: a multimodal processor would count it as an image placeholder."""
        return [
            {"role": "system", "content": SYSTEM_PROMPT_CONTENT_FILTER},
            {"role": "user", "content": PROMPT_TEXT_INTEGRITY.format(prompt=prompt.replace("[IMG]", ""))},
        ]

    @staticmethod
    def image_conversation(image: Image.Image) -> list[dict]:
        """System filter prompt, then [PROMPT_IMAGE_INTEGRITY, image, PROMPT_IMAGE_INTEGRITY_FOLLOW_UP]."""
        return [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT_CONTENT_FILTER}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": PROMPT_IMAGE_INTEGRITY},
                    {"type": "image", "image": image},
                    {"type": "text", "text": PROMPT_IMAGE_INTEGRITY_FOLLOW_UP},
                ],
            },
        ]

    @torch.no_grad()
    def answer(self, conversation: list[dict]) -> str:
        """The model's one-token answer, "yes" or "no" (greedy, all other tokens masked out)."""
        inputs = self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        generated = self.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, logits_processor=LogitsProcessorList([self.restrict])
        )
        return ANSWER_YES if generated[0, -1].item() == self.yes_token_id else ANSWER_NO

    def _verdict(self, conversation: list[dict], stage: Stage) -> SafetyVerdict:
        answer = self.answer(conversation)
        return SafetyVerdict(answer == ANSWER_YES, "integrity_llm", stage, f"the model answered {answer!r}")

    def check_text(self, prompt: str, stage: Stage = "prompt") -> SafetyVerdict:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        return self._verdict(self.text_conversation(prompt), stage)

    def require_image_support(self) -> None:
        if getattr(self.processor, "image_processor", None) is None:
            # A bare tokenizer would render the image as one placeholder token and silently ignore its pixels.
            raise ValueError(
                f"the image integrity check needs a processor that handles images (e.g. transformers' "
                f"PixtralProcessor, which needs torchvision), got {type(self.processor).__name__}"
            )

    def check_image(self, image: ImageInput, stage: Stage = "output") -> SafetyVerdict:
        self.require_image_support()
        image = resize_to_pixels(as_pil_image(image))
        return self._verdict(self.image_conversation(image), stage)


# The reference's `Mistral3SmallEmbedder.test_txt` / `test_image`, as functions of the encoder: the encoder only
# embeds, and the dependency runs one way (safety uses text_encoder, never the reverse).


def test_txt(embedder: Mistral3SmallEmbedder, prompt: str) -> bool:
    """True if the encoder's model, as the integrity checker, flags `prompt`."""
    return IntegrityChecker(embedder.model, embedder.processor).check_text(prompt).flagged


def test_image(embedder: Mistral3SmallEmbedder, image: ImageInput) -> bool:
    """True if the encoder's model flags the image (PIL, path or [-1, 1] tensor). Only the integrity LLM runs:
    unlike the reference, the NSFW classifier is not part of the encoder (NSFWClassifier, SafetyPolicy)."""
    return IntegrityChecker(embedder.model, embedder.processor).check_image(image).flagged


test_txt.__test__ = test_image.__test__ = False  # not tests, even when a test module imports them by name


# ----------------------------------------------------------------------------- policy


class SafetyPolicy:
    """Which checks run where. "off": none; "classifier": the NSFW classifier on reference and output images;
    "full": also the integrity LLM on prompts and images, as the reference.

    `integrity` may be a built checker or a factory called once, on the first check that needs it (only in "full"
    mode), so that the 24B model is never loaded for the other modes.
    """

    def __init__(
        self,
        mode: SafetyMode = "off",
        *,
        classifier: NSFWClassifier | None = None,
        integrity: IntegrityChecker | Callable[[], IntegrityChecker] | None = None,
    ) -> None:
        if mode not in SAFETY_MODES:
            raise ValueError(f"safety mode must be one of {list(SAFETY_MODES)}, got {mode!r}")
        if mode == "full" and integrity is None:
            raise ValueError(
                "safety mode 'full' needs the integrity model: pass integrity=IntegrityChecker(...) or a factory "
                "returning one, or build the policy with SafetyPolicy.from_settings"
            )
        if integrity is not None and not isinstance(integrity, IntegrityChecker) and not callable(integrity):
            raise ValueError(f"integrity must be an IntegrityChecker or a factory, got {type(integrity).__name__}")
        self.mode = mode
        self.classifier = classifier if classifier is not None else NSFWClassifier()  # loads on first use
        self._integrity = integrity
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        mode: SafetyMode = "off",
        *,
        classifier_model: PathLike = NSFW_MODEL_ID,
        threshold: float = NSFW_THRESHOLD,
        integrity_model: PathLike = MISTRAL_MODEL_ID,
        integrity_processor: PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> SafetyPolicy:
        """A policy whose models load from these paths/ids on first use (the integrity model only in "full")."""
        load_integrity = functools.partial(
            IntegrityChecker.from_pretrained, integrity_model, device, dtype, processor=integrity_processor
        )
        return cls(mode, classifier=NSFWClassifier(classifier_model, threshold, device), integrity=load_integrity)

    @property
    def integrity(self) -> IntegrityChecker:
        """The integrity checker, built by its factory on first access."""
        with self._lock:
            if self._integrity is None:
                raise ValueError("this safety policy has no integrity checker (pass integrity=...)")
            if not isinstance(self._integrity, IntegrityChecker):
                checker = self._integrity()
                if not isinstance(checker, IntegrityChecker):
                    raise ValueError(f"the integrity factory returned {type(checker).__name__}, not IntegrityChecker")
                self._integrity = checker
            return self._integrity

    def prepare(self) -> None:
        """Load what the mode needs and check it can do its job, so that a problem shows before any image is
        generated rather than after (the models otherwise load on first use)."""
        if self.mode == "off":
            return
        self.classifier._pipeline()
        if self.mode == "full":
            self.integrity.require_image_support()

    def check_prompt(self, prompt: str) -> SafetyVerdict | None:
        """The flagged verdict, or None. Only "full" checks prompts (there is no text classifier)."""
        if self.mode != "full":
            return None
        verdict = self.integrity.check_text(prompt, "prompt")
        return verdict if verdict.flagged else None

    def check_reference(self, image: ImageInput) -> SafetyVerdict | None:
        return self._check_image(image, "reference")

    def check_output(self, image: ImageInput) -> SafetyVerdict | None:
        return self._check_image(image, "output")

    def _check_image(self, image: ImageInput, stage: Stage) -> SafetyVerdict | None:
        """Classifier first; the LLM only when the classifier passes the image (as the reference)."""
        if self.mode == "off":
            return None
        image = as_pil_image(image)
        verdict = self.classifier.check(image, stage)
        if not verdict.flagged and self.mode == "full":
            verdict = self.integrity.check_image(image, stage)
        return verdict if verdict.flagged else None
