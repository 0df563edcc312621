"""The web page `flux2 serve` answers at `/`, driven in Debian's Chromium through Playwright against the real
service (the tiny model) on 127.0.0.1, with the segmentation stand-in. Every request to another host is blocked
and counted: there must be none. Screenshots of the main views go to the test's tmp folder; with
FLUX2_README_SCREENSHOTS=1 they also replace the README's (docs/images/), so a plain test run leaves the tree as it
was."""

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from lora_files import lora_state_dict, low_rank, write
from PIL import Image
from studio_server import image_bytes, running_studio, studio_settings, tiny_pipeline, wait_status, wait_terminal

playwright_api = pytest.importorskip("playwright.sync_api", reason="the web page tests need playwright (test extra)")
expect = playwright_api.expect
# Every expectation waits up to 30 s, not Playwright's 5: a slow or busy CI box still shows each tiny-model image
# well within that (one took over 5 s on a loaded 2-core VM).
expect.set_options(timeout=30_000)

DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
LONG_STEPS = 200  # the most a request allows: a job that runs long enough to be cancelled or overtaken
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (never a browser download): installed with apt when missing."""
    if shutil.which("chromium") is None:
        done = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or shutil.which("chromium") is None:
            pytest.skip(f"Debian's chromium could not be installed: {done.stderr.strip()[-300:]}")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, sam):
    data_dir = tmp_path_factory.mktemp("web-studio")
    model = tiny_pipeline().flow_model
    factors = low_rank(model, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"])
    (data_dir / "loras").mkdir()
    write(data_dir / "loras" / "style.safetensors", lora_state_dict(factors, "kohya"))
    with running_studio(studio_settings(data_dir, segmentation_url=sam.url)) as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-screenshots")


class Page:
    """A browser tab on the studio's page, with every request to another host aborted and recorded."""

    def __init__(self, browser, studio, ready: bool = True, **context):
        self.studio = studio
        self.outside: list[str] = []
        self.context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context})
        self.context.route("**/*", self._only_the_studio)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.goto(studio.url + "/")
        if ready:
            expect(self.page.locator("body[data-ready=true]")).to_be_attached()

    def _only_the_studio(self, route) -> None:
        if route.request.url.startswith(self.studio.url + "/"):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def generate(self, prompt: str, steps: int | None = None, seed: str | None = None) -> None:
        page = self.page
        page.get_by_role("tab", name="Generate").click()
        page.get_by_label("Prompt", exact=True).fill(prompt)
        if steps is not None:
            page.get_by_label("Steps", exact=True).fill(str(steps))
        if seed is not None:
            page.locator("#g-seed").fill(seed)
        page.get_by_role("button", name="Generate", exact=True).click()

    def queue_item(self, prompt: str):
        return self.page.locator("#q-list li", has_text=prompt)

    def tile(self, prompt: str):
        return self.page.locator("#gallery li", has=self.page.get_by_role("img", name=prompt))


@pytest.fixture
def tab(browser, studio):
    opened = Page(browser, studio)
    yield opened
    opened.context.close()
    assert opened.outside == [], f"the page asked other hosts: {opened.outside}"
    studio.client.post("/queue/clear")
    if running := studio.client.get("/queue").json()["running"]:
        studio.client.post(f"/jobs/{running['job_id']}/cancel")
        wait_terminal(studio.client, running["job_id"])


