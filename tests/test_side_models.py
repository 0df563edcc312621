"""The models that --safety and --upsample load besides the image model: checked before anything loads, fetched by
`flux2 download`, listed by `flux2 models`. Against a stand-in Hub on loopback, or a closed port for "offline"."""

import time

from hub_server import Repo, running_hub
from test_cli_models import closed_port, error_line, flux2, user_env
from tiny_classifier import save_tiny_image_classifier

from flux2.registry import CHAT_MODEL, NSFW_CLASSIFIER, model_info
from flux2.side_models import side_models_needed

TINY_RUN = ["generate", "a fox", "--model", "tiny", "--width", "64", "--height", "64"]


def test_offline_safety_fails_at_once_naming_the_classifier_and_the_fix(tmp_path):
    env = user_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    result = flux2(*TINY_RUN, "--safety", "classifier", "-o", str(tmp_path / "x.png"), env=env)
    elapsed = time.perf_counter() - started
    error = error_line(result)
    assert NSFW_CLASSIFIER.repo_id in error and "is not reachable" in error
    assert "`flux2 download tiny --safety classifier`" in error and "--nsfw-model" in error
    assert "Retrying" not in result.stderr and "denoising" not in result.stderr  # before loading, no retry noise
    assert elapsed < 20  # ~2 s; it took 50 s of Hub retries after loading the model before
    assert not (tmp_path / "x.png").exists()


def test_full_safety_and_local_upsampling_name_the_chat_model_too(tmp_path):
    env = {**user_env(tmp_path, f"http://127.0.0.1:{closed_port()}"), "HF_HUB_OFFLINE": "1"}
    result = flux2(*TINY_RUN, "--safety", "full", "--upsample", "local", env=env)
    error = error_line(result)
    assert NSFW_CLASSIFIER.repo_id in error and CHAT_MODEL.repo_id in error and "HF_HUB_OFFLINE is set" in error
    assert "`flux2 download tiny --safety full --upsample local`" in error


def test_a_classifier_path_that_is_not_there_names_the_option(tmp_path):
    result = flux2(*TINY_RUN, "--safety", "classifier", "--nsfw-model", "./nope", env=user_env(tmp_path, "http://x"))
    expected = "error: --nsfw-model ./nope: no such folder, and not a Hugging Face Hub id (owner/name) either"
    assert error_line(result) == expected


def test_download_fetches_the_classifier_and_generation_then_runs_offline(tmp_path):
    folder = save_tiny_image_classifier(tmp_path / "classifier", {0: "normal", 1: "nsfw"})
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    with running_hub({NSFW_CLASSIFIER.repo_id: Repo(files)}) as hub:
        env = user_env(tmp_path, hub.endpoint)
        before = flux2("models", env=env)
        fetched = flux2("download", "tiny", "--safety", "classifier", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert f"{NSFW_CLASSIFIER.repo_id} (--safety classifier/full): missing" in before.stdout
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    after = flux2("models", env=offline)
    assert f"{NSFW_CLASSIFIER.repo_id} (--safety classifier/full): missing" not in after.stdout
    made = flux2(*TINY_RUN, "--safety", "classifier", "-o", str(tmp_path / "safe.png"), env=offline)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "safe.png").exists()


def test_dev_upsamples_with_its_own_text_encoder():
    """[dev]'s Mistral encoder is the chat model: no second 24B model to find; klein needs one."""
    dev, klein = model_info("flux.2-dev"), model_info("flux.2-klein-4b")
    assert side_models_needed(dev, "full", "local") == side_models_needed(dev, "classifier")
    assert [use.model for use in side_models_needed(klein, "full", "local")] == [NSFW_CLASSIFIER, CHAT_MODEL]
    assert side_models_needed(klein) == []
