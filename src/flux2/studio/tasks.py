"""The model work behind each job type: image generation (also a single-frame shot and a shot's storyboard
thumbnail), edits of a source picture (inpainting, outpainting, image-to-image) and element pictures; `HANDLERS`
maps each payload type to its handler.

Tasks run in the worker's thread, one at a time. Each runs the request its job was queued with (references,
sources and masks resolved to files now), writes its files in the job's workspace, moves them into place under
names made from the job id, and hands back one Asset for the worker to record with the job's completion, so a
job that runs twice after a crash never yields two.
"""

import atexit
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlmodel import Session, select

from flux2.request import GenerationRequest
from flux2.studio.config import StudioSettings
from flux2.studio.payloads import (
    ImageJob,
    Img2ImgJob,
    InpaintJob,
    JobPayload,
    OutpaintJob,
    ShotJob,
    ThumbnailJob,
    VisualizeJob,
)
from flux2.studio.records import Asset, Element, Shot
from flux2.studio.storage import MediaStore
from flux2.studio.worker import JobCancelled, Reporter, TaskContext, TaskResult

if TYPE_CHECKING:
    from flux2.pipeline import Progress  # torch: loaded with the pipeline, in the worker

log = logging.getLogger(__name__)

THUMBNAIL_FACTOR = 4  # thumbnails are a quarter of the image's size
PROGRESS_SPAN = {"load": (0, 5), "upsample": (5, 8), "encode_text": (8, 10), "encode_references": (10, 12),
                 "denoise": (12, 95), "decode": (95, 99)}  # fmt: skip
ENHANCEMENT_OFF = ("prompt enhancement is off: the service has no prompt upsampler (flux2 serve --upsample, or "
                   "FLUX2_STUDIO_UPSAMPLE); the prompt is used as given")  # fmt: skip


class PipelineHolder:
    """The service's one pipeline: given, or loaded on first use in the worker's thread and then kept; with it,
    made once, the prompt upsampler the settings ask for (the settings decide: a given pipeline's own upsampler
    is replaced). An upsampler that cannot be made is logged, and enhancement stays off: the jobs still run."""

    def __init__(self, settings: StudioSettings, pipeline=None):
        self.settings, self._pipeline = settings, pipeline
        self._lock = threading.Lock()
        self._upsampler_set = False
        self.enhancement_off: str | None = None  # why enhance_prompt is not used (known after the first `get`)

    def get(self, report: Callable[[int, str], None]):
        with self._lock:
            if self._pipeline is None:
                self._pipeline = self._load(report)
            if not self._upsampler_set:
                self._pipeline.upsampler = self._make_upsampler(self._pipeline)
                self._upsampler_set = True
            return self._pipeline

    def _load(self, report: Callable[[int, str], None]):
        """The served model, with the settings' speed and memory transforms (as `flux2 generate`'s options)."""
        from flux2.pipeline import Flux2Pipeline
        from flux2.util import load_flow_model

        acceleration = self.settings.acceleration()
        acceleration.prepare()
        report(1, f"Loading {self.settings.model}")
        model = self.settings.model
        if self.settings.gpus > 1:
            return _split_pipeline(self.settings)
        # With block offload the transformer loads on the CPU; its blocks then visit the GPU one by one.
        flow_model = load_flow_model(model, device="cpu") if acceleration.block_offload else None
        pipe = Flux2Pipeline(model, device=self.settings.device, flow_model=flow_model)
        acceleration.apply(pipe)
        return pipe

    def enhancement_notes(self, request: GenerationRequest) -> tuple[str, ...]:
        """A note for the job's status when its request asks for enhancement that is off."""
        return (self.enhancement_off,) if request.upsample and self.enhancement_off else ()

    def _make_upsampler(self, pipe):
        from flux2.upsampling import make_upsampler

        mode = self.settings.upsample
        if mode == "none":
            self.enhancement_off = ENHANCEMENT_OFF
            return None
        try:
            return make_upsampler(mode, **self._upsampler_options(pipe))
        except Exception as err:  # a missing model or package must not stop the service or fail a job
            log.error("prompt upsampling (%s) could not be set up, enhancement stays off: %s", mode, err)
            self.enhancement_off = f"prompt enhancement is off: the {mode} upsampler could not be set up ({err})"
            return None

    def _upsampler_options(self, pipe) -> dict:
        """As `flux2 generate --upsample`: on [dev] the loaded Mistral encoder does local upsampling."""
        from flux2.text_encoder import Mistral3SmallEmbedder

        mode, model, url = self.settings.upsample, self.settings.upsample_model, self.settings.upsample_url
        encoder = pipe.text_encoder
        if mode == "local" and model is None and isinstance(encoder, Mistral3SmallEmbedder):
            return {"model": encoder.model, "processor": encoder.processor, "device": pipe.device}
        options = {"model": model} if model else {}
        return options | {"base_url": url} if mode == "openrouter" and url else options


