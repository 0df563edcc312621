"""One long-lived object that loads a FLUX.2 model once and serves text-to-image and multi-reference editing.

pipe = Flux2Pipeline("flux.2-klein-4b")
[out] = pipe.generate("a lighthouse at dusk", seed=7)
save_with_provenance(out.image, "lighthouse.png", out.record.to_dict())  # flux2.provenance
print(out.record.seed)
"""

import hashlib
import logging
import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn

from flux2 import __version__
from flux2.editing import (
    WORK_PIXELS,
    Box,
    binary_mask,
    check_strength,
    composite,
    feathered,
    latent_mask,
    mask_box,
    outpaint_canvas,
    working_size,
)
from flux2.registry import DEFAULT_MODEL, ModelInfo, model_info
from flux2.safety import ContentFlagged, IntegrityChecker, SafetyPolicy, SafetyVerdict
from flux2.sampling import (
    PIXELS_PER_TOKEN,
    REF_TIME_SCALE,
    batched_prc_img,
    batched_prc_txt,
    denoise,
    denoise_cached,
    denoise_cfg,
    encode_image_refs,
    get_schedule,
    image_to_tensor,
    noised,
    open_image,
    scatter_ids,
    tensor_to_image,
    truncated_schedule,
)
from flux2.settings import check_settings
from flux2.text_encoder import Mistral3SmallEmbedder
from flux2.upsampling import PromptUpsampler, UpsampleResult
from flux2.util import default_device, default_dtype, load_ae, load_flow_model, load_text_encoder
from flux2.watermark import MIN_PIXELS, WatermarkConfig, embed
from flux2.weights import WeightPaths, find_weights

if TYPE_CHECKING:
    from flux2.ip_adapter import IPAdapter

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
    mode: str = "generate"  # "generate" | "img2img" | "inpaint" | "outpaint"
    strength: float | None = None  # how far back on the schedule an edit of a source image started
    source: str | None = None  # sha256 of the source image's RGB pixels (img2img, inpaint, outpaint)
    edit: dict | None = None  # how an edit was set up: mask sha256, mask_blur, crop_padding, margins, work_size
    true_cfg_scale: float | None = None  # opt-in true CFG on a distilled model or [dev]
    ip_adapter_scale: float | None = None
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
    cfg: float | None = None  # the true-CFG scale, when CFG runs (base models: guidance; others: opt-in)
    cfg_mode: str = "auto"
    ip_images: list[Image.Image] = field(default_factory=list, hash=False)
    ip_scale: float = 1.0
    source: "_Source | None" = None
    upsampled: UpsampleResult | None = None

    @property
    def text(self) -> str:
        """The prompt the text encoder sees."""
        return self.upsampled.prompt if self.upsampled is not None else self.prompt


@dataclass(frozen=True)
class _Source:
    """Where image-to-image and inpainting start, and how an inpainted region goes back into its source."""

    mode: str  # "img2img" | "inpaint" | "outpaint"
    image: Image.Image  # the source as given
    work: Image.Image  # the region being edited, at the size the model runs at
    strength: float
    as_reference: bool = False  # the clean source also conditions the model (reference tokens, t = 10)
    work_mask: Image.Image | None = None  # soft mask at the working size (inpainting), white = regenerate
    mask: Image.Image | None = None  # soft mask at the source's size, for the pixel composite
    region: Box | None = None  # the crop being edited, in source pixels (None: all of it)
    settings: dict = field(default_factory=dict)  # how the edit was set up, for the record

    @property
    def output_size(self) -> tuple[int, int]:
        return self.image.size if self.mask is not None else self.work.size

    def paste(self, generated: Image.Image) -> Image.Image:
        """Inpainting: the generated region scaled back into the source, the kept pixels exactly the source's."""
        if self.mask is None:
            return generated
        region = self.region or Box(0, 0, *self.image.size)
        placed = self.image.convert("RGB")
        placed.paste(generated.resize(region.size, Image.Resampling.LANCZOS), region.as_tuple()[:2])
        return composite(placed, self.image, self.mask)


