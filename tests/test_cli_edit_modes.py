"""`flux2 img2img / inpaint / outpaint`, `--seeds`, `flux2 info --rerun` and the size guard, with the tiny model on
64 x 64 images, in this process (`main([...])`)."""

import pytest
from PIL import Image
from test_cli import in_folder  # noqa: F401 (a fixture)

from flux2.cli import main
from flux2.provenance import read_provenance

TINY = ["--model", "tiny"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls run faster on one thread


@pytest.fixture
def source(tmp_path, in_folder):  # noqa: F811
    """A 64x64 source, a half-size mask of its shape and one of another shape, in the current folder."""
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "source.png")
    half = Image.new("L", (32, 32), 0)
    half.paste(255, (8, 8, 24, 24))
    half.save(tmp_path / "mask.png")
    Image.new("L", (32, 64), 255).save(tmp_path / "narrow.png")
    return tmp_path


def record_of(path) -> dict:
    return read_provenance(path)


def test_img2img_writes_an_image_recorded_with_its_mode_and_strength(source):
    assert main(["img2img", "an oil painting", "-i", "source.png", *TINY, "--strength", "0.5", "--seed", "4",
                 "-o", "out.png"]) == 0  # fmt: skip
    record = record_of(source / "out.png")
    assert (record["mode"], record["strength"], record["seed"], record["prompt"]) == (
        "img2img",
        0.5,
        4,
        "an oil painting",
    )
    assert Image.open(source / "out.png").size == (64, 64) and record["source"]


def test_inpaint_takes_a_half_size_mask_and_records_its_settings(source):
    args = ["inpaint", "a hat", "-i", "source.png", "--mask", "mask.png", *TINY, "--seed", "1", "--mask-blur", "2",
            "--crop-padding", "8", "--strength", "0.9", "--max-pixels", "4096", "-o", "hat.png"]  # fmt: skip
    assert main(args) == 0
    record = record_of(source / "hat.png")
    assert (record["mode"], record["strength"]) == ("inpaint", 0.9)
    assert (record["edit"]["mask_blur"], record["edit"]["crop_padding"]) == (2.0, 8)
    assert Image.open(source / "hat.png").size == (64, 64)


def test_outpaint_extends_the_canvas_by_the_margins(source):
    assert main(["outpaint", "a beach", "-i", "source.png", *TINY, "--left", "16", "--bottom", "32", "--seed", "2",
                 "--mask-blur", "0", "-o", "wide.png"]) == 0  # fmt: skip
    record = record_of(source / "wide.png")
    assert record["mode"] == "outpaint" and Image.open(source / "wide.png").size == (80, 96)
    assert (record["edit"]["left"], record["edit"]["bottom"], record["edit"]["mask_blur"]) == (16, 32, 0.0)


