"""One long-lived object that loads a FLUX.2 model once and serves text-to-image and multi-reference editing.

pipe = Flux2Pipeline("flux.2-klein-4b")
[out] = pipe.generate("a lighthouse at dusk", seed=7)
save_with_provenance(out.image, "lighthouse.png", out.record.to_dict())  # flux2.provenance
print(out.record.seed)
"""

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from flux2 import __version__
from flux2.registry import DEFAULT_MODEL, ModelInfo, check_settings, model_info
from flux2.safety import ContentFlagged, IntegrityChecker, SafetyPolicy, SafetyVerdict
from flux2.sampling import (
    PIXELS_PER_TOKEN,
    batched_prc_img,
    batched_prc_txt,
    denoise,
    denoise_cached,
    denoise_cfg,
    encode_image_refs,
    get_schedule,
    open_image,
    scatter_ids,
    tensor_to_image,
)
from flux2.text_encoder import Mistral3SmallEmbedder
from flux2.upsampling import PromptUpsampler, UpsampleResult
from flux2.util import default_device, default_dtype, load_ae, load_flow_model, load_text_encoder
from flux2.watermark import MIN_PIXELS, WatermarkConfig, embed
from flux2.weights import WeightPaths, find_weights

log = logging.getLogger(__name__)

DEFAULT_WATERMARK = WatermarkConfig()  # the reference's message; the robust method (see flux2.watermark)


class GenerationCancelled(Exception):
    """Raised out of `generate` when its cancel event was set (or a callback raised it) between steps.

    `completed` holds the images that were finished before the cancellation.
    """

    def __init__(self, message: str = "cancelled", completed: list["GeneratedImage"] | None = None):
        super().__init__(message)
        self.completed = completed or []


@dataclass(frozen=True)
class Progress:
    stage: str  # "load" | "upsample" | "encode_text" | "encode_references" | "denoise" | "decode"
    step: int  # steps done in this stage
    total: int
    detail: str = ""  # what the step is about, e.g. the component being loaded