def _split_pipeline(settings: StudioSettings):
    """The served model over `settings.gpus` processes (CUDA: one GPU each; else CPU processes)."""
    import torch

    from flux2.parallel import ParallelPipeline, ParallelWorker

    device = "cuda" if torch.cuda.is_available() and (settings.device or "cuda").startswith("cuda") else "cpu"
    pipe = ParallelPipeline(ParallelWorker(settings.model, settings.gpus, device=device,
                                           tensor=settings.tensor_parallel))  # fmt: skip
    atexit.register(pipe.close)  # the ranks stop with the service
    return pipe


@dataclass
class Tasks:
    """Runs a job of any type (the worker's TaskRunner)."""

    holder: PipelineHolder
    media: MediaStore
    engine: Engine  # elements and assets, read to resolve references

    def __call__(self, job_id: str, payload: JobPayload, ctx: TaskContext) -> TaskResult:
        from flux2.pipeline import GenerationCancelled

        handler = HANDLERS.get(type(payload))
        if handler is None:
            raise ValueError(f"no handler for {type(payload).__name__} jobs")
        try:
            return handler(self, job_id, payload, ctx)
        except GenerationCancelled as err:
            raise JobCancelled(job_id) from err
        finally:
            self.media.clear_workspace(job_id)

    # ------------------------------------------------------------------ job types

    def image(self, job_id: str, job: ImageJob, ctx: TaskContext) -> TaskResult:
        pipe = self.holder.get(ctx.report)
        prompt, references = self._references(job.project_id, job.request.prompt, job.references)
        notes = self._say_notes(job, ctx)
        out = self._run(pipe, job.request.with_inputs(prompt=prompt, reference_images=tuple(references)), ctx)
        urls = [self.media.url_for(path) for path in references]
        meta = {"prompt": prompt, "negative_prompt": job.request.negative_prompt or "", "reference_images": urls}
        result = self._result(job_id, job.project_id, out, meta, "image")
        return replace(result, message=f"Image ready; {notes}") if notes else result

    def thumbnail(self, job_id: str, job: ThumbnailJob, ctx: TaskContext) -> TaskResult:
        """An image job whose picture becomes the shot's thumbnail_url when the job completes."""
        self._check_shot(job.project_id, job.shot_id)
        result = self.image(job_id, job, ctx)
        return replace(result, event_type="thumbnail", shot_id=job.shot_id)

    def edit(self, job_id: str, job: InpaintJob | OutpaintJob | Img2ImgJob, ctx: TaskContext) -> TaskResult:
        """Inpainting, outpainting and image-to-image: the request's source (and mask) are media URLs, resolved
        to files now; the asset records them, and the job's mode is its `source` and its event's type."""
        pipe = self.holder.get(ctx.report)
        request = job.request
        self._say_notes(job, ctx)
        files = {"image": self.media.resolve(request.image, "image_path")}
        meta = {"prompt": request.prompt, "source": request.mode, "original_image": request.image}
        if request.mask is not None:
            files["mask"] = self.media.resolve(request.mask, "mask_path")
            meta["mask"] = request.mask
        out = self._run(pipe, request.with_inputs(**files), ctx)
        return self._result(job_id, job.project_id, out, meta, request.mode)

    def visualize(self, job_id: str, job: VisualizeJob, ctx: TaskContext) -> TaskResult:
        self._check_element(job.element_id)
        pipe = self.holder.get(ctx.report)
        self._say_notes(job, ctx)
        out = self._run(pipe, job.request, ctx)
        meta = {"prompt": job.request.prompt, "element_id": job.element_id}
        return replace(self._result(job_id, job.project_id, out, meta, "visualize"), element_id=job.element_id)

    # ------------------------------------------------------------------ shared steps

    def _say_notes(self, job: JobPayload, ctx: TaskContext) -> str:
        """What the model does not use of what was sent, in the job's status rather than dropped silently."""
        notes = "; ".join((*job.notes, *self.holder.enhancement_notes(job.request)))
        if notes:
            ctx.report(1, notes)
        return notes

    def _run(self, pipe, request: GenerationRequest, ctx: TaskContext):
        """One image, with progress and cancellation; a withheld image is an error. The request was resolved
        for the model when the job was queued, so it runs as stored: its seed included (LoRAs are stored by
        name, and found in the LoRA folder now)."""
        if request.loras:
            files = [replace(lora, path=str(self.media.lora_file(lora.path))) for lora in request.loras]
            request = request.with_inputs(loras=tuple(files))
        [out] = pipe.run(request, callback=progress_reporter(ctx.report), cancel=ctx.cancel)
        if out.image is None:
            raise ValueError(f"the output was withheld by the safety policy: {out.flagged.detail}")
        return out

    def _result(self, job_id: str, project: str, out, meta: dict, event_type: str) -> TaskResult:
        """Save the image (JPEG q95, with its record and watermark) and a quarter-size thumbnail under the job's
        name, and describe the Asset to record."""
        from flux2.provenance import save_with_provenance

        workspace = self.media.job_workspace(job_id)
        image_file = save_with_provenance(out.image, workspace / f"{job_id}.jpg", out.record.to_dict())
        thumb = out.image.resize((max(1, out.image.width // THUMBNAIL_FACTOR),
                                  max(1, out.image.height // THUMBNAIL_FACTOR)))  # fmt: skip
        thumb_file = workspace / f"{job_id}_thumb.jpg"
        thumb.save(thumb_file, quality=90)
        final = self.media.publish(image_file, self.media.generated_dir(project) / f"{job_id}.jpg")
        final_thumb = self.media.publish(thumb_file, self.media.thumbnails_dir(project) / f"{job_id}.jpg")
        self.media.clear_workspace(job_id)
        record = out.record
        asset = Asset(
            project_id=project, job_id=job_id, type="image", path=self.media.relative_path(final),
            url=self.media.url_for(final), thumbnail_url=self.media.url_for(final_thumb), filename=final.name,
            width=out.image.width, height=out.image.height,
            meta={**meta, "seed": record.seed, "steps": record.num_steps, "guidance": record.guidance,
                  "model": record.model, "record": record.to_dict()},
        )  # fmt: skip
        return TaskResult(asset, event_type, enhanced_prompt=record.upsampled_prompt)

    def _references(self, project_id: str, prompt: str, items: tuple[str, ...]) -> tuple[str, list[Path]]:
        """Element ids, asset ids and media paths to image files, plus every element of this project whose
        trigger word is in the prompt; explicit elements' trigger words are added to the prompt."""
        paths: list[Path] = []
        with Session(self.engine) as session:
            elements = session.exec(select(Element).where(Element.project_id == project_id)).all()
            by_id = {el.id: el for el in elements}
            for item in items:
                if item in by_id:
                    element = by_id[item]
                    if not mentions(prompt, element.trigger_word):
                        prompt = f"{prompt} {element.trigger_word}"
                    paths.append(self._element_image(element))
                elif (asset := session.get(Asset, item)) is not None and asset.project_id == project_id:
                    paths.append(self.media.resolve(asset.path, "reference_images"))
                else:
                    paths.append(self.media.resolve(item, "reference_images"))
            for element in elements:
                if element.image_path and mentions(prompt, element.trigger_word):
                    paths.append(self._element_image(element))
        return prompt, list(dict.fromkeys(paths))

    def _element_image(self, element: Element) -> Path:
        if not element.image_path:
            raise ValueError(f"element {element.name!r} ({element.id}) has no image yet: visualize or upload one")
        return self.media.resolve(element.image_path, "element image")

    def _check_shot(self, project_id: str, shot_id: str) -> None:
        with Session(self.engine) as session:
            if session.get(Shot, (project_id, shot_id)) is None:
                raise ValueError(f"shot {shot_id} of project {project_id} no longer exists")

    def _check_element(self, element_id: str) -> None:
        with Session(self.engine) as session:
            if session.get(Element, element_id) is None:
                raise ValueError(f"element {element_id} no longer exists")


Handler = Callable[[Tasks, str, JobPayload, TaskContext], TaskResult]
HANDLERS: dict[type[JobPayload], Handler] = {
    ImageJob: Tasks.image,
    ShotJob: Tasks.image,
    ThumbnailJob: Tasks.thumbnail,
    InpaintJob: Tasks.edit,
    OutpaintJob: Tasks.edit,
    Img2ImgJob: Tasks.edit,
    VisualizeJob: Tasks.visualize,
}
JOB_TYPES = tuple(payload.job_type for payload in HANDLERS)


def progress_reporter(report: Reporter):
    """Pipeline progress events as a percentage of the whole job, with a readable message; the upsampled prompt
    goes with the event that brings it."""

    def on_progress(event: "Progress") -> None:
        low, high = PROGRESS_SPAN.get(event.stage, (0, 99))
        share = event.step / event.total if event.total else 1.0
        report(int(low + (high - low) * share), progress_message(event), enhanced_prompt=event.upsampled_prompt)

    return on_progress


def progress_message(event: "Progress") -> str:
    if event.stage == "denoise":
        return f"Step {event.step}/{event.total}"
    if event.stage == "upsample" and event.step == event.total:
        if event.upsampled_prompt is not None:
            return "Prompt enhanced"
        return f"Prompt enhancement failed, the prompt is used as given: {event.detail or 'no reason given'}"
    return "enhancing prompt" if event.stage == "upsample" else event.stage.replace("_", " ")


def mentions(prompt: str, trigger_word: str) -> bool:
    """The trigger word as a word of its own (case-insensitive): "@Cat" is not in "@Cathedral"."""
    pattern = rf"(?<!\w){re.escape(trigger_word)}(?!\w)"
    return bool(trigger_word) and re.search(pattern, prompt, re.IGNORECASE) is not None
