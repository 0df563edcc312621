"""Job payloads: each job type's typed data, stored in Job.params and read back as it was queued; and the table
of their handlers."""

import json

import pytest

from flux2.registry import model_info
from flux2.request import GenerationRequest
from flux2.studio.payloads import PAYLOADS, ImageJob, InpaintJob, ShotJob, ThumbnailJob, VisualizeJob, read_payload
from flux2.studio.records import Job
from flux2.studio.tasks import HANDLERS, JOB_TYPES

TINY = model_info("tiny")


def resolved(**fields) -> GenerationRequest:
    return GenerationRequest(prompt="a fox", **fields).resolve(TINY)


PAYLOAD_EXAMPLES = [
    ImageJob(project_id="p1", request=resolved(seed=7), references=("el1", "/projects/p1/uploads/a.png"),
             notes=("tiny has no guidance: guidance_scale not used",)),
    ShotJob(project_id="p1", request=resolved(width=64, height=64)),
    ThumbnailJob(project_id="p1", shot_id="shot-1", request=resolved(width=64, height=64)),
    InpaintJob(project_id="p1", request=resolved(mode="inpaint", image="/projects/p1/a.png", mask="/projects/p1/m.png",
                                                 strength=0.6)),
    VisualizeJob(project_id="p1", element_id="el1", request=resolved()),
]  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOAD_EXAMPLES, ids=lambda payload: payload.job_type)
def test_a_payload_reads_back_as_it_was_stored(payload):
    params = json.loads(json.dumps(payload.to_json()))  # what the JSON column holds
    job = Job(id="job_1", type=payload.job_type, params=params)
    again = read_payload(job)
    assert type(again) is type(payload) and again == payload
    assert again.request.seed == payload.request.seed and again.request.resolved_for == TINY.name
    assert again.request.resolve(TINY) is again.request  # resolved once: the pipeline runs it as stored


def test_what_is_not_a_payload_of_this_version_is_refused_naming_the_job():
    older = Job(id="job_old", type="image", params={"prompt": "x", "width": 1024, "seed": None})
    with pytest.raises(ValueError, match="job_old.*'image' job payload"):
        read_payload(older)
    mislabelled = Job(id="job_odd", type="inpaint", params=PAYLOAD_EXAMPLES[0].to_json())
    with pytest.raises(ValueError, match="job_odd"):
        read_payload(mislabelled)
    incomplete = Job(id="job_cut", type="visualize", params={"type": "visualize", "project_id": "p1"})
    with pytest.raises(ValueError, match="job_cut.*incomplete"):
        read_payload(incomplete)
    with pytest.raises(ValueError, match="resolved"):  # no seed drawn yet: it would be drawn again on each run
        ImageJob(project_id="p1", request=GenerationRequest(prompt="x"))


def test_every_payload_type_has_a_handler_and_a_job_type():
    assert set(HANDLERS) == set(PAYLOADS.values())
    expected = {"image", "advanced", "thumbnail", "inpaint", "outpaint", "img2img", "visualize"}
    assert set(JOB_TYPES) == set(PAYLOADS) == expected