@dataclass(frozen=True)
class GenerationRecord:
    """Everything that made one image; `seed` is the seed actually used for it."""

    model: str
    prompt: str
    seed: int
    num_steps: int
    guidance: float
    width: int
    height: int
    negative_prompt: str | None = None
    upsampled_prompt: str | None = None  # what the model was given, when prompt upsampling worked
    upsampling_error: str | None = None  # why upsampling fell back to the prompt as given
    references: tuple[str, ...] = ()  # sha256 of each reference image's RGB pixels
    kv_cache: bool = False
    watermark: str | None = None  # the invisible-watermark method embedded, if any
    safety: str = "off"  # the safety policy mode in force (see GeneratedImage.flagged for a withheld output)
    software: str = f"flux2 {__version__}"
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: exactly what provenance metadata stores and reads back."""
        return {**asdict(self), "references": list(self.references)}


@dataclass
class GeneratedImage:
    """One result. A flagged output has no image: only its record and the verdict are returned."""

    image: Image.Image | None
    record: GenerationRecord
    flagged: SafetyVerdict | None = None


@dataclass(frozen=True)
class _Request:
    prompt: str
    width: int
    height: int
    num_steps: int
    guidance: float
    seeds: list[int] = field(hash=False)
    negative_prompt: str | None
    references: list[Image.Image] = field(hash=False)
    upsampled: UpsampleResult | None = None

    @property
    def text(self) -> str:
        """The prompt the text encoder sees."""
        return self.upsampled.prompt if self.upsampled is not None else self.prompt


ProgressCallback = Callable[[Progress], None]
ImageInput = Image.Image | str | Path


class Flux2Pipeline:
    """Keeps a model's text encoder, transformer and autoencoder loaded and generates images with them.

    Components may be passed in already built (tests, custom weights); otherwise they are loaded by name.
    With `cpu_offload`, models stay on the CPU and visit the device only while they run. `upsampler` rewrites
    prompts (never failing a generation), `safety` screens the prompt, the references and the outputs, and
    `watermark` (on by default; None turns it off) marks every output. `progress` hears of each component
    loaded (stage "load").
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        weights_dir: str | Path | None = None,
        cpu_offload: bool = False,
        flow_model: nn.Module | None = None,
        ae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        upsampler: PromptUpsampler | None = None,
        safety: SafetyPolicy | str | None = None,
        watermark: WatermarkConfig | None = DEFAULT_WATERMARK,
        progress: ProgressCallback | None = None,
    ):
        self.upsampler = upsampler
        self.watermark = watermark
        self.info: ModelInfo = model_info(model)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.info, self.device)
        self.cpu_offload = cpu_offload
        home = torch.device("cpu") if cpu_offload else self.device
        if self.info.is_tiny:
            log.warning("model 'tiny' has random weights: it is a self-test and produces noise images")
        paths = self._locate(weights_dir, flow_model, ae, text_encoder)
        given = {"text encoder": text_encoder, "transformer": flow_model, "autoencoder": ae}
        self.text_encoder, self.flow_model, self.ae = self._load_missing(given, paths, home, progress).values()
        self._check_components()
        self.safety = self._safety_policy(safety)

    def _load_missing(self, parts: dict, paths: WeightPaths, home: torch.device, progress) -> dict:
        """Load every part not given, in the reference's order, reporting each one to `progress`."""
        name, dtype = self.info.name, self.dtype
        loaders = {
            "text encoder": lambda: load_text_encoder(
                name, home, path=paths.text_encoder, tokenizer_path=paths.tokenizer, dtype=dtype
            ),
            "transformer": lambda: load_flow_model(name, device=home, path=paths.transformer, dtype=dtype),
            "autoencoder": lambda: load_ae(name, home, path=paths.ae),
        }
        report = _Reporter(progress, cancel=None)
        missing = [part for part, module in parts.items() if module is None]
        for i, part in enumerate(missing):
            report(Progress("load", i, len(missing), part))
            parts[part] = loaders[part]()
        if missing:
            report(Progress("load", len(missing), len(missing)))
        return parts

    def _safety_policy(self, safety: SafetyPolicy | str | None) -> SafetyPolicy:
        """A mode name gets the reference's checkers; on [dev] the loaded Mistral encoder doubles as the
        integrity checker, so "full" costs no second 24B model there."""
        if safety is None or isinstance(safety, SafetyPolicy):
            return safety if safety is not None else SafetyPolicy("off")
        policy = SafetyPolicy.from_settings(safety, device=self.device)
        if safety == "full" and isinstance(self.text_encoder, Mistral3SmallEmbedder):
            encoder = self.text_encoder
            policy = SafetyPolicy("full", classifier=policy.classifier, integrity=lambda: IntegrityChecker(
                encoder.model, encoder.processor))  # fmt: skip
        return policy

    def _locate(self, weights_dir, flow_model, ae, text_encoder) -> WeightPaths:
        """Find every part still to load before loading any, so one error names everything missing."""
        given = {"transformer": flow_model, "ae": ae, "text_encoder": text_encoder}
        parts = tuple(part for part, module in given.items() if module is None)
        if self.info.is_tiny or not parts:
            return WeightPaths(None, None, None, None)
        return find_weights(self.info, weights_dir, parts=parts)

    def _check_components(self) -> None:
        """Parts from different models fail deep inside torch; say which part does not fit instead."""
        context = self.flow_model.params.context_in_dim
        features = getattr(self.text_encoder, "output_dim", context)
        if features != context:
            raise ValueError(
                f"the text encoder gives {features} features per token but the {self.info.name} transformer takes "
                f"{context}: the text encoder belongs to another model (check its path or text_encoder/ folder)"
            )
        latent = 4 * self.ae.params.z_channels
        if latent != self.flow_model.in_channels:
            raise ValueError(
                f"the autoencoder gives {latent} latent channels but the transformer takes "
                f"{self.flow_model.in_channels}: the autoencoder belongs to another model"
            )

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt: str,
        *,
        width: int | None = None,
        height: int | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        negative_prompt: str | None = None,
        reference_images: Sequence[ImageInput] = (),
        match_image_size: int | None = None,
        upsample: bool = True,
        callback: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GeneratedImage]:
        """Text-to-image, or editing when reference images are given. Image i uses seed + i.

        Raises ContentFlagged when the safety policy flags the prompt or a reference image; a flagged output
        comes back without its image. `upsample=False` skips the pipeline's upsampler for this call.
        """
        request = self._request(
            prompt,
            width,
            height,
            num_steps,
            guidance,
            seed,
            num_images,
            negative_prompt,
            reference_images,
            match_image_size,
        )
        report = _Reporter(callback, cancel)
        self.safety.prepare()
        self._screen(request.prompt, request.references)
        if upsample and self.upsampler is not None:
            request = self._upsample(request, report)
            if request.text != request.prompt:  # the text the model will see, written by another model
                self._screen(request.text, [])
        outputs: list[GeneratedImage] = []
        with torch.inference_mode():
            txt, txt_ids = self._encode_text(request, report)
            refs, ref_ids = self._encode_references(request, report)
            # One image at a time: image i is exactly what a single run with seed + i gives.
            with self._resident(self.flow_model, self.ae):
                for seed in request.seeds:
                    try:
                        latents = self._denoise(request, seed, txt, txt_ids, refs, ref_ids, report)
                        outputs.append(self._finish(self._decode(latents, report), request, seed))
                    except GenerationCancelled as cancelled:
                        raise GenerationCancelled(str(cancelled), completed=outputs) from None
        return outputs

    def edit(self, prompt: str, images: Sequence[ImageInput], **kwargs) -> list[GeneratedImage]:
        """Multi-reference editing: `generate` with the images as references."""
        if not images:
            raise ValueError("edit needs at least one input image")
        return self.generate(prompt, reference_images=images, **kwargs)

    # ------------------------------------------------------------------ validation

    def _request(
        self,
        prompt,
        width,
        height,
        num_steps,
        guidance,
        seed,
        num_images,
        negative_prompt,
        reference_images,
        match_image_size,
    ) -> _Request:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        references = [_open_image(img, i) for i, img in enumerate(reference_images)]
        width, height = self._size(width, height, references, match_image_size)
        num_steps = self.info.num_steps if num_steps is None else num_steps
        guidance = self.info.guidance if guidance is None else guidance
        check_settings(self.info, width=width, height=height, num_steps=num_steps, guidance=guidance, seed=seed,
                       num_images=num_images, negative_prompt=negative_prompt)  # fmt: skip
        seed = random.randrange(2**31) if seed is None else seed
        seeds = [seed + i for i in range(num_images)]
        negative_prompt = negative_prompt or None  # "" is the default negative, not a request
        return _Request(prompt, width, height, num_steps, float(guidance), seeds, negative_prompt, references)

    def _size(self, width, height, references, match_image_size) -> tuple[int, int]:
        if match_image_size is not None:
            if width is not None or height is not None:
                raise ValueError("give either width/height or match_image_size, not both")
            if not 0 <= match_image_size < len(references):
                raise ValueError(
                    f"match_image_size={match_image_size} but there are {len(references)} reference images"
                )
            w, h = references[match_image_size].size
            return w // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, h // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        return self.info.width if width is None else width, self.info.height if height is None else height

    # ------------------------------------------------------------------ stages

    def _encode_text(self, request: _Request, report: "_Reporter") -> tuple[Tensor, Tensor]:
        report(Progress("encode_text", 0, 1))
        with self._resident(self.text_encoder):
            if self.info.uses_cfg:  # [uncond; cond], uncond first as in the reference
                ctx = self.text_encoder([request.negative_prompt or "", request.text])
            else:
                ctx = self.text_encoder([request.text])
        ctx = ctx.to(self.device, self.dtype)  # [1, L, C], or [2, L, C] = [uncond; cond] with CFG
        report(Progress("encode_text", 1, 1))
        return batched_prc_txt(ctx)

    def _encode_references(self, request: _Request, report: "_Reporter") -> tuple[Tensor | None, Tensor | None]:
        if not request.references:
            return None, None
        report(Progress("encode_references", 0, 1))
        with self._resident(self.ae):
            refs, ref_ids = encode_image_refs(self.ae, request.references, dtype=self.dtype)
        report(Progress("encode_references", 1, 1))
        return refs.to(self.device), ref_ids.to(self.device)

    def _noise(self, request: _Request, seed: int) -> tuple[Tensor, Tensor]:
        """Seeded noise drawn on the CPU in float32 in the patchified layout [1, C, h, w], then packed and
        moved: a seed gives the same noise on every device."""
        shape = (1, self.flow_model.in_channels, request.height // PIXELS_PER_TOKEN, request.width // PIXELS_PER_TOKEN)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        x, x_ids = batched_prc_img(noise)
        return x.to(self.device, self.dtype), x_ids.to(self.device)

    def _denoise(self, request, seed, txt, txt_ids, refs, ref_ids, report: "_Reporter") -> tuple[Tensor, Tensor]:
        x, x_ids = self._noise(request, seed)
        timesteps = get_schedule(request.num_steps, x.shape[1])
        loop = self._loop(refs is not None)
        report(Progress("denoise", 0, request.num_steps))

        def on_step(i: int, total: int) -> None:
            if i > 0:
                report(Progress("denoise", i, total))

        x = loop(self.flow_model, x, x_ids, txt, txt_ids, timesteps, request.guidance, refs, ref_ids, callback=on_step)
        report(Progress("denoise", request.num_steps, request.num_steps))
        return x, x_ids

    def _loop(self, has_refs: bool):
        if self.info.uses_cfg:
            return denoise_cfg
        if self.info.use_kv_cache and has_refs:
            return denoise_cached
        return denoise

    def _decode(self, latents: tuple[Tensor, Tensor], report: "_Reporter") -> Image.Image:
        report(Progress("decode", 0, 1))
        x, x_ids = latents
        z = torch.cat(scatter_ids(x, x_ids)).squeeze(2)  # [B, C, h, w]
        ae_param = next(self.ae.parameters())
        pixels = self.ae.decode(z.to(ae_param.device, ae_param.dtype)).float()
        report(Progress("decode", 1, 1))
        return tensor_to_image(pixels[0])

    def _screen(self, prompt: str, references: list[Image.Image]) -> None:
        verdicts = [self.safety.check_prompt(prompt)] + [self.safety.check_reference(im) for im in references]
        for verdict in verdicts:
            if verdict is not None:
                raise ContentFlagged(verdict)

    def _upsample(self, request: _Request, report: "_Reporter") -> _Request:
        report(Progress("upsample", 0, 1))
        try:
            result = self.upsampler.upsample(request.prompt, request.references)
        except Exception as err:  # any upsampler, ours or not, must never fail a generation
            log.warning("prompt upsampling failed, generating with the original prompt: %s", err)
            result = UpsampleResult.fallback(request.prompt, f"{type(err).__name__}: {err}")
        report(Progress("upsample", 1, 1))
        return replace(request, upsampled=result)

    def _finish(self, image: Image.Image, request: _Request, seed: int) -> GeneratedImage:
        """Screen the output, then watermark it; a flagged output loses its pixels."""
        verdict = self.safety.check_output(image)
        if verdict is not None:
            log.warning("output image (seed %d) withheld: %s", seed, verdict.detail)
            return GeneratedImage(None, self._record(request, seed, watermark=None), flagged=verdict)
        method = None
        if self.watermark is not None and image.width * image.height >= MIN_PIXELS:
            image, method = embed(image, self.watermark), self.watermark.method
        elif self.watermark is not None:
            log.warning("image %dx%d is below the watermark's %d px minimum: not watermarked", *image.size, MIN_PIXELS)
        return GeneratedImage(image, self._record(request, seed, watermark=method))

    def _record(self, request: _Request, seed: int, watermark: str | None) -> GenerationRecord:
        upsampled = request.upsampled
        return GenerationRecord(
            model=self.info.name,
            prompt=request.prompt,
            seed=seed,
            num_steps=request.num_steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            negative_prompt=request.negative_prompt,
            upsampled_prompt=upsampled.upsampled if upsampled is not None else None,
            upsampling_error=upsampled.error if upsampled is not None else None,
            references=tuple(image_sha256(im) for im in request.references),
            kv_cache=self.info.use_kv_cache and bool(request.references),
            watermark=watermark,
            safety=self.safety.mode,
            note="noise image from the random-weight self-test model" if self.info.is_tiny else "",
        )

    @contextmanager
    def _resident(self, *modules: nn.Module) -> Iterator[None]:
        """With CPU offload, keep `modules` on the device only while they run."""
        if not self.cpu_offload:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


class _Reporter:
    def __init__(self, callback: ProgressCallback | None, cancel: threading.Event | None):
        self.callback, self.cancel = callback, cancel

    def __call__(self, progress: Progress) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise GenerationCancelled(f"cancelled during {progress.stage}")
        if self.callback is not None:
            self.callback(progress)


def _open_image(img: ImageInput, index: int) -> Image.Image:
    return img if isinstance(img, Image.Image) else open_image(img, f"reference image {index}")


def image_sha256(img: Image.Image) -> str:
    rgb = img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()
