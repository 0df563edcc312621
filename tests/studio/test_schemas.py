"""The studio's request bodies: front-end fields into GenerationRequest fields, checked once against the served
model, with errors and OpenAPI ranges in the front end's terms."""

import pytest
from fastapi import HTTPException

from flux2.registry import model_info
from flux2.request import MAX_SEED, MAX_SIDE, TRUE_CFG_DEFAULT
from flux2.studio.api.jobs import fitted
from flux2.studio.api.schemas import GenerateImageRequest, InpaintRequest, ShotConfig, VisualizeRequest
from flux2.studio.storage import MediaStore

KLEIN = model_info("flux.2-klein-4b")  # distilled: fixed steps and guidance
BASE = model_info("flux.2-klein-base-4b")  # CFG with guidance as its scale


@pytest.fixture
def media(tmp_path) -> MediaStore:
    return MediaStore(tmp_path)  # no LoRAs on offer


def test_front_end_fields_become_request_fields():
    body = GenerateImageRequest(project_id="p", prompt="a fox", negative_prompt="blur", width=512, height=256,
                                num_inference_steps=20, guidance_scale=3.5, seed=7, enable_true_cfg=True,
                                reference_images=["element-id"])  # fmt: skip
    request = body.to_request()
    assert (request.prompt, request.negative_prompt, request.width, request.height) == ("a fox", "blur", 512, 256)
    assert (request.num_steps, request.guidance, request.seed, request.true_cfg_scale) == (20, 3.5, 7, 3.5)
    assert request.reference_images == ()  # the ids are the job's; files are found when it runs
    enabled = GenerateImageRequest(project_id="p", prompt="x", enable_true_cfg=True, guidance_scale=1.0)
    assert enabled.to_request().true_cfg_scale == TRUE_CFG_DEFAULT
    assert GenerateImageRequest(project_id="p", prompt="x", guidance_scale=5.0).to_request().true_cfg_scale is None

    shot = ShotConfig(prompt="a shot", cfg_scale=4.0, num_inference_steps=30, width=770).to_request()
    assert (shot.guidance, shot.num_steps, shot.width, shot.height) == (4.0, 30, 768, 512)
    inpaint = InpaintRequest(image_path="/projects/p/a.png", prompt="a hat", strength=0.5, guidance_scale=3.0)
    request = inpaint.to_request("/projects/p/a.png", "/projects/p/m.png")
    assert (request.mode, request.image, request.mask) == ("inpaint", "/projects/p/a.png", "/projects/p/m.png")
    assert (request.strength, request.mask_blur, request.guidance) == (0.5, 8.0, 3.0)
    visual = VisualizeRequest(guidance_scale=2.0, seed=3).to_request("a sailor")
    assert (visual.prompt, visual.guidance, visual.seed, visual.width) == ("a sailor", 2.0, 3, None)


def test_defaults_are_the_models_and_what_it_cannot_use_is_noted(media):
    body = GenerateImageRequest(project_id="p", prompt="x")
    request, notes = fitted(body, body.to_request(), KLEIN, media)
    assert (request.width, request.height, request.num_steps, request.guidance) == (1024, 1024, 4, 1.0)
    assert isinstance(request.seed, int) and request.resolved_for == KLEIN.name and notes == ()
    sent = GenerateImageRequest(project_id="p", prompt="x", num_inference_steps=25, guidance_scale=2.0,
                                negative_prompt="blur")  # fmt: skip
    request, notes = fitted(sent, sent.to_request(), KLEIN, media)
    assert (request.num_steps, request.guidance, request.negative_prompt) == (4, 1.0, None)
    assert any("distilled" in note for note in notes) and any("negative prompt" in note for note in notes)
    request, notes = fitted(sent, sent.to_request(), BASE, media)
    assert (request.num_steps, request.guidance, request.negative_prompt, notes) == (25, 2.0, "blur", ())


def test_a_value_out_of_range_is_a_422_naming_the_front_end_field_whatever_the_model(media):
    cases = [
        (GenerateImageRequest(project_id="p", prompt="x", num_inference_steps=0), "num_inference_steps"),
        (GenerateImageRequest(project_id="p", prompt="x", guidance_scale=-1), "guidance_scale"),
        (GenerateImageRequest(project_id="p", prompt="x", width=100), "width"),
        (GenerateImageRequest(project_id="p", prompt="x", seed=MAX_SEED + 1), "seed"),
        (ShotConfig(prompt="x", cfg_scale=31), "cfg_scale"),
    ]
    visual = VisualizeRequest(height=8)
    requests = [(body, body.to_request(), field) for body, field in cases]
    requests.append((visual, visual.to_request("x"), "height"))
    for body, request, field in requests:
        for model in (KLEIN, BASE):  # KLEIN runs its own steps and guidance: out of range is still refused
            with pytest.raises(HTTPException) as refused:
                fitted(body, request, model, media)
            assert refused.value.status_code == 422
            assert refused.value.detail.startswith(f"{field} must be "), refused.value.detail
    inpaint = InpaintRequest(image_path="/projects/p/a.png", prompt="x", strength=2, mask_blur=-1)
    with pytest.raises(HTTPException) as refused:
        fitted(inpaint, inpaint.to_request("/projects/p/a.png", "/projects/p/m.png"), KLEIN, media)
    assert refused.value.detail.startswith("strength must be a number in (0, 1]"), refused.value.detail
    visual = VisualizeRequest()  # an element's description can make its picture's prompt too long
    with pytest.raises(HTTPException) as refused:
        fitted(visual, visual.to_request("y" * 4001), KLEIN, media)
    assert refused.value.detail.startswith("prompt_override must be text of at most 4000"), refused.value.detail


def test_body_schemas_show_the_requests_ranges():
    fields = GenerateImageRequest.model_json_schema()["properties"]
    assert (fields["width"]["multipleOf"], fields["width"]["minimum"], fields["width"]["maximum"]) == (16, 16, MAX_SIDE)
    steps = fields["num_inference_steps"]
    assert steps["maximum"] == 200 and steps["x-request-field"] == "num_steps"
    assert (fields["guidance_scale"]["minimum"], fields["guidance_scale"]["maximum"]) == (0, 30)
    assert fields["seed"]["maximum"] == MAX_SEED and fields["prompt"]["maxLength"] == 4000
    assert fields["prompt"]["minLength"] == 1  # the studio's own rule: a job needs a prompt
    inpaint = InpaintRequest.model_json_schema()["properties"]
    assert inpaint["strength"]["exclusiveMinimum"] == 0 and inpaint["mask_blur"]["default"] == 8.0
