"""`flux2 models` and `flux2 download`: what is here, and fetching the rest from a stand-in Hub on loopback."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
from hub_server import Repo, running_hub
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from flux2.cli.main import main
from flux2.cli.models import human_size
from flux2.registry import FLUX2_MODEL_INFO, TINY_AE_PARAMS, TINY_PARAMS, model_info
from flux2.tiny import random_ae, random_flow_model
from flux2.weights import AE_ENV, WEIGHTS_DIR_ENV, find_weights

KLEIN_4B = model_info("flux.2-klein-4b")
# More than huggingface_hub's 10 MiB read chunk: a transfer that breaks off after it has something to resume from.
TRANSFORMER_BYTES = random.Random(0).randbytes(12 * 2**20)
AE_BYTES = b"autoencoder " * 1000
QWEN_FILES = {
    "config.json": b'{"model_type": "qwen3"}',
    "model-00001-of-00001.safetensors": b"weights " * 4000,
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
    "README.md": b"# not a weight file",  # matches none of the text encoder's patterns
}
WEIGHT_VARIABLES = {
    var
    for info in FLUX2_MODEL_INFO.values()
    for var in (info.env_var, info.text_encoder.env_var, info.text_encoder.tokenizer_env_var)
    if var
} | {AE_ENV, WEIGHTS_DIR_ENV, "FLUX2_MODEL"}


def klein_4b_repos(gated_ae: bool = False) -> dict[str, Repo]:
    return {
        KLEIN_4B.repo_id: Repo({KLEIN_4B.filename: TRANSFORMER_BYTES, "README.md": b"# klein"}),
        KLEIN_4B.ae_repo_id: Repo({KLEIN_4B.filename_ae: AE_BYTES, "flux2-dev.safetensors": b"x"}, gated=gated_ae),
        KLEIN_4B.text_encoder.repo_id: Repo(QWEN_FILES),
    }


def user_env(tmp_path, endpoint: str) -> dict[str, str]:
    """A user with nothing set up: no weights variables, no token, an empty private cache, online."""
    hub_settings = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE")  # token, offline mode, endpoint, cache
    env = {k: v for k, v in os.environ.items() if not k.startswith(hub_settings) and k not in WEIGHT_VARIABLES}
    hf = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    return {**env, **hf, "HF_HUB_DISABLE_TELEMETRY": "1"}


def flux2(*args, env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flux2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that failed as a user should see it fail."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return error


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """In-process lookups see the same empty cache and variables as the subprocesses (the Hub is never asked)."""
    for var in WEIGHT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads HF_HUB_CACHE when it is imported, which has happened already.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return monkeypatch


def models_json(capsys, *args) -> dict:
    assert main(["models", "--json", *args]) == 0
    return {model["name"]: model for model in json.loads(capsys.readouterr().out)["models"]}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- flux2 models


@pytest.fixture
def studio_folder(tmp_path):
    """The studio app's layout for [klein] 4B, with tiny checkpoints in the real formats."""
    from tiny_encoders import save_tiny_qwen3

    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(random_flow_model(TINY_PARAMS).state_dict(), folder / KLEIN_4B.filename)
    save_file(random_ae(TINY_AE_PARAMS).state_dict(), folder / "ae.safetensors")
    save_tiny_qwen3(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    for file in (folder / "text_encoder").glob("*"):
        if file.name.startswith(("tokenizer", "chat_template")):
            file.rename(folder / "tokenizer" / file.name)
    return folder


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_models_shows_the_parts_in_a_weights_folder(isolated, studio_folder, capsys):
    models = models_json(capsys, "--weights-dir", str(studio_folder))
    klein = models["flux.2-klein-4b"]
    assert klein["ready"] and not klein["built_in"] and klein["default"]
    expected = {
        "transformer": studio_folder / KLEIN_4B.filename,
        "ae": studio_folder / "ae.safetensors",
        "text_encoder": studio_folder / "text_encoder",
        "tokenizer": studio_folder / "tokenizer",
    }
    for part, path in expected.items():
        size = path.stat().st_size if path.is_file() else folder_bytes(path)
        assert klein["parts"][part] == {"present": True, "path": str(path), "bytes": size, "missing": None}
    for name in ["flux.2-klein-9b", "flux.2-dev"]:  # the folder holds no transformer of theirs
        transformer = models[name]["parts"]["transformer"]
        assert not transformer["present"] and transformer["path"] is None and not models[name]["ready"]
        assert "Hugging Face cache" in transformer["missing"]
    assert models["tiny"]["built_in"] and models["tiny"]["parts"] == {}

    assert main(["models", "--weights-dir", str(studio_folder)]) == 0
    listing = capsys.readouterr().out
    assert "flux.2-klein-4b (default): ready" in listing and "tiny: built in (random weights)" in listing
    transformer = expected["transformer"]
    [line] = [line for line in listing.splitlines() if line.endswith(str(transformer))]
    assert line.split() == ["transformer", *human_size(transformer.stat().st_size).split(), str(transformer)]
    assert "flux.2-klein-9b: 3 of 4 parts here (`flux2 download flux.2-klein-9b` fetches the rest)" in listing
    assert "  transformer     missing  not in the local Hugging Face cache\n" in listing


def test_a_folders_text_encoder_counts_only_for_the_models_it_can_serve(isolated, studio_folder, capsys):
    """The folder's text_encoder/ is a Qwen3: [dev] (Mistral) does not get it; once its config says Qwen3-4B's
    width, klein 9B (Qwen3-8B) does not either, and the listing says why."""
    models = models_json(capsys, "--weights-dir", str(studio_folder))
    assert models["flux.2-klein-9b"]["parts"]["text_encoder"]["present"]  # a stand-in of no published width
    dev = models["flux.2-dev"]["parts"]["text_encoder"]
    assert not dev["present"] and "holds a qwen3 text encoder, not mistral3" in dev["missing"]
    config = studio_folder / "text_encoder" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"hidden_size": 2560}))
    models = models_json(capsys, "--weights-dir", str(studio_folder))
    assert models["flux.2-klein-4b"]["parts"]["text_encoder"]["present"]
    nine = models["flux.2-klein-9b"]["parts"]["text_encoder"]
    assert not nine["present"] and "of width 2560, not Qwen/Qwen3-8B's 4096" in nine["missing"]