@pytest.mark.parametrize(
    "args,message",
    [
        (["img2img", "x", "-i", "source.png", "--strength", "1.5"], "--strength must be a number in (0, 1], got 1.5"),
        (["img2img", "x", "-i", "missing.png"], "-i/--image not found: missing.png"),
        (["inpaint", "x", "-i", "source.png", "--mask", "missing.png"], "--mask: mask not found: missing.png"),
        (["inpaint", "x", "-i", "source.png", "--mask", "narrow.png"],
         "--mask: mask is 32x64 px but the image is 64x64 px"),
        (["inpaint", "x", "-i", "source.png", "--mask", "mask.png", "--mask-blur", "-1"], "--mask-blur must be"),
        (["inpaint", "x", "-i", "source.png", "--mask", "mask.png", "--crop-padding", "-3"], "--crop-padding must be"),
        (["outpaint", "x", "-i", "source.png"], "outpaint needs at least one of --left/--right/--top/--bottom"),
        (["outpaint", "x", "-i", "source.png", "--left", "-16"], "--left must be a whole number of px >= 0"),
        (["outpaint", "x", "-i", "source.png", "--left", "10"], "--left/--right/--top/--bottom: outpainting 64x64"),
        (["img2img", "x", "-i", "source.png", "--seeds", "1,2", "--seed", "3"], "give either --seeds or --seed"),
        (["generate", "x", "--seeds", "1,2", "--num-images", "2"], "give either --seeds or --seed/--num-images"),
        (["generate", "x", "--seeds", "1,-2"], "--seed-list[1] must be an integer in [0,"),
        (["generate", "x", "--width", "4096", "--height", "2048"], "add --force to run it anyway"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_loading_with_one_line_naming_the_flag(source, monkeypatch, capsys, args, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("bad input must fail before any model loads")

    monkeypatch.setattr("flux2.pipeline.Flux2Pipeline.__init__", no_loading)
    assert main([*args, *TINY]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (source / "output").exists()


def test_seeds_make_one_image_per_seed_each_as_its_own_run(source, capsys):
    assert main(["generate", "a ship", *TINY, "--width", "64", "--height", "64", "--seeds", "5,2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["saved output/flux2-5.png (seed 5)",
                                                    "saved output/flux2-2.png (seed 2)"]  # fmt: skip
    assert main(["generate", "a ship", *TINY, "--width", "64", "--height", "64", "--seed", "2", "-o", "one.png"]) == 0
    assert Image.open(source / "one.png").tobytes() == Image.open(source / "output/flux2-2.png").tobytes()
    assert main(["img2img", "x", "-i", "source.png", *TINY, "--seeds", "7,8", "-o", "edits"]) == 0
    assert [record_of(source / f"edits/flux2-{s}.png")["seed"] for s in (7, 8)] == [7, 8]


def same_pixels(a, b) -> bool:
    return Image.open(a).tobytes() == Image.open(b).tobytes()


def test_rerun_makes_the_same_pixels_from_a_text_to_image_record(source):
    assert main(["generate", "a lighthouse", *TINY, "--width", "64", "--height", "48", "--seed", "11", "--steps",
                 "3", "-o", "first.png"]) == 0  # fmt: skip
    assert main(["info", "first.png", "--rerun", "-o", "again.png"]) == 0
    assert same_pixels(source / "again.png", source / "first.png")
    again = record_of(source / "again.png")
    assert (again["seed"], again["num_steps"], again["prompt"], again["model"]) == (11, 3, "a lighthouse", "tiny")


def test_rerun_of_an_edit_names_what_the_record_lacks_and_takes_the_files_it_names(source, capsys):
    args = ["inpaint", "a hat", "-i", "source.png", "--mask", "mask.png", *TINY, "--seed", "3", "--mask-blur", "2",
            "--strength", "0.9", "-o", "hat.png"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["info", "hat.png", "--rerun"]) == 1
    error = capsys.readouterr().err
    assert "the record lacks the source image (the record holds only its sha256: give it with --source)" in error
    assert "the mask (the record holds only its sha256: give it with --mask)" in error
    Image.new("RGB", (64, 64), "red").save(source / "other.png")
    assert main(["info", "hat.png", "--rerun", "--source", "other.png", "--mask", "mask.png"]) == 1
    assert "--source/--mask are not what the record names: source differ" in capsys.readouterr().err
    assert main(["info", "hat.png", "--rerun", "--source", "source.png", "--mask", "mask.png", "-o", "again.png"]) == 0
    assert same_pixels(source / "again.png", source / "hat.png")
    assert record_of(source / "again.png")["edit"] == record_of(source / "hat.png")["edit"]


def test_a_large_size_asks_for_force_and_runs_with_it(source, monkeypatch, capsys):
    monkeypatch.setattr("flux2.cli.request_options.LARGE_PIXELS", 64 * 64)  # "large" at a size the tiny model runs
    args = ["generate", "x", *TINY, "--width", "128", "--height", "64", "--seed", "1", "-o", "big.png"]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "error: --width 128 --height 64 is" in error and "add --force" in error and not (source / "big.png").exists()
    assert main([*args, "--force"]) == 0
    assert Image.open(source / "big.png").size == (128, 64)


def test_a_seed_list_is_a_request_field_that_survives_json_and_the_python_api():
    from flux2.pipeline import Flux2Pipeline
    from flux2.registry import model_info
    from flux2.request import GenerationRequest

    request = GenerationRequest.from_settings("generate", prompt="x", seed_list=[5, 2]).resolve(model_info("tiny"))
    assert request.seeds == [5, 2] and request.num_images == 2
    assert GenerationRequest.from_json(request.to_json()) == request
    with pytest.raises(ValueError, match="give either seed_list"):
        GenerationRequest(prompt="x", seed_list=(1, 2), seed=3).check()
    pipe = Flux2Pipeline("tiny", device="cpu")
    outputs = pipe.generate("x", width=32, height=32, seed_list=[9, 4])
    assert [out.record.seed for out in outputs] == [9, 4]
