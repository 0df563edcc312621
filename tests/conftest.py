"""Shared fixtures."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Matmuls this small are slower, and very erratic, when torch splits them over threads on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def klein_weights(tmp_path_factory):
    """flux.2-klein-4b weights (tiny random ones) in the studio layout and in a diffusers repo layout."""
    from tiny_checkpoints import write_diffusers_layout, write_studio_layout

    root = tmp_path_factory.mktemp("weights")
    return write_studio_layout(root / "studio"), write_diffusers_layout(root / "FLUX.2-klein-4B")


@pytest.fixture(scope="session", autouse=True)
def flux2_config_dir(tmp_path_factory):
    """Signing keys (Content Credentials) made by in-process saves go to a temporary config folder, made once per
    session, not to the user's ~/.config/flux2."""
    folder = tmp_path_factory.mktemp("flux2-config")
    saved = os.environ.get("FLUX2_CONFIG_DIR")
    os.environ["FLUX2_CONFIG_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("FLUX2_CONFIG_DIR", None)
    else:
        os.environ["FLUX2_CONFIG_DIR"] = saved


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """The environment of a user with no weights, no Hub access and none of our variables set."""
    ours = ("FLUX2_", "KLEIN_", "AE_MODEL_PATH", "QWEN3_", "MISTRAL_", "OPENROUTER_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    isolated = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HOME": str(tmp_path)}
    return {**env, **isolated, "OMP_NUM_THREADS": "1"}  # tiny models run faster on one thread
