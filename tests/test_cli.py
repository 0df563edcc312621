"""The one-shot subcommands end to end with the tiny model, as a user runs them (separate processes)."""

import json
import time

import numpy as np
import pytest
import torch
from command import flux2
from PIL import Image
from terminal import Terminal

from flux2.cli import main
from flux2.provenance import read_provenance

SMALL = ["--model", "tiny", "--width", "64", "--height", "32"]


def test_generate_json_output_and_no_overwrite(tmp_path, cli_env):
    args = ["generate", "a red fox", *SMALL, "--seed", "7", "--json", "-o", "out.png"]
    first = flux2(*args, cwd=tmp_path, env=cli_env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["outputs"] == ["out.png"] and report["cancelled"] is False
    assert report["images"][0]["seed"] == 7 and report["images"][0]["model"] == "tiny"
    assert Image.open(tmp_path / "out.png").size == (64, 32)
    assert read_provenance(tmp_path / "out.png")["prompt"] == "a red fox"
    second = flux2(*args, cwd=tmp_path, env=cli_env)
    assert json.loads(second.stdout)["outputs"] == ["out-1.png"]  # a second run never overwrites the first
    same_pixels = np.array_equal(*(np.asarray(Image.open(tmp_path / name)) for name in ("out.png", "out-1.png")))
    assert same_pixels  # same seed, same image (the files differ: each carries its own signed manifest)


@pytest.fixture
def in_folder(tmp_path, monkeypatch):
    """`main()` in this process (quicker than a new one), run from tmp_path with none of our variables set."""
    monkeypatch.chdir(tmp_path)
    for var in ("FLUX2_MODEL", "FLUX2_WEIGHTS_DIR", "KLEIN_4B_MODEL_PATH", "AE_MODEL_PATH", "QWEN3_4B_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_default_folder_names_images_by_seed(tmp_path, in_folder, capsys):
    assert main(["generate", "a ship", *SMALL, "--seed", "3", "--num-images", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "saved output/flux2-3.png (seed 3)",
        "saved output/flux2-4.png (seed 4)",
    ]
    args = ["generate", "a ship", *SMALL, "--seed", "3", "-o", "shots", "--format", "jpeg"]
    for _ in range(2):
        assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == ["flux2-3-1.jpg", "flux2-3.jpg"]
    assert read_provenance(tmp_path / "shots" / "flux2-3-1.jpg")["seed"] == 3


def test_model_from_environment_and_seed_always_reported(tmp_path, cli_env):
    env = {**cli_env, "FLUX2_MODEL": "tiny"}
    result = flux2("generate", "a ship", "--width", "32", "--height", "32", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "(seed " in result.stdout and "noise images" in result.stderr


def test_edit_then_info_shows_the_record_and_the_watermark(tmp_path, cli_env):
    Image.new("RGB", (272, 256), (40, 90, 200)).save(tmp_path / "source.png")
    args = ["edit", "make it red", "-i", "source.png", "--model", "tiny", "--match-image-size", "0", "--seed", "2"]
    edited = flux2(*args, "-o", "edited.jpg", cwd=tmp_path, env=cli_env)
    assert edited.returncode == 0, edited.stderr
    assert Image.open(tmp_path / "edited.jpg").size == (272, 256)
    info = flux2("info", "edited.jpg", "--json", cwd=tmp_path, env=cli_env)
    assert info.returncode == 0, info.stderr
    found = json.loads(info.stdout)
    assert found["record"]["prompt"] == "make it red" and len(found["record"]["references"]) == 1
    assert found["exif"] == {"Software": "AI generated;flux2", "Make": "Black Forest Labs"}
    assert found["watermark"]["detected"] and found["watermark"]["method"] == "lumaTile"
    Image.new("RGB", (256, 256), "white").save(tmp_path / "plain.png")
    shown = flux2("info", "edited.jpg", "plain.png", cwd=tmp_path, env=cli_env).stdout
    assert "seed              2" in shown and "invisible mark    present (lumaTile" in shown
    assert "plain.png: 256x256 PNG\n  no flux2 record" in shown and "invisible mark    not found" in shown


def test_a_named_model_from_weights_where_a_user_puts_them(tmp_path, in_folder, klein_weights):
    studio, diffusers_repo = klein_weights
    args = ["generate", "a fox", "--model", "flux.2-klein-4b", "--width", "64", "--height", "64", "--seed", "3"]
    env_vars = {
        "KLEIN_4B_MODEL_PATH": str(studio / "flux-2-klein-4b.safetensors"),
        "AE_MODEL_PATH": str(studio / "ae.safetensors"),
        "QWEN3_4B_PATH": str(studio / "text_encoder"),
    }
    runs = {
        "studio.png": (["--weights-dir", str(studio)], {}),
        "diffusers.png": ([], {"FLUX2_WEIGHTS_DIR": str(diffusers_repo)}),
        "variables.png": ([], env_vars),
    }
    for name, (options, env) in runs.items():
        with pytest.MonkeyPatch.context() as variables:
            for key, value in env.items():
                variables.setenv(key, value)
            assert main([*args, *options, "-o", name]) == 0
        assert read_provenance(tmp_path / name)["model"] == "flux.2-klein-4b"
    pixels = {name: Image.open(tmp_path / name).tobytes() for name in runs}
    assert len(set(pixels.values())) == 1  # the same weights in every layout: the same image
    assert main(["generate", "a fox", *SMALL[:2], "--width", "64", "--height", "64", "--seed", "3", "-o", "t.png"]) == 0
    assert Image.open(tmp_path / "t.png").tobytes() != pixels["studio.png"]  # the files were really used


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'; choose one of: flux.2-klein-4b"),
        (["--model", "tiny", "--width", "100"], "width must be a positive multiple of 16 px, at most 4096, got 100"),
        (["--model", "tiny", "--steps", "-2"], "--num-steps must be a positive integer, at most 200, got -2"),
        (["--model", "tiny", "--width", "1000"], "got 1000 (nearest allowed: 992 or 1008)"),
        (["--model", "flux.2-klein4b"], "unknown model 'flux.2-klein4b'; did you mean 'flux.2-klein-4b'?"),
        (["--model", "flux.2-klein-4b", "--steps", "8"], "--num-steps is fixed at 4 (got 8)"),  # before any weights
        (["--model", "flux.2-klein-4b", "--negative-prompt", "blur"], "other models with --true-cfg-scale, at twice"),
        (["--model", "tiny", "-i", "missing.png"], "input image 0 not found: missing.png"),
        (["--model", "tiny", "-i", "broken.png"], "input image 0 (broken.png) is not a readable image"),
        (["--model", "tiny", "-i", "broken.png", "--match-image-size", "1"], "not a readable image"),
        (["--model", "tiny", "--match-image-size", "0"], "--match-image-size=0 but there are 0 reference images"),
        (["--model", "tiny", "-o", "plainfile"], "-o plainfile is an existing file"),
        (["--model", "tiny", "--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"], "--device"),
        (["--model", "tiny", "-o", "out.tiff"], "must end in one of .png"),
        (["--model", "tiny", "-o", "out.png", "--format", "jpeg"], "-o out.png and --format jpeg disagree"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("bad input must fail before any model loads")

    monkeypatch.setattr("flux2.pipeline.Flux2Pipeline.__init__", no_loading)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "plainfile").write_text("")
    assert main(["generate", "x", *args]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "output").exists()


def test_edit_needs_an_image_and_missing_weights_name_the_variable(tmp_path, cli_env):
    no_image = flux2("edit", "x", "--model", "tiny", cwd=tmp_path, env=cli_env)
    assert no_image.returncode == 2 and "the following arguments are required: -i/--image" in no_image.stderr
    offline = flux2("generate", "x", "--model", "flux.2-klein-4b", cwd=tmp_path, env=cli_env)
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    [line] = [line for line in offline.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and "QWEN3_4B_PATH" in line and "KLEIN_4B_MODEL_PATH" in line


def test_no_network_fails_quickly_with_one_line(tmp_path, cli_env):
    from test_cli_models import closed_port

    env = {key: value for key, value in cli_env.items() if key != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"  # nothing listens: as with no network
    started = time.monotonic()
    result = flux2("generate", "x", "--model", "flux.2-klein-4b", cwd=tmp_path, env=env)
    assert result.returncode == 1 and time.monotonic() - started < 30  # no minute of download retries
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "is not reachable" in line and "KLEIN_4B_MODEL_PATH" in line and "Traceback" not in result.stderr


def help_text(*args: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_is_short_and_has_examples(tmp_path, cli_env, capsys):
    top = help_text(capsys=capsys)
    assert "examples:" in top and len(top.splitlines()) < 40
    for command in ("repl", "generate", "edit", "models", "download", "info"):
        assert "example" in help_text(command, capsys=capsys), command
    no_terminal = flux2(cwd=tmp_path, env=cli_env, stdin="")
    assert no_terminal.returncode == 2 and "usage: flux2" in no_terminal.stderr  # the REPL needs a terminal


def test_flagged_output_is_reported_and_not_written(tmp_path, cli_env):
    from tiny_classifier import save_tiny_image_classifier

    classifier = save_tiny_image_classifier(tmp_path / "nsfw", {0: "normal", 1: "nsfw"})
    safety = ["--safety", "classifier", "--nsfw-model", str(classifier), "--nsfw-threshold", "0"]
    result = flux2("generate", "x", *SMALL, "-o", "out", "--json", *safety, cwd=tmp_path, env=cli_env)
    assert result.returncode == 3, result.stderr  # nothing written: a script can tell
    assert json.loads(result.stdout)["outputs"] == [None] and "withheld seed" in result.stderr
    assert not (tmp_path / "out").exists()


def test_upsampling_through_a_loopback_api(tmp_path, cli_env):
    from chat_api import Reply, completion, running_chat_server

    with running_chat_server() as chat:
        chat.replies = [Reply(body=completion("a red fox in fresh snow, low sun"))]
        args = [*SMALL, "--json", "--upsample", "openrouter", "--upsample-url", chat.base_url]
        env = {**cli_env, "OPENROUTER_API_KEY": "test-key"}
        result = flux2("generate", "a fox", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    [image] = json.loads(result.stdout)["images"]
    assert image["prompt"] == "a fox" and image["upsampled_prompt"] == "a red fox in fresh snow, low sun"


def test_ctrl_c_cancels_a_one_shot_run(tmp_path, cli_env):
    args = ["-m", "flux2", "generate", "x", "--model", "tiny", "--width", "1024", "--height", "1024", "--seed", "1",
            "--num-images", "2", "--steps", "200"]  # fmt: skip
    term = Terminal(args, env=cli_env, cwd=tmp_path)
    try:
        term.expect("denoising")
        term.interrupt()
        term.expect("cancelled after 0 image(s)")
        assert term.wait() == 130
    finally:
        term.close()
    assert not (tmp_path / "output").exists()
