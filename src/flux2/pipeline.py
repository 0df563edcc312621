"""One long-lived object that loads a FLUX.2 model once and serves text-to-image and multi-reference editing.

pipe = Flux2Pipeline("flux.2-klein-4b")
[out] = pipe.generate("a lighthouse at dusk", seed=7)
save_with_provenance(out.image, "lighthouse.png", out.record.to_dict())  # flux2.provenance
print(out.record.seed)
"""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn

from flux2 import __version__
from flux2.editing import EditSource, edit_source, latent_mask
from flux2.images import ImageInput, image_sha256, image_to_tensor, open_image_input, tensor_to_image
from flux2.registry import DEFAULT_MODEL, ModelInfo, model_info
from flux2.request import GenerationRequest, LoraChoice
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
    noised,
    scatter_ids,
    truncated_schedule,
)
from flux2.text_encoder import Mistral3SmallEmbedder
from flux2.transforms.cpu_autoencoder import cpu_autoencoder
from flux2.transforms.tiling import Tiling, decode
from flux2.upsampling import PromptUpsampler, UpsampleResult
from flux2.util import default_device, default_dtype, load_ae, load_flow_model, load_text_encoder
from flux2.watermark import MIN_PIXELS, WatermarkConfig, embed
from flux2.weights import WeightPaths, find_weights

if TYPE_CHECKING:
    from flux2.ip_adapter import IPAdapter
    from flux2.transforms.lora_files import LoraFiles

log = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 4  # encoded prompts kept: a service or a REPL that repeats one skips the text encoder
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
    detail: str = ""  # what the step is about, e.g. the component being loaded; why upsampling fell back
    # On the "upsample" 1/1 event: the prompt the model will see, when upsampling rewrote it (None: as given).
    upsampled_prompt: str | None = None


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
    loras: tuple[dict, ...] = ()  # each LoRA applied: file name, sha256 of the file, strength, fused or not
    watermark: str | None = None  # the invisible-watermark method embedded, if any
    safety: str = "off"  # the safety policy mode in force (see GeneratedImage.flagged for a withheld output)
    software: str = f"flux2 {__version__}"
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: exactly what provenance metadata stores and reads back."""
        return {**asdict(self), "references": list(self.references), "loras": [dict(lora) for lora in self.loras]}


@dataclass
class GeneratedImage:
    """One result. A flagged output has no image: only its record and the verdict are returned."""

    image: Image.Image | None
    record: GenerationRecord
    flagged: SafetyVerdict | None = None

    def save(self, path: str | Path, *, sidecar: bool = False) -> Path:
        """Write the image with its provenance record inside (format from the suffix: .png, .jpg, .webp), and with
        `sidecar` also as PATH.json; `image.save` would drop the record."""
        from flux2.provenance import save_with_provenance

        if self.image is None:
            raise ValueError(f"seed {self.record.seed} was withheld by the safety policy: there is no image to save")
        return save_with_provenance(self.image, path, self.record.to_dict(), sidecar=sidecar)


@dataclass(frozen=True)
class _Plan:
    """A resolved request with its images opened: what one call runs."""

    request: GenerationRequest  # resolved for the pipeline's model
    width: int
    height: int
    references: list[Image.Image]
    ip_images: list[Image.Image]
    cfg: float | None  # the CFG scale when two passes run
    source: EditSource | None = None
    upsampled: UpsampleResult | None = None
    loras: tuple[dict, ...] = ()  # the LoRAs applied, as the record names them

    @property
    def text(self) -> str:
        """The prompt the text encoder sees."""
        return self.upsampled.prompt if self.upsampled is not None else self.request.prompt


@dataclass(frozen=True)
class Tokens:
    """A packed token sequence [B, L, C] and its position ids [B, L, 4]."""

    tokens: Tensor
    ids: Tensor


@dataclass(frozen=True)
class _SourceLatents:
    """An edit's source, encoded: where its denoising starts, and the mask of what is regenerated."""

    latents: Tensor  # [1, L, C]
    ids: Tensor
    mask: Tensor | None  # [1, L, 1], 1 = regenerate; None for image-to-image