ProgressCallback = Callable[[Progress], None]
ImageInput = Image.Image | str | Path
CFG_MODES = ("auto", "batched", "sequential")
EDIT_OPTIONS = frozenset({
    "num_steps", "guidance", "seed", "num_images", "negative_prompt", "reference_images", "true_cfg_scale",
    "cfg_mode", "ip_adapter_images", "ip_adapter_scale", "upsample", "callback", "cancel",
})  # fmt: skip


class Flux2Pipeline:
    """Keeps a model's text encoder, transformer and autoencoder loaded and generates images with them.

    Components may be passed in already built (tests, custom weights); otherwise they are loaded by name.
    With `cpu_offload`, models stay on the CPU and visit the device only while they run. `upsampler` rewrites
    prompts (never failing a generation), `safety` screens the prompt, the references and the outputs, and
    `watermark` (on by default; None turns it off) marks every output. `progress` hears of each component
    loaded (stage "load"). `ip_adapter` (flux2.ip_adapter) adds image-prompt tokens to the text stream.
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
        ip_adapter: "IPAdapter | None" = None,
    ):
        self.upsampler = upsampler
        self.ip_adapter = ip_adapter
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
        true_cfg_scale: float | None = None,
        cfg_mode: str = "auto",
        ip_adapter_images: Sequence[ImageInput] = (),
        ip_adapter_scale: float = 1.0,
        upsample: bool = True,
        callback: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GeneratedImage]:
        """Text-to-image, or editing when reference images are given. Image i uses seed + i.

        CFG: the klein base models always run it with `guidance` as the scale and `negative_prompt` (empty by
        default); other models run it only when `true_cfg_scale` is given (twice the cost). `cfg_mode` "batched"
        runs [uncond; cond] in one forward, "sequential" one after the other (less memory), "auto" batches and
        falls back to sequential on running out of memory. `ip_adapter_images` need the pipeline's `ip_adapter`.

        Raises ContentFlagged when the safety policy flags the prompt or a reference image; a flagged output
        comes back without its image. `upsample=False` skips the pipeline's upsampler for this call.
        """
        request = self._request(
            prompt, width=width, height=height, num_steps=num_steps, guidance=guidance, seed=seed,
            num_images=num_images, negative_prompt=negative_prompt, reference_images=reference_images,
            match_image_size=match_image_size, true_cfg_scale=true_cfg_scale, cfg_mode=cfg_mode,
            ip_adapter_images=ip_adapter_images, ip_adapter_scale=ip_adapter_scale,
        )  # fmt: skip
        return self._generate(request, _Reporter(callback, cancel), upsample)

    def edit(self, prompt: str, images: Sequence[ImageInput], **kwargs) -> list[GeneratedImage]:
        """Multi-reference editing: `generate` with the images as references."""
        if not images:
            raise ValueError("edit needs at least one input image")
        return self.generate(prompt, reference_images=images, **kwargs)

    def img2img(
        self, prompt: str, image: ImageInput, *, strength: float = 0.8, max_pixels: int = WORK_PIXELS, **kwargs
    ) -> list[GeneratedImage]:
        """Start from the source image noised to `strength` (1: pure noise; near 0: the source) and denoise.

        The output has the source's size (floored to 16 px, scaled to at most `max_pixels`). Other keyword
        arguments as for `generate` (not width, height or match_image_size).
        """
        source = _open_image(image, "source image")
        work = source.resize(working_size(*source.size, max_pixels), Image.Resampling.LANCZOS)
        edit = _Source("img2img", source, work, check_strength(strength), settings={"max_pixels": max_pixels})
        return self._edit(prompt, edit, kwargs)

    def inpaint(
        self,
        prompt: str,
        image: ImageInput,
        mask: ImageInput,
        *,
        strength: float = 1.0,
        mask_blur: float = 8.0,
        source_as_reference: bool = True,
        crop_padding: int | None = None,
        max_pixels: int = WORK_PIXELS,
        **kwargs,
    ) -> list[GeneratedImage]:
        """Regenerate where the mask is white and keep the source exactly where it is black.

        The source image is also a reference for the model (`source_as_reference`). `mask_blur` softens the
        mask's edge over about twice that many pixels: outward in the latents (the model blends into the kept
        area), inward in the final composite (every black pixel stays the source's). `crop_padding` edits only
        the mask's bounding box grown by that many pixels, scaled to `max_pixels`, and pastes it back: a small
        edit in a large photo runs at a sensible size. `strength` < 1 starts the masked region from the noised
        source. Other keyword arguments as for `generate` (extra `reference_images` follow the source).
        """
        source = _open_image(image, "source image")
        hard = binary_mask(_open_mask(mask), source.size)
        settings = {"mask": image_sha256(hard), "mask_blur": mask_blur, "crop_padding": crop_padding}
        return self._inpaint("inpaint", prompt, source, hard, strength=strength, mask_blur=mask_blur,
                             as_reference=source_as_reference, crop_padding=crop_padding, max_pixels=max_pixels,
                             settings=settings, kwargs=kwargs)  # fmt: skip

    def outpaint(
        self,
        prompt: str,
        image: ImageInput,
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        strength: float = 1.0,
        mask_blur: float = 8.0,
        source_as_reference: bool = True,
        max_pixels: int = WORK_PIXELS,
        **kwargs,
    ) -> list[GeneratedImage]:
        """Extend the canvas by the given pixels on each side and fill the new border by inpainting.

        The new canvas must be a multiple of 16 px each way; the original pixels stay exactly as they were.
        Other keyword arguments as for `generate`.
        """
        original = _open_image(image, "source image")
        canvas, mask = outpaint_canvas(original, left, right, top, bottom)
        margins = {"left": left, "right": right, "top": top, "bottom": bottom}
        settings = {"original": image_sha256(original), **margins, "mask_blur": mask_blur}
        return self._inpaint("outpaint", prompt, canvas, mask, strength=strength, mask_blur=mask_blur,
                             as_reference=source_as_reference, crop_padding=None, max_pixels=max_pixels,
                             settings=settings, kwargs=kwargs)  # fmt: skip

    def _inpaint(
        self, mode: str, prompt: str, source: Image.Image, hard: Image.Image, *, strength: float, mask_blur: float,
        as_reference: bool, crop_padding: int | None, max_pixels: int, settings: dict, kwargs: dict,
    ) -> list[GeneratedImage]:  # fmt: skip
        region = None
        if crop_padding is not None:  # the box holds the whole soft edge
            region = mask_box(hard, crop_padding + math.ceil(2 * mask_blur))
        box = region or Box(0, 0, *source.size)
        work_size = working_size(*box.size, max_pixels, upscale=region is not None)
        work = source.crop(box.as_tuple()).resize(work_size, Image.Resampling.LANCZOS)
        work_hard = hard.crop(box.as_tuple()).resize(work_size, Image.Resampling.NEAREST)
        work_mask = feathered(work_hard, mask_blur * work_size[0] / box.size[0])
        composite_mask = feathered(hard, mask_blur, inward=True)
        settings = {**settings, "source_as_reference": as_reference, "work_size": list(work_size)}
        edit = _Source(mode, source, work, check_strength(strength), as_reference, work_mask, composite_mask, region,
                       settings)  # fmt: skip
        return self._edit(prompt, edit, kwargs)

    def _edit(self, prompt: str, source: _Source, kwargs: dict) -> list[GeneratedImage]:
        if given := sorted({"width", "height", "match_image_size"} & kwargs.keys()):
            raise ValueError(f"{source.mode} takes its size from the source image: do not pass {', '.join(given)}")
        if unknown := sorted(kwargs.keys() - EDIT_OPTIONS):
            allowed = ", ".join(sorted(EDIT_OPTIONS))
            raise ValueError(f"{source.mode} does not take {', '.join(unknown)}; it takes {allowed}")
        upsample, callback, cancel = kwargs.pop("upsample", True), kwargs.pop("callback", None), kwargs.pop(
            "cancel", None)  # fmt: skip
        request = self._request(prompt, width=source.work.width, height=source.work.height, **kwargs)
        request = replace(request, source=source)
        return self._generate(request, _Reporter(callback, cancel), upsample)

    def _generate(self, request: _Request, report: "_Reporter", upsample: bool) -> list[GeneratedImage]:
        self.safety.prepare()
        self._screen(request.prompt, request.references + ([request.source.image] if request.source else []))
        if upsample and self.upsampler is not None:
            request = self._upsample(request, report)
            if request.text != request.prompt:  # the text the model will see, written by another model
                self._screen(request.text, [])
        outputs: list[GeneratedImage] = []
        with torch.inference_mode():
            txt, txt_ids = self._encode_text(request, report)
            start = self._encode_source(request)
            refs, ref_ids = self._encode_references(request, start, report)
            ip_tokens = self._ip_tokens(request)
            # One image at a time: image i is exactly what a single run with seed + i gives.
            with self._resident(self.flow_model, self.ae):
                for seed in request.seeds:
                    try:
                        latents = self._denoise(request, seed, txt, txt_ids, refs, ref_ids, start, ip_tokens, report)
                        outputs.append(self._finish(self._decode(latents, report), request, seed))
                    except GenerationCancelled as cancelled:
                        raise GenerationCancelled(str(cancelled), completed=outputs) from None
        return outputs

    # ------------------------------------------------------------------ validation

    def _request(
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
        true_cfg_scale: float | None = None,
        cfg_mode: str = "auto",
        ip_adapter_images: Sequence[ImageInput] = (),
        ip_adapter_scale: float = 1.0,
    ) -> _Request:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        references = [_open_image(img, f"reference image {i}") for i, img in enumerate(reference_images)]
        width, height = self._size(width, height, references, match_image_size)
        num_steps = self.info.num_steps if num_steps is None else num_steps
        guidance = self.info.guidance if guidance is None else guidance
        check_settings(
            self.info, width=width, height=height, num_steps=num_steps, guidance=guidance, seed=seed,
            num_images=num_images, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
        )  # fmt: skip
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {', '.join(CFG_MODES)}, got {cfg_mode!r}")
        if true_cfg_scale is not None:
            log.warning("true CFG on %s runs the model twice per step: about twice the time", self.info.name)
        ip_images = [_open_image(img, f"IP-Adapter image {i}") for i, img in enumerate(ip_adapter_images)]
        if ip_images:
            from flux2.ip_adapter import check_scale

            check_scale(ip_adapter_scale)
        if ip_images and self.ip_adapter is None:
            raise ValueError("ip_adapter_images need an IP-Adapter: Flux2Pipeline(..., ip_adapter=IPAdapter...)")
        cfg = float(guidance) if self.info.uses_cfg else true_cfg_scale
        if cfg == 1.0:  # uncond + 1 * (cond - uncond) is the conditional pass alone: run just that
            cfg = None
        if ip_images and ip_adapter_scale != 0 and cfg_mode == "batched" and cfg is not None:
            raise ValueError("IP-Adapter tokens stay out of the unconditional pass: use cfg_mode sequential or auto")
        seed = random.randrange(2**31) if seed is None else seed
        return _Request(
            prompt, width, height, num_steps, float(guidance), seeds=[seed + i for i in range(num_images)],
            negative_prompt=negative_prompt or None,  # "" is the default negative, not a request
            references=references, cfg=cfg,
            cfg_mode=cfg_mode, ip_images=ip_images, ip_scale=ip_adapter_scale,
        )  # fmt: skip

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
            if request.cfg is not None:  # [uncond; cond], uncond first as in the reference
                ctx = self.text_encoder([request.negative_prompt or "", request.text])
            else:
                ctx = self.text_encoder([request.text])
        ctx = ctx.to(self.device, self.dtype)  # [1, L, C], or [2, L, C] = [uncond; cond] with CFG
        report(Progress("encode_text", 1, 1))
        return batched_prc_txt(ctx)

    def _encode_references(self, request: _Request, start, report: "_Reporter") -> tuple[Tensor | None, Tensor | None]:
        """The reference tokens: an edit's source first (t = 10: exactly the latents it starts from), then the
        reference images."""
        source = start if start is not None and request.source.as_reference else None
        if not request.references and source is None:
            return None, None
        report(Progress("encode_references", 0, 1))
        parts = []
        if source is not None:
            tokens, ids, _ = source
            ids = ids.clone()
            ids[..., 0] = REF_TIME_SCALE  # the grid of the target, one reference slot along in time
            parts.append((tokens, ids))
        if request.references:
            with self._resident(self.ae):
                parts.append(encode_image_refs(self.ae, request.references, self.dtype, slots_taken=len(parts)))
        report(Progress("encode_references", 1, 1))
        refs = torch.cat([tokens.to(self.device, self.dtype) for tokens, _ in parts], dim=1)
        return refs, torch.cat([ids.to(self.device) for _, ids in parts], dim=1)

    def _ae_encode(self, image: Image.Image) -> Tensor:
        """Normalised latents [1, C, h, w] of an image, in the autoencoder's dtype."""
        param = next(self.ae.parameters())
        return self.ae.encode(image_to_tensor(image)[None].to(param.device, param.dtype))

    def _encode_source(self, request: _Request) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """Image-to-image and inpainting: the source's packed latents [1, L, C], their ids, and the latent mask
        [1, L, 1] (None for image-to-image)."""
        source = request.source
        if source is None:
            return None
        with self._resident(self.ae):
            latents, ids = batched_prc_img(self._ae_encode(source.work))
        mask = None
        if source.work_mask is not None:
            mask = latent_mask(source.work_mask, *source.work.size).to(self.device, self.dtype)
            if mask.max() == 0 and source.work_mask.getbbox() is not None:
                log.warning("the mask is too thin to reach the centre of any 16 px block: nothing will be "
                            "regenerated; use mask_blur > 0 or a wider mask")  # fmt: skip
        return latents.to(self.device, self.dtype), ids, mask

    def _ip_tokens(self, request: _Request) -> Tensor | None:
        if not request.ip_images or request.ip_scale == 0:
            return None
        return self.ip_adapter.tokens(request.ip_images).to(self.device, self.dtype)

    def _noise(self, request: _Request, seed: int) -> tuple[Tensor, Tensor]:
        """Seeded noise drawn on the CPU in float32 in the patchified layout [1, C, h, w], then packed and
        moved: a seed gives the same noise on every device."""
        shape = (1, self.flow_model.in_channels, request.height // PIXELS_PER_TOKEN, request.width // PIXELS_PER_TOKEN)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        x, x_ids = batched_prc_img(noise)
        return x.to(self.device, self.dtype), x_ids.to(self.device)

    def _denoise(
        self, request, seed, txt, txt_ids, refs, ref_ids, start, ip_tokens, report: "_Reporter"
    ) -> tuple[Tensor, Tensor]:
        x, x_ids = self._noise(request, seed)
        timesteps = get_schedule(request.num_steps, x.shape[1])
        blend = None
        if start is not None:  # image-to-image / inpainting: start part-way, from the noised source
            source, _, mask = start
            noise, timesteps = x, truncated_schedule(timesteps, request.source.strength)
            x = noised(source, noise, timesteps[0])
            if mask is not None:  # the kept region follows the source, re-noised with the same noise
                blend = _known_region(source, noise, mask)
        steps = len(timesteps) - 1
        report(Progress("denoise", 0, steps))

        def on_step(i: int, total: int) -> None:
            if i > 0:
                report(Progress("denoise", i, total))

        common = dict(callback=on_step, blend=blend, txt_extra=ip_tokens, txt_extra_scale=request.ip_scale)
        args = (self.flow_model, x, x_ids, txt, txt_ids, timesteps)
        if request.cfg is None:
            loop = denoise_cached if self._kv_path(request, refs is not None) else denoise
            x = loop(*args, request.guidance, refs, ref_ids, **common)
        else:
            x = self._denoise_cfg(request, args, refs, ref_ids, common, report, steps)
        report(Progress("denoise", steps, steps))
        return x, x_ids

    def _kv_path(self, request: _Request, has_refs: bool) -> bool:
        """The KV loop serves a distilled KV model with references, no CFG, and image-prompt tokens at scale 1."""
        ip_plain = not request.ip_images or request.ip_scale in (0, 1)
        return self.info.use_kv_cache and has_refs and request.cfg is None and ip_plain

    def _denoise_cfg(self, request, args, refs, ref_ids, common, report, steps) -> Tensor:
        """CFG batched when allowed and memory holds, else one half after the other (the same result)."""
        embedded = request.guidance if self.flow_model.params.use_guidance_embed else None
        batched = request.cfg_mode == "batched" or (request.cfg_mode == "auto" and common["txt_extra"] is None)
        try:
            return denoise_cfg(*args, request.cfg, refs, ref_ids, **common, batched=batched, model_guidance=embedded)
        except torch.OutOfMemoryError:
            if not batched or request.cfg_mode == "batched":
                raise
        log.warning("out of memory running [uncond; cond] together: running them one after the other")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        report(Progress("denoise", 0, steps))
        return denoise_cfg(*args, request.cfg, refs, ref_ids, **common, batched=False, model_guidance=embedded)

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
            images = request.references + ([request.source.image] if request.source is not None else [])
            result = self.upsampler.upsample(request.prompt, images)
        except Exception as err:  # any upsampler, ours or not, must never fail a generation
            log.warning("prompt upsampling failed, generating with the original prompt: %s", err)
            result = UpsampleResult.fallback(request.prompt, f"{type(err).__name__}: {err}")
        report(Progress("upsample", 1, 1))
        return replace(request, upsampled=result)

    def _finish(self, image: Image.Image, request: _Request, seed: int) -> GeneratedImage:
        """Put an inpainted region back into its source, screen the output, then watermark it; a flagged output
        loses its pixels."""
        if request.source is not None:
            image = request.source.paste(image)
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
        upsampled, source = request.upsampled, request.source
        return GenerationRecord(
            model=self.info.name,
            prompt=request.prompt,
            seed=seed,
            num_steps=request.num_steps,
            guidance=request.guidance,
            width=source.output_size[0] if source else request.width,
            height=source.output_size[1] if source else request.height,
            negative_prompt=request.negative_prompt,
            upsampled_prompt=upsampled.upsampled if upsampled is not None else None,
            upsampling_error=upsampled.error if upsampled is not None else None,
            references=tuple(image_sha256(im) for im in request.references),
            kv_cache=self._kv_path(request, bool(request.references) or bool(source and source.as_reference)),
            mode=source.mode if source else "generate",
            strength=source.strength if source else None,
            source=source.settings.get("original", image_sha256(source.image)) if source else None,
            edit={k: v for k, v in source.settings.items() if k != "original"} if source else None,
            true_cfg_scale=None if self.info.uses_cfg else request.cfg,
            ip_adapter_scale=request.ip_scale if request.ip_images else None,
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


def _open_image(img: ImageInput, what: str) -> Image.Image:
    """An RGB image (a palette or RGBA image given in memory is converted, as files are)."""
    return img.convert("RGB") if isinstance(img, Image.Image) else open_image(img, what)


def _open_mask(mask: ImageInput) -> Image.Image:
    """A mask as given: a PIL image, or a file opened without conversion (its mode is checked later)."""
    if isinstance(mask, Image.Image):
        return mask
    path = Path(mask)
    if not path.is_file():
        raise ValueError(f"mask not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened
    except OSError as err:
        raise ValueError(f"mask ({path}) is not a readable image: {err}") from err


def _known_region(source: Tensor, noise: Tensor, mask: Tensor):
    """After each step: the generated tokens where mask is 1, the source re-noised to t_next where it is 0."""

    def blend(x: Tensor, t_next: float) -> Tensor:
        return mask * x + (1 - mask) * noised(source, noise, t_next)

    return blend


def image_sha256(img: Image.Image) -> str:
    rgb = img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()
