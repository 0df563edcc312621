"""The `flux2` command end to end with the tiny model (subprocesses, as a user runs it)."""

import json
import os
import subprocess
import sys

from PIL import Image

from flux2.provenance import read_provenance


def run(*args, cwd, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flux2", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_generate_json_output_and_no_overwrite(tmp_path):
    args = ["generate", "a red fox", "--model", "tiny", "--width", "64", "--height", "32", "--seed", "7", "--json"]
    first = run(*args, "-o", "out.png", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    [path] = report["outputs"]
    assert report["images"][0]["seed"] == 7 and report["images"][0]["model"] == "tiny"
    image = Image.open(tmp_path / path)
    assert image.size == (64, 32)
    assert read_provenance(tmp_path / path)["prompt"] == "a red fox"
    second = run(*args, "-o", "out.png", cwd=tmp_path)
    assert json.loads(second.stdout)["outputs"] != [path]  # a second run never overwrites the first
    assert (tmp_path / path).exists()


def test_several_images_to_one_png_name(tmp_path):
    args = ["generate", "x", "--model", "tiny", "--width", "32", "--height", "32", "--num-images", "2", "--json"]
    result = run(*args, "-o", "fox.png", cwd=tmp_path)
    assert json.loads(result.stdout)["outputs"] == ["fox.png", "fox-1.png"]
    assert (tmp_path / "fox.png").is_file() and (tmp_path / "fox-1.png").is_file()


def test_model_from_environment_and_seed_always_reported(tmp_path):
    result = run("generate", "a ship", "--width", "32", "--height", "32", cwd=tmp_path, env={"FLUX2_MODEL": "tiny"})
    assert result.returncode == 0, result.stderr
    assert "(seed " in result.stdout
    assert "noise images" in result.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    for args, needle in [
        (["--model", "tiny", "--width", "100"], "width must be a positive multiple of 16"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "tiny", "--steps", "-2"], "num_steps must be a positive integer"),
        (["--model", "tiny", "-i", "missing.png"], "reference image 0 not found"),
        (["--model", "tiny", "-o", "out.tiff"], "must end in one of .png"),
    ]:
        result = run("generate", "x", *args, cwd=tmp_path)
        assert result.returncode == 1
        assert needle in result.stderr and "Traceback" not in result.stderr


def test_missing_weights_offline_names_the_variable(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "QWEN3_4B_PATH": "", "FLUX2_WEIGHTS_DIR": ""}
    result = run("generate", "x", "--model", "flux.2-klein-4b", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "QWEN3_4B_PATH" in result.stderr and "Traceback" not in result.stderr


def test_flagged_output_is_reported_and_not_written(tmp_path):
    from flux2.tiny import save_tiny_image_classifier

    classifier = save_tiny_image_classifier(tmp_path / "nsfw", {0: "normal", 1: "nsfw"})
    args = ["--model", "tiny", "--width", "32", "--height", "32", "-o", "out", "--json"]
    safety = ["--safety", "classifier", "--nsfw-model", str(classifier), "--nsfw-threshold", "0"]
    result = run("generate", "x", *args, *safety, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"] == [None] and "withheld seed" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_upsampling_through_a_loopback_api(tmp_path):
    from chat_api import Reply, completion, running_chat_server

    with running_chat_server() as chat:
        chat.replies = [Reply(body=completion("a red fox in fresh snow, low sun"))]
        args = ["--model", "tiny", "--width", "32", "--height", "32", "--json", "--upsample", "openrouter"]
        result = run("generate", "a fox", *args, "--upsample-url", chat.base_url, cwd=tmp_path,
                     env={"OPENROUTER_API_KEY": "test-key"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    [image] = json.loads(result.stdout)["images"]
    assert image["prompt"] == "a fox" and image["upsampled_prompt"] == "a red fox in fresh snow, low sun"
