"""The model work behind each job type: image generation, inpainting and element pictures.

Tasks run in the worker's thread, one at a time. Each writes its files in the job's workspace, moves them into
place under names made from the job id, and hands back one Asset for the worker to record with the job's
completion, so a job that runs twice after a crash never yields two.
"""

import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, select

from flux2.studio.config import StudioSettings
from flux2.studio.db import session_scope
from flux2.studio.jobs_store import JobStore
from flux2.studio.records import Asset, Element, Job
from flux2.studio.storage import MediaStore
from flux2.studio.worker import JobCancelled, TaskContext, TaskOutcome

log = logging.getLogger(__name__)

THUMBNAIL_FACTOR = 4  # thumbnails are a quarter of the image's size
VISUAL_TEMPLATES = {
    "character": "character sheet of {name}, {description}; full body, front and side views, neutral background",
    "location": "concept art of {name}, {description}; wide establishing shot, natural light",
    "object": "product shot of {name}, {description}; clean background, soft studio light",
}
PROGRESS_SPAN = {"load": (0, 5), "upsample": (5, 8), "encode_text": (8, 10), "encode_references": (10, 12),
                 "denoise": (12, 95), "decode": (95, 99)}  # fmt: skip


class PipelineHolder:
    """The service's one pipeline: given, or loaded on first use in the worker's thread and then kept."""

    def __init__(self, settings: StudioSettings, pipeline=None):
        self.settings, self._pipeline = settings, pipeline
        self._lock = threading.Lock()

    def get(self, report: Callable[[int, str], None]):
        with self._lock:
            if self._pipeline is None:
                from flux2.pipeline import Flux2Pipeline

                report(1, f"Loading {self.settings.model}")
                self._pipeline = Flux2Pipeline(self.settings.model, device=self.settings.device)
            return self._pipeline