@dataclass(frozen=True)
class _Conditioning:
    """Everything the transformer is conditioned on, shared by every image of one call."""

    text: Tokens  # [1, L, C], or [2, L, C] = [uncond; cond] with CFG
    refs: Tokens | None  # the source (edits) then the reference images, sequence [source, ref 1, ref 2, ...]
    source: _SourceLatents | None
    ip_tokens: Tensor | None


@dataclass(frozen=True)
class _Start:
    """One image's denoising loop: its starting latents, schedule and the per-step blend of an inpainting."""

    x: Tensor
    x_ids: Tensor
    timesteps: list[float]
    blend: Callable[[Tensor, float], Tensor] | None


ProgressCallback = Callable[[Progress], None]
StageHook = Callable[[str], AbstractContextManager]  # a stage's name -> a context the stage runs in


class Flux2Pipeline:
    """Keeps a model's text encoder, transformer and autoencoder loaded and generates images with them.

    Components may be passed in already built (tests, custom weights); otherwise they are loaded by name.
    `cpu_offload` applies flux2.transforms.offload: models stay on the CPU and visit the device only for the
    stages that use them. `upsampler` rewrites prompts (never failing a generation), `safety` screens the prompt,
    the references and the outputs, and `watermark` (on by default; None turns it off) marks every output.
    `progress` hears of each component loaded (stage "load"). `ip_adapter` (flux2.ip_adapter) adds image-prompt
    tokens to the text stream. `run(request)` serves a GenerationRequest; `generate`, `edit`, `img2img`,
    `inpaint` and `outpaint` build one from keyword arguments. A request's `loras` apply to it alone;
    `fuse_loras` merges a set into the weights for every request until `unfuse_loras`.
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
        self.stage_hooks: list[StageHook] = []  # contexts every stage runs in (flux2.transforms)
        self._lora_files: LoraFiles | None = None  # made on first use of a LoRA
        self._encoded: OrderedDict[tuple, Tensor] = OrderedDict()  # (encoder, texts) -> context, newest last
        self.tiling: Tiling = None  # decode in tiles: None above TilingConfig.auto_above_pixels, True / False forced
        if not self.info.needs_files:
            log.warning("model %r has random weights: it is a self-test and produces noise images", self.info.name)
        paths = self._locate(weights_dir, flow_model, ae, text_encoder)
        given = {"text encoder": text_encoder, "transformer": flow_model, "autoencoder": ae}
        home = torch.device("cpu") if cpu_offload else self.device  # offloaded models load straight to the CPU
        self.text_encoder, self.flow_model, self.ae = self._load_missing(given, paths, home, progress).values()
        self._check_components()
        if self.device.type == "cpu":  # NHWC, folded upsample and Winograd convs (benchmarks/ae_speed.py)
            cpu_autoencoder(self.ae)
        self.safety = self._safety_policy(safety)
        if cpu_offload:
            from flux2.transforms.offload import cpu_offload as offload

            offload(self)

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
        if not self.info.needs_files or not parts:
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

    def generate(self, prompt: str, *, callback: ProgressCallback | None = None, cancel: threading.Event | None = None,
                 **settings) -> list[GeneratedImage]:  # fmt: skip
        """Text-to-image, or editing when `reference_images` are given. `settings` are GenerationRequest fields
        (flux2.request: each one's default, range and per-model rule); image i uses seed + i.

        CFG: the klein base models always run it with `guidance` as the scale and `negative_prompt` (empty by
        default); other models run it only when `true_cfg_scale` is given (twice the cost). `callback` receives
        Progress events; setting `cancel` stops between steps with GenerationCancelled. Raises ContentFlagged
        when the safety policy flags the prompt or a reference image; a flagged output comes back without its
        image. `upsample=False` skips the pipeline's upsampler for this call.
        """
        request = GenerationRequest.from_settings("generate", prompt=prompt, **settings)
        return self.run(request, callback=callback, cancel=cancel)

    def edit(self, prompt: str, images: Sequence[ImageInput], **settings) -> list[GeneratedImage]:
        """Multi-reference editing: `generate` with the images as references."""
        if not images:
            raise ValueError("edit needs at least one input image")
        return self.generate(prompt, reference_images=tuple(images), **settings)

    def img2img(self, prompt: str, image: ImageInput, **settings) -> list[GeneratedImage]:
        """Start from the source image noised to `strength` (default 0.8; 1: pure noise) and denoise.

        The output has the source's size (floored to 16 px, scaled to at most `max_pixels`).
        """
        return self._edit("img2img", prompt, image, settings)

    def inpaint(self, prompt: str, image: ImageInput, mask: ImageInput, **settings) -> list[GeneratedImage]:
        """Regenerate where the mask is white and keep the source exactly where it is black.

        The source image is also a reference for the model (`source_as_reference`). `mask_blur` softens the
        mask's edge over about twice that many pixels: outward in the latents (the model blends into the kept
        area), inward in the final composite (every black pixel stays the source's). `crop_padding` edits only
        the mask's bounding box grown by that many pixels, scaled to `max_pixels`, and pastes it back: a small
        edit in a large photo runs at a sensible size. `strength` < 1 starts the masked region from the noised
        source. Extra `reference_images` follow the source.
        """
        return self._edit("inpaint", prompt, image, {**settings, "mask": mask})

    def outpaint(self, prompt: str, image: ImageInput, **settings) -> list[GeneratedImage]:
        """Extend the canvas by `left`, `right`, `top` and `bottom` px and fill the new border by inpainting.

        The new canvas must be a multiple of 16 px each way; the original pixels stay exactly as they were.
        """
        return self._edit("outpaint", prompt, image, settings)

    def _edit(self, mode: str, prompt: str, image: ImageInput, settings: dict) -> list[GeneratedImage]:
        callback, cancel = settings.pop("callback", None), settings.pop("cancel", None)
        request = GenerationRequest.from_settings(mode, prompt=prompt, mode=mode, image=image, **settings)
        return self.run(request, callback=callback, cancel=cancel)

    def run(
        self, request: GenerationRequest, *, callback: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[GeneratedImage]:  # fmt: skip
        """Run one request (resolved for this model here unless it already is)."""
        request = request.resolve(self.info)
        if request.true_cfg_scale is not None:
            log.warning("true CFG on %s runs the model twice per step: about twice the time", self.info.name)
        return self._generate(self._with_loras(self._plan(request)), _Reporter(callback, cancel))

    def generate_many(self, prompts: Sequence[str], *, batch_size: int = 4, callback: ProgressCallback | None = None,
                      cancel: threading.Event | None = None, **settings) -> list[GeneratedImage]:  # fmt: skip
        """Text-to-image for several prompts: one image per prompt per seed (`seed`, `num_images` as in
        `generate`), in prompt order. Where the run allows it (no CFG, no references: a distilled model's plain
        text-to-image) `batch_size` prompts are denoised together in one batch, for throughput; otherwise one
        after another. A batched image is its single run's up to the rounding of batched matrix products."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate_many needs a list of prompts (for one prompt use generate)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        requests = [GenerationRequest.from_settings("generate", prompt=p, **settings).resolve(self.info)
                    for p in prompts]  # fmt: skip
        together = all(self._batchable(request) for request in requests)
        size = batch_size if together else 1
        report, outputs = _Reporter(callback, cancel), []
        try:
            for first in range(0, len(requests), size):
                plans = [self._with_loras(self._plan(request)) for request in requests[first : first + size]]
                outputs += self._generate_together(plans, report) if together else self._generate(plans[0], report)
        except GenerationCancelled as cancelled:
            raise GenerationCancelled(str(cancelled), completed=outputs + cancelled.completed) from None
        return outputs

    def _batchable(self, request: GenerationRequest) -> bool:
        return (request.mode == "generate" and request.cfg_scale(self.info) is None and not request.reference_images
                and not request.ip_adapter_images)  # fmt: skip

    def _with_loras(self, plan: _Plan) -> _Plan:
        if not plan.request.loras and self._lora_files is None:
            return plan
        files = self.lora_files()
        return replace(plan, loras=files.record(files.use(plan.request.loras)))

    def fuse_loras(self, loras: Sequence[LoraChoice | str | tuple[str, float]]) -> None:
        """Merge LoRAs into the transformer's weights: every request runs at full speed with them, until
        `unfuse_loras` gives back the weights exactly as loaded. A request's own `loras` apply on top."""
        self.lora_files().fuse(tuple(LoraChoice.of(lora) for lora in loras))

    def unfuse_loras(self) -> None:
        self.lora_files().unfuse()

    def lora_files(self) -> "LoraFiles":
        if self._lora_files is None:
            from flux2.transforms.lora_files import LoraFiles

            self._lora_files = LoraFiles(self.flow_model)
        return self._lora_files

    def _generate(self, plan: _Plan, report: "_Reporter") -> list[GeneratedImage]:
        self.safety.prepare()
        plan = self._screened_and_upsampled(plan, report)
        outputs: list[GeneratedImage] = []
        with torch.inference_mode():
            cond = self._condition(plan, report)
            # One image at a time: image i is exactly what a single run with seed + i gives.
            with self._stage("sample"):
                for seed in plan.request.seeds:
                    try:
                        latents = self._denoise(plan, [seed], cond, report)
                        outputs.append(self._finish(self._decode(latents, report), plan, seed))
                    except GenerationCancelled as cancelled:
                        raise GenerationCancelled(str(cancelled), completed=outputs) from None
        return outputs

    def _generate_together(self, plans: list[_Plan], report: "_Reporter") -> list[GeneratedImage]:
        """Plain text-to-image for several prompts (one batch per seed offset); results in prompt order."""
        self.safety.prepare()
        plans = [self._screened_and_upsampled(plan, report) for plan in plans]
        done: dict[tuple[int, int], GeneratedImage] = {}
        with torch.inference_mode():
            texts = [self._encode_text(plan, report) for plan in plans]
            cond = _Conditioning(Tokens(torch.cat([t.tokens for t in texts]), torch.cat([t.ids for t in texts])),
                                 refs=None, source=None, ip_tokens=None)  # fmt: skip
            with self._stage("sample"):
                for i in range(plans[0].request.num_images):
                    seeds = [plan.request.seeds[i] for plan in plans]
                    try:
                        latents = self._denoise(plans[0], seeds, cond, report)
                        for b, (plan, seed) in enumerate(zip(plans, seeds, strict=True)):
                            one = Tokens(latents.tokens[b : b + 1], latents.ids[b : b + 1])
                            done[b, i] = self._finish(self._decode(one, report), plan, seed)
                    except GenerationCancelled as cancelled:
                        raise GenerationCancelled(str(cancelled), completed=[done[k] for k in sorted(done)]) from None
        return [done[key] for key in sorted(done)]

    def _screened_and_upsampled(self, plan: _Plan, report: "_Reporter") -> _Plan:
        """Screen the prompt and images; upsample the prompt (and screen the text another model wrote)."""
        self._screen(plan.request.prompt, plan.references + ([plan.source.image] if plan.source else []))
        if plan.request.upsample and self.upsampler is not None:
            plan = self._upsample(plan, report)
            if plan.text != plan.request.prompt:
                self._screen(plan.text, [])
        return plan

    # ------------------------------------------------------------------ preparation

    def _plan(self, request: GenerationRequest) -> _Plan:
        """Open every image the request names (each error says which) and set up an edit's source."""
        references = [open_image_input(img, f"reference image {i}") for i, img in enumerate(request.reference_images)]
        ip_images = [open_image_input(img, f"IP-Adapter image {i}") for i, img in enumerate(request.ip_adapter_images)]
        if ip_images and self.ip_adapter is None:
            raise ValueError("ip_adapter_images need an IP-Adapter: Flux2Pipeline(..., ip_adapter=IPAdapter...)")
        source = edit_source(request) if request.mode != "generate" else None
        if source is not None:
            width, height = source.work.size
        elif request.match_image_size is not None:
            w, h = references[request.match_image_size].size
            width, height = w // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, h // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        else:
            width, height = request.width, request.height
        return _Plan(request, width, height, references, ip_images, request.cfg_scale(self.info), source)

    # ------------------------------------------------------------------ stages

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Run a stage inside every stage hook (flux2.transforms: offload keeps a stage's models on the device)."""
        with ExitStack() as stack:
            for hook in self.stage_hooks:
                stack.enter_context(hook(name))
            yield

    def _condition(self, plan: _Plan, report: "_Reporter") -> _Conditioning:
        text = self._encode_text(plan, report)
        with self._stage("encode_images"):
            source = self._encode_source(plan)
            refs = self._encode_references(plan, source, report)
        ip_tokens = None
        if plan.ip_images and plan.request.ip_adapter_scale != 0:
            ip_tokens = self.ip_adapter.tokens(plan.ip_images).to(self.device, self.dtype)
        return _Conditioning(text, refs, source, ip_tokens)

    def _encode_text(self, plan: _Plan, report: "_Reporter") -> Tokens:
        """The prompt's tokens; a prompt encoded in one of the last few calls is not encoded again (the
        encoder is deterministic), so its stage, and an offloaded encoder's trip to the device, are skipped."""
        report(Progress("encode_text", 0, 1))
        # [uncond; cond], uncond first as in the reference
        texts = (plan.request.negative_prompt or "", plan.text) if plan.cfg is not None else (plan.text,)
        key = (id(self.text_encoder), texts)
        if (ctx := self._encoded.get(key)) is None:
            with self._stage("encode_text"):
                ctx = self.text_encoder(list(texts))
            ctx = ctx.to(self.device, self.dtype)  # [1, L, C], or [2, L, C] = [uncond; cond] with CFG
            self._encoded[key] = ctx
            while len(self._encoded) > PROMPT_CACHE_SIZE:
                self._encoded.popitem(last=False)
        self._encoded.move_to_end(key)
        report(Progress("encode_text", 1, 1))
        return Tokens(*batched_prc_txt(ctx))

    def _encode_references(self, plan: _Plan, source: _SourceLatents | None, report: "_Reporter") -> Tokens | None:
        """The reference tokens: an edit's source first (t = 10: exactly the latents it starts from), then the
        reference images."""
        source = source if source is not None and plan.source.as_reference else None
        if not plan.references and source is None:
            return None
        report(Progress("encode_references", 0, 1))
        parts = []
        if source is not None:
            ids = source.ids.clone()
            ids[..., 0] = REF_TIME_SCALE  # the grid of the target, one reference slot along in time
            parts.append((source.latents, ids))
        if plan.references:
            parts.append(encode_image_refs(self.ae, plan.references, self.dtype, slots_taken=len(parts)))
        report(Progress("encode_references", 1, 1))
        refs = torch.cat([tokens.to(self.device, self.dtype) for tokens, _ in parts], dim=1)
        return Tokens(refs, torch.cat([ids.to(self.device) for _, ids in parts], dim=1))

    def _encode_source(self, plan: _Plan) -> _SourceLatents | None:
        """Image-to-image and inpainting: the source's packed latents and the latent mask of what is redone."""
        source = plan.source
        if source is None:
            return None
        param = next(self.ae.parameters())
        latents, ids = batched_prc_img(self.ae.encode(image_to_tensor(source.work)[None].to(param.device, param.dtype)))
        mask = None
        if source.work_mask is not None:
            mask = latent_mask(source.work_mask, *source.work.size).to(self.device, self.dtype)
            if mask.max() == 0 and source.work_mask.getbbox() is not None:
                log.warning("the mask is too thin to reach the centre of any 16 px block: nothing will be "
                            "regenerated; use mask_blur > 0 or a wider mask")  # fmt: skip
        return _SourceLatents(latents.to(self.device, self.dtype), ids, mask)

    def _start(self, plan: _Plan, seeds: list[int], source: _SourceLatents | None) -> _Start:
        """Seeded noise drawn on the CPU in float32 in the patchified layout [1, C, h, w] per seed (stacked for
        a batch), then packed and moved (a seed gives the same noise on every device); an edit starts part-way,
        from the noised source."""
        shape = (1, self.flow_model.in_channels, plan.height // PIXELS_PER_TOKEN, plan.width // PIXELS_PER_TOKEN)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds])
        noise, ids = batched_prc_img(noise)
        noise, ids = noise.to(self.device, self.dtype), ids.to(self.device)
        timesteps = get_schedule(plan.request.num_steps, noise.shape[1])
        if source is None:
            return _Start(noise, ids, timesteps, blend=None)
        timesteps = truncated_schedule(timesteps, plan.request.strength)
        x = noised(source.latents, noise, timesteps[0])
        # Inpainting: the kept region follows the source, re-noised with the same noise.
        blend = _known_region(source.latents, noise, source.mask) if source.mask is not None else None
        return _Start(x, ids, timesteps, blend)

    def _denoise(self, plan: _Plan, seeds: list[int], cond: _Conditioning, report: "_Reporter") -> Tokens:
        start = self._start(plan, seeds, cond.source)
        steps = len(start.timesteps) - 1
        report(Progress("denoise", 0, steps))

        def on_step(i: int, total: int) -> None:
            if i > 0:
                report(Progress("denoise", i, total))

        if plan.cfg is None:
            loop = denoise_cached if self._kv_path(plan, cond.refs is not None) else denoise
            x = loop(
                self.flow_model, start.x, start.x_ids, cond.text.tokens, cond.text.ids, start.timesteps,
                plan.request.guidance, *_ref_args(cond), callback=on_step, blend=start.blend,
                txt_extra=cond.ip_tokens, txt_extra_scale=plan.request.ip_adapter_scale,
            )  # fmt: skip
        else:
            x = self._denoise_cfg(plan, start, cond, on_step, lambda: report(Progress("denoise", 0, steps)))
        report(Progress("denoise", steps, steps))
        return Tokens(x, start.x_ids)

    def _kv_path(self, plan: _Plan, has_refs: bool) -> bool:
        """The KV loop serves a distilled KV model with references, no CFG, and image-prompt tokens at scale 1."""
        ip_plain = not plan.ip_images or plan.request.ip_adapter_scale in (0, 1)
        return self.info.use_kv_cache and has_refs and plan.cfg is None and ip_plain

    def _denoise_cfg(self, plan: _Plan, start: _Start, cond: _Conditioning, on_step, restart) -> Tensor:
        """CFG batched when allowed and memory holds, else one half after the other (the same result)."""
        mode = plan.request.cfg_mode
        batched = mode == "batched" or (mode == "auto" and cond.ip_tokens is None)

        def run(batched: bool) -> Tensor:
            return denoise_cfg(
                self.flow_model, start.x, start.x_ids, cond.text.tokens, cond.text.ids, start.timesteps, plan.cfg,
                *_ref_args(cond), callback=on_step, blend=start.blend, txt_extra=cond.ip_tokens,
                txt_extra_scale=plan.request.ip_adapter_scale, batched=batched,
                model_guidance=plan.request.guidance if self.flow_model.params.use_guidance_embed else None,
            )  # fmt: skip

        try:
            return run(batched)
        except torch.OutOfMemoryError:
            if not batched or mode == "batched":
                raise
        log.warning("out of memory running [uncond; cond] together: running them one after the other")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        restart()
        return run(batched=False)

    def _decode(self, latents: Tokens, report: "_Reporter") -> Image.Image:
        report(Progress("decode", 0, 1))
        z = torch.cat(scatter_ids(latents.tokens, latents.ids)).squeeze(2)  # [B, C, h, w]
        ae_param = next(self.ae.parameters())
        pixels = decode(self.ae, z.to(ae_param.device, ae_param.dtype), self.tiling).float()
        report(Progress("decode", 1, 1))
        return tensor_to_image(pixels[0])

    def _screen(self, prompt: str, references: list[Image.Image]) -> None:
        verdicts = [self.safety.check_prompt(prompt)] + [self.safety.check_reference(im) for im in references]
        for verdict in verdicts:
            if verdict is not None:
                raise ContentFlagged(verdict)

    def _upsample(self, plan: _Plan, report: "_Reporter") -> _Plan:
        report(Progress("upsample", 0, 1))
        prompt = plan.request.prompt
        try:
            result = self.upsampler.upsample(prompt, plan.references + ([plan.source.image] if plan.source else []))
        except Exception as err:  # any upsampler, ours or not, must never fail a generation
            log.warning("prompt upsampling failed, generating with the original prompt: %s", err)
            result = UpsampleResult.fallback(prompt, f"{type(err).__name__}: {err}")
        report(Progress("upsample", 1, 1, detail=result.error or "", upsampled_prompt=result.upsampled))
        return replace(plan, upsampled=result)

    def _finish(self, image: Image.Image, plan: _Plan, seed: int) -> GeneratedImage:
        """Put an inpainted region back into its source, screen the output, then watermark it; a flagged output
        loses its pixels."""
        if plan.source is not None:
            image = plan.source.paste(image)
        verdict = self.safety.check_output(image)
        if verdict is not None:
            log.warning("output image (seed %d) withheld: %s", seed, verdict.detail)
            return GeneratedImage(None, self._record(plan, seed, watermark=None), flagged=verdict)
        method = None
        if self.watermark is not None and image.width * image.height >= MIN_PIXELS:
            image, method = embed(image, self.watermark), self.watermark.method
        elif self.watermark is not None:
            log.warning("image %dx%d is below the watermark's %d px minimum: not watermarked", *image.size, MIN_PIXELS)
        return GeneratedImage(image, self._record(plan, seed, watermark=method))

    def _record(self, plan: _Plan, seed: int, watermark: str | None) -> GenerationRecord:
        request, upsampled, source = plan.request, plan.upsampled, plan.source
        width, height = source.output_size if source else (plan.width, plan.height)
        return GenerationRecord(
            model=self.info.name,
            prompt=request.prompt,
            seed=seed,
            num_steps=request.num_steps,
            guidance=request.guidance,
            width=width,
            height=height,
            negative_prompt=request.negative_prompt,
            upsampled_prompt=upsampled.upsampled if upsampled is not None else None,
            upsampling_error=upsampled.error if upsampled is not None else None,
            references=tuple(image_sha256(im) for im in plan.references),
            kv_cache=self._kv_path(plan, bool(plan.references) or bool(source and source.as_reference)),
            mode=request.mode,
            strength=request.strength,
            source=source.settings.get("original", image_sha256(source.image)) if source else None,
            edit={k: v for k, v in source.settings.items() if k != "original"} if source else None,
            true_cfg_scale=None if self.info.uses_cfg else plan.cfg,
            ip_adapter_scale=request.ip_adapter_scale if plan.ip_images else None,
            loras=plan.loras,
            watermark=watermark,
            safety=self.safety.mode,
            note=self.info.output_note,
        )


class _Reporter:
    def __init__(self, callback: ProgressCallback | None, cancel: threading.Event | None):
        self.callback, self.cancel = callback, cancel

    def __call__(self, progress: Progress) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise GenerationCancelled(f"cancelled during {progress.stage}")
        if self.callback is not None:
            self.callback(progress)


def _ref_args(cond: _Conditioning) -> tuple[Tensor | None, Tensor | None]:
    """(img_cond_seq, img_cond_seq_ids) for the sampling loops."""
    return (cond.refs.tokens, cond.refs.ids) if cond.refs is not None else (None, None)


def _known_region(source: Tensor, noise: Tensor, mask: Tensor):
    """After each step: the generated tokens where mask is 1, the source re-noised to t_next where it is 0."""

    def blend(x: Tensor, t_next: float) -> Tensor:
        return mask * x + (1 - mask) * noised(source, noise, t_next)

    return blend