def test_models_reports_a_variable_naming_a_missing_path(isolated, tmp_path, capsys):
    isolated.setenv(KLEIN_4B.env_var, str(tmp_path / "gone.safetensors"))
    transformer = models_json(capsys)["flux.2-klein-4b"]["parts"]["transformer"]
    assert not transformer["present"]
    assert transformer["missing"] == f"{KLEIN_4B.env_var} is set to {tmp_path}/gone.safetensors, which does not exist"
    assert main(["models", "--weights-dir", str(tmp_path / "nope")]) == 1
    assert "weights folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- flux2 download


def test_download_resumes_a_broken_transfer_and_fills_the_cache_once(isolated, tmp_path, capsys):
    with running_hub(klein_4b_repos()) as hub:
        hub.break_off.add(f"{KLEIN_4B.repo_id}/{KLEIN_4B.filename}")  # the first transfer stops partway
        env = user_env(tmp_path, hub.endpoint)
        first = flux2("download", KLEIN_4B.name, env=env)
        assert first.returncode == 0, first.stderr
        gets = hub.downloads()
        asked = len(hub.requests)
        second = flux2("download", KLEIN_4B.name, env=env)
        assert second.returncode == 0, second.stderr
        assert len(hub.requests) == asked  # everything was found in the cache: the Hub is not asked again

    qwen_wanted = sorted(name for name in QWEN_FILES if name != "README.md")
    fetched = [r.path.rsplit("/", 1)[-1] for r in gets]
    assert sorted(set(fetched)) == sorted([KLEIN_4B.filename, KLEIN_4B.filename_ae, *qwen_wanted])
    [broken, rest] = [r for r in gets if r.path.endswith(KLEIN_4B.filename)]
    resumed_at = int(rest.range.removeprefix("bytes=").removesuffix("-"))
    assert broken.range is None and 0 < resumed_at < len(TRANSFORMER_BYTES)  # the rest, not the whole file again
    assert "flux.2-klein-4b: ready" in first.stdout and "(downloaded)" in first.stdout
    assert "No environment variable is needed" in first.stdout
    for label in ["transformer", "autoencoder", "text encoder", "tokenizer"]:
        assert f"{label}: already here, {tmp_path / 'hf-cache'}" in second.stderr
    assert "(downloaded)" not in second.stdout

    paths = find_weights(KLEIN_4B, download=False)  # what generation will load
    assert paths.transformer.read_bytes() == TRANSFORMER_BYTES and paths.ae.read_bytes() == AE_BYTES
    assert sorted(f.name for f in paths.text_encoder.iterdir()) == qwen_wanted
    assert paths.tokenizer == paths.text_encoder
    models = models_json(capsys)
    assert models["flux.2-klein-4b"]["ready"]
    assert models["flux.2-klein-4b"]["parts"]["transformer"]["bytes"] == len(TRANSFORMER_BYTES)
    base = models["flux.2-klein-base-4b"]["parts"]  # shares the autoencoder and the text encoder
    assert [base[part]["present"] for part in ["transformer", "ae", "text_encoder", "tokenizer"]] == [0, 1, 1, 1]


def test_unreachable_hub_is_one_line_and_leaves_nothing_behind(isolated, tmp_path, capsys):
    result = flux2("download", KLEIN_4B.name, env=user_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    error = error_line(result)
    assert KLEIN_4B.repo_id in error and "cannot reach the Hugging Face Hub" in error
    assert "HF_ENDPOINT" in error and KLEIN_4B.env_var in error
    assert not models_json(capsys)["flux.2-klein-4b"]["parts"]["transformer"]["present"]
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors"))


def test_gated_repo_says_to_accept_the_licence_and_log_in(isolated, tmp_path):
    with running_hub(klein_4b_repos(gated_ae=True)) as hub:
        error = error_line(flux2("download", KLEIN_4B.name, env=user_env(tmp_path, hub.endpoint)))
        fetched = hub.downloads()
    assert f"{KLEIN_4B.ae_repo_id} is gated: accept its licence at {hub.endpoint}/{KLEIN_4B.ae_repo_id}" in error
    assert "hf auth login" in error
    assert fetched == []  # the closed repo was found before anything was downloaded


def test_tiny_and_unknown_models(isolated, capsys):
    assert main(["download", "tiny"]) == 0
    assert "needs no download" in capsys.readouterr().out
    assert main(["download", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'no-such-model'" in err and "Traceback" not in err
    assert main(["download", KLEIN_4B.name, "--parts", "transformer,vae"]) == 1
    assert "parts: unknown 'vae'; choose from transformer, ae, text_encoder" in capsys.readouterr().err