@dataclass
class Tasks:
    """Runs a job of any type (the worker's TaskRunner)."""

    holder: PipelineHolder
    store: JobStore
    media: MediaStore
    engine: Engine

    def __call__(self, job: Job, ctx: TaskContext) -> TaskOutcome:
        from flux2.pipeline import GenerationCancelled

        run = {"image": self.image, "thumbnail": self.image, "advanced": self.image, "inpaint": self.inpaint,
               "visualize": self.visualize}.get(job.type)  # fmt: skip
        if run is None:
            raise ValueError(f"unknown job type {job.type!r}")
        if job.project_id is None:
            raise ValueError("the job has no project: its image would have nowhere to go")
        # The seed is chosen and recorded before the run, so a run repeated after a crash makes the same image.
        seed = job.seed if job.seed is not None else random.randrange(2**31)
        self.store.annotate(job.id, seed=seed)
        job.params = {**job.params, "seed": seed}
        try:
            return run(job, ctx)
        except GenerationCancelled as err:
            raise JobCancelled(job.id) from err
        finally:
            self.media.clear_workspace(job.id)

    # ------------------------------------------------------------------ job types

    def image(self, job: Job, ctx: TaskContext) -> TaskOutcome:
        p = job.params
        pipe = self.holder.get(ctx.report)
        prompt, references = self._references(job.project_id, p["prompt"], p.get("reference_images", []))
        settings = model_settings(pipe.info, p)
        if notes := settings_notes(pipe.info, p):
            ctx.report(1, notes)
        out = self._run(ctx, pipe.generate, prompt, width=p["width"], height=p["height"], seed=p.get("seed"),
                        reference_images=references, **settings)  # fmt: skip
        urls = [self.media.url_for(path) for path in references]
        meta = {"prompt": prompt, "negative_prompt": p.get("negative_prompt") or "", "reference_images": urls}
        outcome = self._outcome(job, out, meta, extra={"type": "thumbnail" if job.type == "thumbnail" else "image"})
        return replace(outcome, message=f"Image ready; {notes}") if notes else outcome

    def inpaint(self, job: Job, ctx: TaskContext) -> TaskOutcome:
        p = job.params
        pipe = self.holder.get(ctx.report)
        image, mask = self.media.resolve(p["image_path"], "image_path"), self.media.resolve(p["mask_path"], "mask_path")
        if notes := settings_notes(pipe.info, p):
            ctx.report(1, notes)
        out = self._run(ctx, pipe.inpaint, p["prompt"], image, mask, seed=p.get("seed"),
                        strength=p.get("strength", 1.0), mask_blur=p.get("mask_blur", 8.0),
                        **model_settings(pipe.info, p))  # fmt: skip
        meta = {"prompt": p["prompt"], "source": "inpaint", "original_image": p["image_path"], "mask": p["mask_path"]}
        return self._outcome(job, out, meta, extra={"type": "inpaint"})

    def visualize(self, job: Job, ctx: TaskContext) -> TaskOutcome:
        p = job.params
        element = self._element(p["element_id"])
        prompt = p.get("prompt_override") or VISUAL_TEMPLATES[element.type].format(
            name=element.name, description=element.description or element.name
        )
        pipe = self.holder.get(ctx.report)
        if notes := settings_notes(pipe.info, p):
            ctx.report(1, notes)
        out = self._run(ctx, pipe.generate, prompt, width=p.get("width", 1024), height=p.get("height", 1024),
                        seed=p.get("seed"), **model_settings(pipe.info, p))  # fmt: skip
        outcome = self._outcome(job, out, {"prompt": prompt, "element_id": element.id}, extra={"type": "visualize"})

        def point_element_at(asset: Asset) -> None:
            with session_scope(self.engine) as session:
                stored = session.get(Element, element.id)
                if stored is not None:
                    stored.image_path = asset.url

        return replace(outcome, on_complete=point_element_at)

    # ------------------------------------------------------------------ shared steps

    def _run(self, ctx: TaskContext, method, *args, **kwargs):
        """One image from a pipeline method, with progress and cancellation; a withheld image is an error."""
        [out] = method(*args, **kwargs, callback=progress_reporter(ctx.report), cancel=ctx.cancel)
        if out.image is None:
            raise ValueError(f"the output was withheld by the safety policy: {out.flagged.detail}")
        self.store.annotate(ctx.job.id, seed=out.record.seed, enhanced_prompt=out.record.upsampled_prompt)
        return out

    def _outcome(self, job: Job, out, meta: dict, extra: dict) -> TaskOutcome:
        """Save the image (JPEG q95, with its record and watermark) and a quarter-size thumbnail under the job's
        name, and describe the Asset to record."""
        from flux2.provenance import save_with_provenance

        project = job.project_id
        workspace = self.media.job_workspace(job.id)
        image_file = save_with_provenance(out.image, workspace / f"{job.id}.jpg", out.record.to_dict())
        thumb = out.image.resize((max(1, out.image.width // THUMBNAIL_FACTOR),
                                  max(1, out.image.height // THUMBNAIL_FACTOR)))  # fmt: skip
        thumb_file = workspace / f"{job.id}_thumb.jpg"
        thumb.save(thumb_file, quality=90)
        final = self.media.publish(image_file, self.media.generated_dir(project) / f"{job.id}.jpg")
        final_thumb = self.media.publish(thumb_file, self.media.thumbnails_dir(project) / f"{job.id}.jpg")
        self.media.clear_workspace(job.id)
        record = out.record
        asset = Asset(
            project_id=project, job_id=job.id, type="image", path=self.media.relative_path(final),
            url=self.media.url_for(final), thumbnail_url=self.media.url_for(final_thumb), filename=final.name,
            width=out.image.width, height=out.image.height,
            meta={**meta, "seed": record.seed, "steps": record.num_steps, "guidance": record.guidance,
                  "model": record.model, "record": record.to_dict()},
        )  # fmt: skip
        return TaskOutcome(asset, record.seed, extra=extra, discard=lambda: _remove(final, final_thumb))

    def _references(self, project_id: str | None, prompt: str, items: list[str]) -> tuple[str, list[Path]]:
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

    def _element(self, element_id: str) -> Element:
        with Session(self.engine) as session:
            element = session.get(Element, element_id)
        if element is None:
            raise ValueError(f"element {element_id} no longer exists")
        return element


TRUE_CFG_DEFAULT = 2.0  # the studio's former fixed true-CFG scale, when the request gives none above 1


def model_settings(info, params: dict) -> dict:
    """Steps, guidance and negative prompt as the model takes them. The distilled models run at their fixed
    settings (the studio front end sends 25 steps and guidance 2.0, which they cannot use); true CFG, and with it
    the negative prompt, only when asked for or on the base models."""
    settings = {}
    if not info.fixed_params:
        steps, guidance = params.get("num_inference_steps"), params.get("guidance_scale")
        settings["num_steps"] = info.num_steps if steps is None else steps
        settings["guidance"] = info.guidance if guidance is None else guidance
    true_cfg = params.get("enable_true_cfg") and not info.uses_cfg
    if true_cfg:
        scale = params.get("guidance_scale")
        settings["true_cfg_scale"] = scale if scale is not None and scale > 1 else TRUE_CFG_DEFAULT
    if params.get("negative_prompt") and (info.uses_cfg or true_cfg):
        settings["negative_prompt"] = params["negative_prompt"]
    return settings


def settings_notes(info, params: dict) -> str:
    """What of the request the model cannot use, said in the job's status message rather than dropped."""
    notes = []
    if info.fixed_params and (params.get("num_inference_steps"), params.get("guidance_scale")) != (None, None):
        notes.append(f"{info.name} is distilled: it runs {info.num_steps} steps at guidance {info.guidance}")
    if params.get("negative_prompt") and not info.uses_cfg and not params.get("enable_true_cfg"):
        notes.append("the negative prompt needs true CFG (enable_true_cfg) on this model: not used")
    return "; ".join(notes)


def progress_reporter(report: Callable[[int, str], None]):
    """Pipeline progress events as a percentage of the whole job, with a readable message."""

    def on_progress(event) -> None:
        low, high = PROGRESS_SPAN.get(event.stage, (0, 99))
        share = event.step / event.total if event.total else 1.0
        message = f"Step {event.step}/{event.total}" if event.stage == "denoise" else event.stage.replace("_", " ")
        report(int(low + (high - low) * share), message)

    return on_progress


def mentions(prompt: str, trigger_word: str) -> bool:
    """The trigger word as a word of its own (case-insensitive): "@Cat" is not in "@Cathedral"."""
    pattern = rf"(?<!\w){re.escape(trigger_word)}(?!\w)"
    return bool(trigger_word) and re.search(pattern, prompt, re.IGNORECASE) is not None


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