def keep(page, shots: Path, name: str, docs: bool = False) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=shots / name, full_page=False)
    if docs and os.environ.get("FLUX2_README_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots / name, DOCS_IMAGES / name)


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def job_of(studio, prompt: str) -> dict:
    """The newest job with this prompt, as GET /status answers it."""
    from sqlmodel import Session, col, select

    from flux2.studio.records import Job

    with Session(studio.studio.engine) as session:
        job = session.exec(select(Job).where(Job.prompt == prompt).order_by(col(Job.created_at).desc())).first()
    assert job is not None, f"no job with the prompt {prompt!r}"
    return studio.client.get(f"/status/{job.id}").json()


# ---------------------------------------------------------------------------------------------- generate


def test_a_batch_shows_progress_then_each_image_with_its_record(tab, studio, shots):
    page = tab.page
    page.get_by_label("Batch count").fill("3")
    tab.generate("a lighthouse at dusk", steps=40, seed="100")  # seeds 100, 101, 102
    items = tab.queue_item("a lighthouse at dusk")
    running = page.locator("#q-list li[data-status=processing]")
    expect(running.locator("progress")).to_be_visible()
    expect(running.locator(".status")).to_contain_text("Step")  # live progress from SSE: "Step k/40"
    expect(tab.tile("a lighthouse at dusk")).to_have_count(1)
    keep(page, shots, "web-main.png", docs=True)  # one image done, the next ones running and queued
    expect(tab.tile("a lighthouse at dusk")).to_have_count(3, timeout=TIMEOUT_MS)
    expect(items.and_(page.locator("[data-status=completed]"))).to_have_count(3)
    seeds = [tile.locator(".seed").inner_text() for tile in tab.tile("a lighthouse at dusk").all()]
    assert sorted(seeds) == ["seed 100", "seed 101", "seed 102"]
    for tile in tab.tile("a lighthouse at dusk").all():
        assert tile.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")

    tab.tile("a lighthouse at dusk").first.locator("button.open").click()
    record = page.locator("#d-record")
    expect(record).to_contain_text("a lighthouse at dusk")
    expect(record).to_contain_text("tiny")
    expect(record).to_contain_text("102")  # the newest first
    expect(page.locator("#d-watermark")).to_contain_text("watermark found")
    keep(page, shots, "web-details.png")


def test_cancel_stops_a_running_job(tab, studio):
    tab.generate("a job to stop", steps=LONG_STEPS)
    item = tab.queue_item("a job to stop")
    expect(item.locator(".status")).to_contain_text("Step")
    item.get_by_role("button", name="Cancel").click()
    expect(item).to_have_attribute("data-status", "cancelled")
    job = job_of(studio, "a job to stop")
    assert job["status"] == "cancelled" and job["progress"] < 100 and job["asset_id"] is None
    expect(tab.tile("a job to stop")).to_have_count(0)


def test_a_queued_job_moved_up_runs_first(tab, studio):
    tab.generate("the long one", steps=LONG_STEPS)
    expect(tab.queue_item("the long one").locator(".status")).to_contain_text("Step")
    tab.generate("second in line", steps=2)
    tab.generate("third in line", steps=2)
    expect(tab.page.locator("#q-list li[data-status=pending]")).to_have_count(2)
    tab.queue_item("third in line").get_by_role("button", name="earlier").click()
    expect(tab.page.locator("#q-list li[data-status=pending]").first).to_contain_text("third in line")
    assert [job["prompt"] for job in studio.client.get("/queue").json()["queued"]] == [
        "third in line",
        "second in line",
    ]

    tab.queue_item("the long one").get_by_role("button", name="Cancel").click()
    third = wait_terminal(studio.client, job_of(studio, "third in line")["job_id"])
    second = wait_terminal(studio.client, job_of(studio, "second in line")["job_id"])
    assert third["status"] == second["status"] == "completed"
    assert third["started_at"] < second["started_at"]  # moved up: it ran first although queued later


def test_clear_cancels_every_queued_job(tab, studio):
    tab.generate("running while cleared", steps=LONG_STEPS)
    expect(tab.queue_item("running while cleared").locator(".status")).to_contain_text("Step")
    tab.generate("cleared one", steps=2)
    tab.generate("cleared two", steps=2)
    expect(tab.page.locator("#q-list li[data-status=pending]")).to_have_count(2)
    tab.page.get_by_role("button", name="Clear queued").click()
    expect(tab.page.locator("#q-list li[data-status=pending]")).to_have_count(0)
    assert job_of(studio, "cleared one")["status"] == job_of(studio, "cleared two")["status"] == "cancelled"
    assert job_of(studio, "running while cleared")["status"] == "processing"  # the running job goes on


# ---------------------------------------------------------------------------------------------- reuse


def test_reuse_settings_from_the_gallery_makes_the_same_pixels(tab, studio):
    page = tab.page
    tab.generate("a red fox", steps=3)  # no seed given: the service draws one and records it
    expect(tab.tile("a red fox")).to_have_count(1)
    first = job_of(studio, "a red fox")

    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_label("Steps", exact=True).fill("9")
    tab.tile("a red fox").locator("button.open").click()
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#g-seed")).to_have_value(str(first["seed"]))
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(tab.tile("a red fox")).to_have_count(2)
    again = job_of(studio, "a red fox")
    assert again["job_id"] != first["job_id"] and again["seed"] == first["seed"]
    assert np.array_equal(pixels(studio.client, first["output_url"]), pixels(studio.client, again["output_url"]))

    page.locator("#g-seed").fill(str(first["seed"] + 1))  # negative control: another seed
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(tab.tile("a red fox")).to_have_count(3)
    other = job_of(studio, "a red fox")
    assert np.abs(pixels(studio.client, other["output_url"]) - pixels(studio.client, first["output_url"])).mean() > 5


def test_a_lora_with_strength_is_recorded_and_reused(tab, studio):
    page = tab.page
    page.get_by_label("LoRA file").select_option("style.safetensors")
    page.get_by_role("button", name="Add LoRA").click()
    page.locator("#g-lora-list").get_by_label("Strength").fill("0.75")
    tab.generate("with a style", steps=2, seed="7")
    expect(tab.tile("with a style")).to_have_count(1)
    page.get_by_role("button", name="Remove LoRA style.safetensors").click()
    tab.tile("with a style").locator("button.open").click()
    expect(page.locator("#d-record")).to_contain_text("style.safetensors × 0.75")
    page.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#g-lora-list").get_by_label("Strength")).to_have_value("0.75")

    page.get_by_role("button", name="Remove LoRA style.safetensors").click()
    tab.generate("without a style", steps=2, seed="7")  # negative control: the LoRA changes the pixels
    expect(tab.tile("without a style")).to_have_count(1)
    styled, plain = job_of(studio, "with a style"), job_of(studio, "without a style")
    assert np.abs(pixels(studio.client, styled["output_url"]) - pixels(studio.client, plain["output_url"])).mean() > 1


def test_a_gallery_image_dragged_in_becomes_a_reference(tab, studio):
    page = tab.page
    tab.generate("the source", steps=2, seed="3")
    expect(tab.tile("the source")).to_have_count(1)
    tab.tile("the source").get_by_role("img").drag_to(page.locator("#g-ref-drop"))
    expect(page.locator("#g-ref-list li")).to_have_count(1)
    tab.generate("with a reference", steps=2, seed="3")
    expect(tab.tile("with a reference")).to_have_count(1)
    source = job_of(studio, "the source")
    [image] = [
        i
        for i in studio.client.get(f"/projects/{source['project_id']}/images").json()
        if i["meta"].get("prompt", "") == "with a reference"
    ]
    assert image["meta"]["reference_images"] == [source["output_url"]]


def test_an_element_with_a_picture_is_made_and_used_as_a_reference(tab, studio):
    page = tab.page
    page.get_by_role("tab", name="Elements").click()
    page.get_by_label("Name").fill("Old Tom")
    page.get_by_label("Description").fill("a fisherman")
    page.get_by_label("Picture (optional)").set_input_files(
        files=[{"name": "tom.png", "mimeType": "image/png", "buffer": image_bytes(64, 64, "sienna")}]
    )
    page.get_by_role("button", name="Add element").click()
    card = page.locator("#el-list li", has_text="Old Tom")
    expect(card).to_contain_text("@OldTom")
    card.get_by_role("button", name="Use Old Tom as a reference").click()
    expect(page.locator("#g-ref-list li", has_text="Old Tom")).to_have_count(1)
    tab.generate("a portrait", steps=2, seed="5")
    expect(tab.tile("a portrait")).to_have_count(1)
    [element] = studio.client.get(f"/projects/{job_of(studio, 'a portrait')['project_id']}/elements").json()
    [image] = [
        i
        for i in studio.client.get(f"/projects/{element['project_id']}/images").json()
        if i["meta"].get("prompt", "").startswith("a portrait")
    ]
    assert image["meta"]["reference_images"] == [element["image_path"]]


def test_compare_two_images_and_a_grid_over_seeds(tab, studio, shots):
    page = tab.page
    tab.generate("grid base", steps=2, seed="11")
    expect(tab.tile("grid base")).to_have_count(1)
    tab.tile("grid base").locator("button.open").click()
    page.get_by_label("Values").fill("12, 13")
    page.get_by_role("button", name="Queue grid").click()
    grid = page.locator("#compare")
    expect(grid.get_by_role("heading")).to_have_text("X/Y grid")
    expect(grid.locator("figure")).to_have_count(2)
    expect(grid.locator("figure", has_text="seed 12").locator("img[src*='/generated/']")).to_have_count(1)
    expect(grid.locator("figure", has_text="seed 13").locator("img[src*='/generated/']")).to_have_count(1)
    keep(page, shots, "web-grid.png")
    grid.get_by_role("button", name="Close").click()

    expect(tab.tile("grid base")).to_have_count(3)
    for tile in tab.tile("grid base").all()[:2]:
        tile.get_by_role("checkbox").check()
    page.get_by_role("button", name="Compare selected").click()
    expect(grid.locator("figure img")).to_have_count(2)
    assert sorted(grid.locator("figcaption").all_inner_texts())[0].startswith("seed 1")


def test_download_and_delete_from_the_gallery(tab, studio):
    page = tab.page
    tab.generate("to throw away", steps=2, seed="21")
    expect(tab.tile("to throw away")).to_have_count(1)
    job = job_of(studio, "to throw away")
    tab.tile("to throw away").locator("button.open").click()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == f"{job['job_id']}.jpg"
    assert Path(download.value.path()).read_bytes() == studio.client.get(job["output_url"]).content

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    expect(tab.tile("to throw away")).to_have_count(0)
    assert studio.client.get(job["output_url"]).status_code == 404


# ---------------------------------------------------------------------------------------------- inpainting


def open_editor(tab, color: str) -> None:
    page = tab.page
    page.get_by_role("tab", name="Edit").click()
    page.get_by_label("Upload a picture to edit").set_input_files(
        files=[{"name": "source.png", "mimeType": "image/png", "buffer": image_bytes(256, 256, color)}]
    )
    expect(page.locator("#e-stage")).to_be_visible()
    expect(page.locator("#e-status")).to_contain_text("256 × 256")


def inpainted(tab, studio, prompt: str) -> tuple[dict, np.ndarray]:
    """Queue the inpainting from the page; the finished job and the mask it used (0/255)."""
    page = tab.page
    page.get_by_label("Prompt for the masked area").fill(prompt)
    page.get_by_role("button", name="Inpaint").click()
    expect(page.locator("#e-status")).to_contain_text("Queued inpainting job")
    job_id = page.locator("#e-status").get_attribute("data-job")
    job = wait_status(studio.client, job_id, lambda s: s["status"] in ("completed", "failed", "cancelled"), 60)
    assert job["status"] == "completed", job
    mask = pixels(studio.client, page.locator("#e-status").get_attribute("data-mask"))[:, :, 0]
    return job, mask


def image_point(tab, x: int, y: int) -> tuple[float, float]:
    """Where pixel (x, y) of the 256 px picture is on the screen."""
    box = tab.page.locator("#e-mask").bounding_box()
    return box["x"] + x * box["width"] / 256, box["y"] + y * box["height"] / 256


def test_inpaint_with_a_painted_mask_on_a_gallery_image(tab, studio, shots):
    page = tab.page
    tab.generate("a quiet harbour", steps=3)
    tab.tile("a quiet harbour").locator("button.open").click()
    page.get_by_role("button", name="Edit", exact=True).click()
    expect(page.locator("#e-status")).to_contain_text("256 × 256")
    page.get_by_label("Brush size").fill("24")
    mouse = page.mouse
    mouse.move(*image_point(tab, 40, 128))
    mouse.down()
    for x in range(40, 217, 8):
        mouse.move(*image_point(tab, x, 128))
    mouse.up()
    keep(page, shots, "web-inpaint.png", docs=True)

    job, mask = inpainted(tab, studio, "a white stripe")
    assert mask.shape == (256, 256)
    assert (mask[124:133, 44:213] == 255).all()  # under the stroke
    assert (mask[:100] == 0).all() and (mask[160:] == 0).all() and (mask[:, :20] == 0).all()  # away from it
    expect(page.locator(f"#gallery li[data-job='{job['job_id']}']")).to_have_count(1)


def test_inpaint_with_a_click_to_segment_mask(tab, studio, sam):
    page = tab.page
    open_editor(tab, "olive")
    page.get_by_role("button", name="Click to segment").click()
    before = len(sam.requests)
    page.mouse.click(*image_point(tab, 64, 192))
    expect(page.locator("#e-status")).to_contain_text("Mask from 1 point")
    path, fields = sam.requests[before]
    [[x, y]] = json.loads(fields["points"])
    assert path == "/predict/mask" and abs(x - 64) <= 1 and abs(y - 192) <= 1

    _, mask = inpainted(tab, studio, "a bright square")
    # The stand-in paints a square of half-side 16 around the point: that, and nothing else, is the mask.
    assert (mask[180:204, 52:76] == 255).all()
    assert (mask[:170] == 0).all() and (mask[:, 90:] == 0).all()


def test_a_mask_from_words_inverted(tab, studio, sam):
    page = tab.page
    open_editor(tab, "tan")
    page.get_by_label("Mask from words").fill("the boat")
    page.get_by_role("button", name="Make mask").click()
    page.wait_for_function(
        "() => document.querySelector('#e-mask').getContext('2d').getImageData(10, 10, 1, 1).data[3] > 0"
    )
    assert sam.requests[-1][0] == "/segment/text" and sam.requests[-1][1]["text"] == "the boat"
    page.get_by_role("button", name="Invert").click()
    _, mask = inpainted(tab, studio, "calm water")
    assert (mask[:, :120] == 0).all() and (mask[:, 136:] == 255).all()  # the stand-in's left half, inverted


# ---------------------------------------------------------------------------------------------- outpaint, img2img


def edited(tab, studio, button: str, queued: str) -> dict:
    """Queue the Edit view's job with `button`; the finished job, once its image is in the gallery."""
    page = tab.page
    page.get_by_role("button", name=button, exact=True).click()
    expect(page.locator("#e-status")).to_contain_text(queued)
    job = wait_terminal(studio.client, page.locator("#e-status").get_attribute("data-job"), 60)
    assert job["status"] == "completed", job
    expect(page.locator(f"#gallery li[data-job='{job['job_id']}']")).to_have_count(1)
    return job


def test_outpaint_margins_grow_the_picture(tab, studio, shots):
    page = tab.page
    open_editor(tab, "teal")
    page.get_by_label("Outpaint").check()
    expect(page.locator("#e-mask")).to_be_hidden()  # no mask to paint: the margins are the mask
    page.get_by_label("Prompt for the wider picture").fill("a wider teal wall")
    before = studio.job_count()
    page.get_by_role("button", name="Outpaint", exact=True).click()
    expect(page.locator("#e-left-error")).to_contain_text("give at least one margin above 0")
    assert studio.job_count() == before

    page.get_by_label("Left", exact=True).fill("32")
    expect(page.locator("#e-left-error")).to_have_count(0)  # the margins changed: the message is gone
    page.get_by_label("Bottom", exact=True).fill("16")
    expect(page.locator("#e-result-size")).to_have_text("Result: 288 × 272 px")
    keep(page, shots, "web-outpaint.png", docs=True)
    job = edited(tab, studio, "Outpaint", "Queued outpainting job")
    out = pixels(studio.client, job["output_url"])
    assert out.shape == (272, 288, 3) and job["type"] == "outpaint"
    teal = np.array([0, 128, 128])
    assert np.abs(out[:256, 32:] - teal).mean() < 4  # the source, kept (JPEG, watermark)
    assert np.abs(out[:, :32] - teal).mean() > 10  # the new border: made, not teal

    page.locator(f"#gallery li[data-job='{job['job_id']}'] button.open").click()
    expect(page.locator("#d-record")).to_contain_text("outpaint")
    expect(page.locator("#d-record")).to_contain_text("left 32 px, bottom 16 px")
    expect(page.locator("#d-record")).to_contain_text("288 × 272")


def test_img2img_with_its_strength(tab, studio):
    page = tab.page
    open_editor(tab, "navy")
    page.get_by_label("Image to image").check()
    strength = page.locator("#e-strength")
    expect(strength).to_have_value("0.8")  # the mode's own default; inpainting's is 1
    expect(page.locator("#e-mask")).to_be_hidden()
    strength.fill("0.3")
    page.get_by_label("Prompt for the new picture").fill("navy at dusk")
    page.locator("#e-seed").fill("9")
    job = edited(tab, studio, "Image to image", "Queued image-to-image job")
    assert (job["type"], job["seed"]) == ("img2img", 9)
    assert pixels(studio.client, job["output_url"]).shape == (256, 256, 3)
    page.locator(f"#gallery li[data-job='{job['job_id']}'] button.open").click()
    record = page.locator("#d-record")
    expect(record).to_contain_text("img2img")
    expect(record.locator("dt:text-is('Strength') + dd")).to_have_text("0.3")
    page.get_by_role("button", name="Close").first.click()

    page.get_by_label("Inpaint").check()  # each mode keeps its strength
    expect(strength).to_have_value("1")
    page.get_by_label("Image to image").check()
    expect(strength).to_have_value("0.3")


# ---------------------------------------------------------------------------------------------- bad input


def test_a_bad_value_is_explained_next_to_its_field(tab, studio):
    page = tab.page
    before = studio.job_count()
    page.get_by_label("Prompt", exact=True).fill("too wide")
    page.get_by_label("Width", exact=True).fill("5000")
    page.get_by_label("Width", exact=True).press("Tab")
    expect(page.get_by_label("Width", exact=True)).to_have_value("5008")  # snapped to the 16 px grid
    page.get_by_role("button", name="Generate", exact=True).click()
    message = page.locator("#g-width").locator("xpath=ancestor::div[contains(@class,'field')][1]").locator(".error")
    expect(message).to_contain_text("width")
    expect(message).to_contain_text("4096")
    expect(page.get_by_label("Width", exact=True)).to_have_attribute("aria-invalid", "true")
    assert studio.job_count() == before

    page.get_by_label("Width", exact=True).fill("256")
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_role("button", name="Generate", exact=True).click()
    prompt_error = (
        page.locator("#g-prompt").locator("xpath=ancestor::div[contains(@class,'field')][1]").locator(".error")
    )
    expect(prompt_error).to_contain_text("prompt")
    expect(page.locator("#g-width-error")).to_have_count(0)  # the earlier message is gone
    assert studio.job_count() == before


# ---------------------------------------------------------------------------------------------- layout


def test_the_model_picker_shows_only_the_controls_a_model_uses(tab):
    page = tab.page
    steps, guidance, negative = page.locator("#g-steps"), page.locator("#g-guidance"), page.locator("#g-negative")
    generate = page.get_by_role("button", name="Generate", exact=True)
    expect(steps).to_be_visible()  # tiny: steps and guidance free, no CFG
    expect(guidance).to_be_visible()
    expect(negative).to_be_hidden()
    expect(generate).to_be_enabled()

    page.get_by_label("Model").select_option("flux.2-klein-4b")  # distilled: steps and guidance fixed
    expect(steps).to_be_hidden()
    expect(guidance).to_be_hidden()
    expect(negative).to_be_hidden()
    expect(page.locator("#g-model-note")).to_contain_text("flux2 serve --model flux.2-klein-4b")
    expect(generate).to_be_disabled()  # the service runs tiny only

    page.get_by_label("Model").select_option("flux.2-klein-base-4b")  # base: CFG with a negative prompt
    expect(negative).to_be_visible()
    expect(page.get_by_label("CFG scale")).to_be_visible()
    expect(page.get_by_text("about twice the time")).to_be_visible()
    expect(page.locator("#g-width")).to_have_value("1024")


def test_phone_width_dark_theme_and_labels(browser, studio, shots):
    phone = Page(browser, studio, viewport={"width": 390, "height": 844}, color_scheme="dark")
    try:
        page = phone.page
        assert page.evaluate("document.documentElement.dataset.theme") == "dark"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(e => e.offsetParent !== null)
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
            .map(e => e.outerHTML.slice(0, 80))""")
        assert unlabelled == []
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to the page"
        keep(page, shots, "web-phone-dark.png")
        page.get_by_role("button", name="Switch to the light theme").click()
        assert page.evaluate("document.documentElement.dataset.theme") == "light"
        assert phone.outside == []
        # The guard's negative control: a request to another host is stopped and counted.
        assert page.evaluate("fetch('http://192.0.2.1/font.woff2').then(() => 'sent', () => 'blocked')") == "blocked"
        assert phone.outside == ["http://192.0.2.1/font.woff2"]
    finally:
        phone.context.close()


# ---------------------------------------------------------------------------------------------- API token


def test_with_an_api_token_the_page_asks_for_it(browser, tmp_path_factory):
    token = "s3cret-token"
    settings = studio_settings(tmp_path_factory.mktemp("web-token"), api_token=token)
    with running_studio(settings) as guarded:
        anonymous = guarded.client
        for path in ("/", "/web/app.js", "/web/style.css"):  # the page's files hold no data: no token needed
            assert anonymous.get(path).status_code == 200, path
        for path in ("/web/config", "/events", "/queue", "/web/assets/x/watermark", "/docs", "/web/..%2Fapp.js"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.post("/web/app.js").status_code == 401  # only GET
        assert anonymous.get("/web/config", params={"token": token}).status_code == 200

        opened = Page(browser, guarded, ready=False)
        try:
            page = opened.page
            prompt = page.get_by_role("dialog", name="This service needs its API token")
            expect(prompt).to_be_visible()
            page.get_by_label("API token", exact=True).fill("not-the-token")
            page.get_by_role("button", name="Use this token").click()
            expect(prompt.get_by_role("alert")).to_contain_text("did not accept that token")
            expect(page.get_by_label("API token", exact=True)).to_have_attribute("aria-invalid", "true")
            page.get_by_label("API token", exact=True).fill(token)
            page.get_by_role("button", name="Use this token").click()
            expect(page.locator("body[data-ready=true]")).to_be_attached()
            expect(prompt).to_be_hidden()
            assert page.evaluate("sessionStorage.getItem('flux2.token')") == token

            opened.generate("behind a token", steps=2, seed="4")  # fetch with Bearer, SSE and images with ?token=
            expect(opened.queue_item("behind a token")).to_have_attribute("data-status", "completed")
            tile = opened.tile("behind a token")
            expect(tile).to_have_count(1)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=tile.locator("img").element_handle()
            )
            assert opened.outside == []
        finally:
            opened.context.close()


# ---------------------------------------------------------------------------------------------- plain HTTP


def test_the_page_and_its_files_are_served_from_the_package(studio):
    client = studio.client
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/web/app.js">' in page.text and "http" not in page.text.split("<body>")[0]
    assert client.get("/web/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/web/missing.js").status_code == 404
    assert client.get("/web/..%2Fapi%2Fweb.py").status_code == 404
    config = client.get("/web/config").json()
    served = [model for model in config["models"] if model["served"]]
    assert [model["name"] for model in served] == ["tiny"] and config["grid"] == 16
    klein = next(model for model in config["models"] if model["name"] == "flux.2-klein-4b")
    base = next(model for model in config["models"] if model["name"] == "flux.2-klein-base-4b")
    assert klein["fixed"] == ["guidance", "num_steps"] and not klein["uses_cfg"] and base["uses_cfg"]


def test_queue_order_and_clear_over_http(studio):
    client = studio.client
    project = client.post("/projects", json={"name": "queue"}).json()["id"]

    def queue(prompt: str, steps: int) -> str:
        body = {"project_id": project, "prompt": prompt, "num_inference_steps": steps, "seed": 1}
        return client.post("/generate/image", json=body).json()["job_id"]

    first = queue("first", LONG_STEPS)
    wait_status(client, first, lambda s: s["status"] == "processing")
    second, third, fourth = queue("second", 2), queue("third", 2), queue("fourth", 2)
    ids = lambda state: [job["job_id"] for job in state["queued"]]  # noqa: E731
    assert ids(client.get("/queue").json()) == [second, third, fourth]

    moved = client.post("/queue/order", json={"job_ids": [fourth, third]})
    assert moved.status_code == 200 and ids(moved.json()) == [fourth, third, second]
    assert moved.json()["running"]["job_id"] == first

    for wrong in ([first], ["job_nope"], [third, third]):
        refused = client.post("/queue/order", json={"job_ids": wrong})
        assert refused.status_code == 422 and "job_ids" in refused.text, refused.text
    assert ids(client.get("/queue").json()) == [fourth, third, second]  # a refused order changes nothing

    client.post(f"/jobs/{second}/cancel")
    cleared = client.post("/queue/clear").json()["cancelled"]
    assert cleared == [fourth, third]  # the one already cancelled is not counted again
    assert client.get("/queue").json()["queued"] == []
    assert wait_status(client, first, lambda s: s["status"] == "processing")  # clear leaves the running job
    client.post(f"/jobs/{first}/cancel")
    assert wait_terminal(client, first)["status"] == "cancelled"
    assert all(client.get(f"/status/{job}").json()["status"] == "cancelled" for job in (second, third, fourth))
