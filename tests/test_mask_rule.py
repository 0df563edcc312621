"""One mask rule for the Python API, the CLI and the studio (flux2.editing.check_mask_size): a mask of the
source's size or aspect ratio (within a pixel of rounding) is resized to the source; another shape is refused with
both sizes named."""

import io

import pytest
from PIL import Image
from studio_server import (
    create_project,
    image_bytes,
    running_studio,
    studio_settings,
    tiny_pipeline,
    upload,
    wait_terminal,
)

from flux2.editing import binary_mask, check_mask_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "mask,image", [((64, 64), (64, 64)), ((32, 32), (64, 64)), ((50, 33), (101, 67)), ((33, 17), (65, 33)),
                   ((128, 96), (64, 48))],
)  # fmt: skip
def test_a_mask_of_the_size_or_the_aspect_ratio_is_taken(mask, image):
    check_mask_size(mask, image)
    assert binary_mask(Image.new("L", mask, 255), image).size == image


@pytest.mark.parametrize("mask,image", [((32, 64), (64, 64)), ((64, 60), (64, 64)), ((40, 40), (101, 67))])
def test_another_aspect_ratio_is_refused_with_both_sizes(mask, image):
    message = f"mask is {mask[0]}x{mask[1]} px but the image is {image[0]}x{image[1]} px"
    with pytest.raises(ValueError, match=message):
        check_mask_size(mask, image)


def test_the_python_api_resizes_a_half_size_mask_and_refuses_another_shape():
    pipe, source = tiny_pipeline(), Image.new("RGB", (64, 64), "gray")
    half = Image.new("L", (32, 32), 0)
    half.paste(255, (8, 8, 24, 24))
    [out] = pipe.inpaint("a hat", source, half, seed=1, mask_blur=0)
    assert out.image.size == (64, 64) and out.record.mode == "inpaint"
    with pytest.raises(ValueError, match="mask is 32x64 px but the image is 64x64 px"):
        pipe.inpaint("a hat", source, Image.new("L", (32, 64), 255), seed=1)


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_studio_takes_a_half_size_mask_and_refuses_another_shape_naming_both_sizes(tmp_path):
    with running_studio(studio_settings(tmp_path)) as service:
        project = create_project(service.client, "Masks")
        image = upload(service.client, image_bytes(64, 64), project)["access_path"]
        answers = {}
        for size in ((32, 32), (32, 64)):
            mask = upload(service.client, png(size), project)["access_path"]
            answers[size] = service.client.post("/edit/inpaint", json={"image_path": image, "mask_path": mask,
                                                                       "prompt": "a hat"})  # fmt: skip
        assert answers[32, 32].status_code == 200, answers[32, 32].text
        job_id = answers[32, 32].json()["job_id"]
        service.client.post(f"/jobs/{job_id}/cancel")
        wait_terminal(service.client, job_id, timeout=120)
        refused = answers[32, 64]
        assert refused.status_code == 422 and "mask is 32x64 px but the image is 64x64 px" in refused.json()["detail"]
