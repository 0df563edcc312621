"""Checkpoint layouts, strict loading, architecture detection and weight discovery."""

import json
from dataclasses import asdict, replace

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file

from flux2.checkpoints import CheckpointError, load_strict
from flux2.checkpoints.autoencoder import ae_original_to_diffusers, diffusers_ae_config
from flux2.checkpoints.transformer import (
    diffusers_transformer_config,
    params_from_state_dict,
    transformer_diffusers_to_original,
    transformer_original_to_diffusers,
)
from flux2.model import Flux2, Flux2Params, Klein4BParams, Klein9BParams
from flux2.registry import FLUX2_MODEL_INFO, TINY_AE_PARAMS, TINY_PARAMS, RandomWeights, model_info
from flux2.tiny import random_ae, random_flow_model
from flux2.tiny_text_encoders import tiny_qwen3
from flux2.util import default_dtype, detect_model_name, load_ae, load_flow_model, load_text_encoder
from flux2.weights import WeightsNotFoundError, download_weights, find_weights, local_parts


def diffusers_transformer(params: Flux2Params) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(**diffusers_transformer_config(params))


def equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_model() -> Flux2:
    return random_flow_model(TINY_PARAMS, seed=5)


def test_original_diffusers_round_trip_is_bit_exact(tiny_model):
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()}
    converted = transformer_original_to_diffusers(sd)
    assert converted.keys() == diffusers_transformer(TINY_PARAMS).state_dict().keys()
    assert equal_state(transformer_diffusers_to_original(converted), sd)
    # The final modulation halves are swapped in the diffusers layout (shift/scale order).
    shift, scale = sd["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(converted["norm_out.linear.weight"], torch.cat([scale, shift]))


def test_load_original_file_and_diffusers_folder_give_identical_models(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    theirs = diffusers_transformer(TINY_PARAMS)
    theirs.load_state_dict(transformer_original_to_diffusers(sd))
    theirs.save_pretrained(tmp_path / "transformer")  # a real diffusers folder: config.json + weights
    from_file = load_flow_model(path=tmp_path / "model.safetensors", device="cpu")
    from_folder = load_flow_model(path=tmp_path / "transformer", device="cpu")
    assert from_file.params == TINY_PARAMS  # architecture read from the tensor shapes
    assert equal_state(from_file.state_dict(), sd)
    assert equal_state(from_folder.state_dict(), sd)


def test_prefixed_single_file_loads(tiny_model, tmp_path):
    sd = {f"model.diffusion_model.{k}": v for k, v in tiny_model.state_dict().items()}
    save_file(sd, tmp_path / "prefixed.safetensors")
    assert equal_state(load_flow_model(path=tmp_path / "prefixed.safetensors", device="cpu").state_dict(),
                       tiny_model.state_dict())  # fmt: skip


@pytest.mark.parametrize(
    "params,name",
    [(Klein4BParams(), "flux.2-klein-4b"), (Klein9BParams(), "flux.2-klein-9b"), (Flux2Params(), "flux.2-dev")],
)
def test_variant_detected_from_shapes(params, name):
    with torch.device("meta"):
        sd = Flux2(params).state_dict()
    assert asdict(params_from_state_dict(sd)) == asdict(params)
    assert detect_model_name(params_from_state_dict(sd)) == name


def test_strict_key_error_lists_missing_unexpected_and_shapes(tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("txt_in.weight")
    sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(1)
    sd["img_in.weight"] = torch.zeros(3, 3)
    with torch.device("meta"):
        model = Flux2(TINY_PARAMS)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, sd, "transformer")
    message = str(err.value)
    assert "missing keys (1)" in message and "txt_in.weight" in message
    assert "unexpected keys (1)" in message and "double_blocks.0.img_attn.extra.weight" in message
    assert "img_in.weight: checkpoint (3, 3) vs model (64, 16)" in message


def test_loaded_weights_are_assigned_not_copied(tiny_model, tmp_path):
    save_file(tiny_model.state_dict(), tmp_path / "m.safetensors")
    model = load_flow_model(path=tmp_path / "m.safetensors", device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert model.img_in.weight.dtype == torch.float32  # the checkpoint's dtype is kept


def test_ae_file_and_diffusers_vae_folder(tmp_path):
    ae = random_ae(TINY_AE_PARAMS, seed=2)
    save_file(ae.state_dict(), tmp_path / "ae.safetensors")
    vae = AutoencoderKLFlux2(**diffusers_ae_config(TINY_AE_PARAMS))
    vae.load_state_dict(ae_original_to_diffusers(ae.state_dict()))
    vae.save_pretrained(tmp_path / "vae")
    from_file = load_ae("tiny", "cpu", path=tmp_path / "ae.safetensors")
    from_folder = load_ae("tiny", "cpu", path=tmp_path / "vae")
    assert equal_state(from_file.state_dict(), ae.state_dict())
    assert equal_state(from_folder.state_dict(), ae.state_dict())


# ----------------------------------------------------------------------------- discovery


def touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    for var in [
        "FLUX2_WEIGHTS_DIR",
        "AE_MODEL_PATH",
        "KLEIN_9B_MODEL_PATH",
        "QWEN3_8B_PATH",
        "QWEN3_8B_TOKENIZER_PATH",
    ]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return monkeypatch


def test_studio_layout_folder_is_found_as_is(no_env, tmp_path):
    folder = tmp_path / "flux2"
    touch(folder / "flux-2-klein-9b.safetensors")
    touch(folder / "ae.safetensors")
    touch(folder / "vae" / "config.json")
    touch(folder / "text_encoder" / "config.json")
    touch(folder / "tokenizer" / "tokenizer.json")
    touch(folder / "ip-adapter.safetensors")
    paths = find_weights(model_info("flux.2-klein-9b"), folder, download=False)
    assert paths.transformer == folder / "flux-2-klein-9b.safetensors"
    assert paths.ae == folder / "ae.safetensors"  # the native AE wins over a diffusers vae/
    assert paths.text_encoder == folder / "text_encoder"
    assert paths.tokenizer == folder / "tokenizer"


def test_diffusers_repository_folder_is_found(no_env, tmp_path):
    repo = tmp_path / "FLUX.2-klein-9B"
    touch(repo / "model_index.json", json.dumps({"_class_name": "Flux2KleinPipeline"}).encode())
    touch(repo / "transformer" / "diffusion_pytorch_model.safetensors")
    touch(repo / "vae" / "diffusion_pytorch_model.safetensors")
    touch(repo / "text_encoder" / "config.json")
    touch(repo / "tokenizer" / "tokenizer.json")
    paths = find_weights(model_info("flux.2-klein-9b"), repo, download=False)
    assert (paths.transformer, paths.ae) == (repo / "transformer", repo / "vae")


def test_environment_variables_come_first(no_env, tmp_path):
    folder = tmp_path / "w"
    touch(folder / "flux-2-klein-9b.safetensors")
    touch(folder / "ae.safetensors")
    touch(folder / "text_encoder" / "config.json")
    own = touch(tmp_path / "elsewhere" / "my-klein.safetensors")
    qwen = touch(tmp_path / "qwen" / "config.json").parent
    no_env.setenv("KLEIN_9B_MODEL_PATH", str(own))
    no_env.setenv("QWEN3_8B_PATH", str(qwen))
    no_env.setenv("QWEN3_8B_TOKENIZER_PATH", str(qwen))
    paths = find_weights(model_info("flux.2-klein-9b"), folder, download=False)
    assert paths.transformer == own and paths.text_encoder == qwen and paths.ae == folder / "ae.safetensors"
    no_env.setenv("AE_MODEL_PATH", str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsNotFoundError, match="AE_MODEL_PATH is set to .* which does not exist"):
        find_weights(model_info("flux.2-klein-9b"), folder, download=False)


def test_nothing_found_offline_names_every_missing_part(no_env, tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        find_weights(model_info("flux.2-klein-9b"), tmp_path, download=False)
    message = str(err.value)
    assert "QWEN3_8B_PATH" in message and "FLUX2_WEIGHTS_DIR" in message and "Qwen/Qwen3-8B" in message
    assert "KLEIN_9B_MODEL_PATH" in message and "AE_MODEL_PATH" in message
    with pytest.raises(WeightsNotFoundError, match="weights folder .*nope \\(--weights-dir\\) does not exist"):
        find_weights(model_info("flux.2-klein-9b"), tmp_path / "nope", download=False)
    folder = tmp_path / "only-te"
    touch(folder / "text_encoder" / "config.json")
    touch(folder / "tokenizer" / "tokenizer.json")
    with pytest.raises(WeightsNotFoundError, match="KLEIN_9B_MODEL_PATH"):
        find_weights(model_info("flux.2-klein-9b"), folder, download=False)


def test_text_encoder_loads_from_the_discovered_folder(no_env, tmp_path):
    """QWEN3_4B_PATH pointing at a saved (tiny) Qwen3 folder goes through discovery into the real loader."""
    from tiny_encoders import save_tiny_qwen3

    folder = save_tiny_qwen3(tmp_path / "qwen3")
    no_env.setenv("QWEN3_4B_PATH", str(folder))
    no_env.delenv("QWEN3_4B_TOKENIZER_PATH", raising=False)
    encoder = load_text_encoder("flux.2-klein-4b", "cpu", dtype=torch.float32)
    model, tokenizer = tiny_qwen3()
    from flux2.text_encoder import Qwen3Embedder

    expected = Qwen3Embedder(model, "cpu", tokenizer=tokenizer, dtype=torch.float32)(["a fox"])
    assert torch.equal(encoder(["a fox"]), expected)


def test_vae_folder_group_count_comes_from_its_config(tmp_path):
    """GroupNorm's group count is not in the weights: a diffusers vae/ folder's config.json gives it."""
    params = replace(TINY_AE_PARAMS, norm_groups=16)
    ae = random_ae(params, seed=3)
    vae = AutoencoderKLFlux2(**diffusers_ae_config(params))
    vae.load_state_dict(ae_original_to_diffusers(ae.state_dict()))
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_ae("tiny", "cpu", path=tmp_path / "vae")
    assert loaded.params.norm_groups == 16
    z = torch.randn(1, 16, 4, 4)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.decode(z), ae.decode(z), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- where the weights come from


def test_tiny_is_built_from_its_seed_and_has_no_files():
    info = model_info("tiny")
    assert info.weights == RandomWeights(seed=0) and not info.needs_files
    assert info.output_note == "noise image from the random-weight self-test model"
    assert all(entry.needs_files and not entry.output_note for entry in FLUX2_MODEL_INFO.values() if entry is not info)
    assert equal_state(load_flow_model("tiny", device="cpu").state_dict(), random_flow_model(TINY_PARAMS).state_dict())
    assert equal_state(load_ae("tiny", "cpu").state_dict(), random_ae(TINY_AE_PARAMS).state_dict())
    assert equal_state(load_text_encoder("tiny", "cpu").model.state_dict(), tiny_qwen3()[0].state_dict())
    assert default_dtype(info, torch.device("cpu")) == torch.float32
    assert detect_model_name(TINY_PARAMS) is None  # only entries with files are told apart by their shapes
    for refuse, what in ((find_weights, "has no weight files"), (local_parts, "has no weight files"),
                         (download_weights, "needs no download")):  # fmt: skip
        with pytest.raises(ValueError, match=f"^the tiny model {what}: it is built from random weights$"):
            refuse(info, None)


def test_any_entry_may_have_random_weights(monkeypatch):
    """The loaders read the entry's weight source, not its name: its seed and dtype count, and only the tiny text
    encoder exists with random weights."""
    klein = model_info("flux.2-klein-4b")
    random_klein = replace(klein, params=TINY_PARAMS, ae_params=TINY_AE_PARAMS, weights=RandomWeights(7, "float64"))
    monkeypatch.setitem(FLUX2_MODEL_INFO, klein.name, random_klein)
    assert not random_klein.needs_files and default_dtype(random_klein, torch.device("cpu")) == torch.float64
    expected = random_flow_model(TINY_PARAMS, seed=7).double().state_dict()
    assert equal_state(load_flow_model(klein.name, device="cpu").state_dict(), expected)
    assert equal_state(load_ae(klein.name, "cpu").state_dict(), random_ae(TINY_AE_PARAMS, seed=7).double().state_dict())
    with pytest.raises(ValueError, match="its qwen3 text encoder cannot be built from random weights"):
        load_text_encoder(klein.name, "cpu")
    for bad in ("fp32", "int64"):
        with pytest.raises(ValueError, match="must be one of float32"):
            RandomWeights(dtype=bad)
