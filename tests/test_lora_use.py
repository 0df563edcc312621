"""LoRAs where users give them: the pipeline per request and fused, `flux2 generate --lora`, the REPL, the studio
(its LoRA folder, a route listing it, a job naming one), and the record of every image.

The files here are written in ai-toolkit's layout by a few lines of safetensors; every trainer's layout and the
formulas are tested in test_lora.py."""

import hashlib
import json

import numpy as np
import pytest
import torch
from command import flux2
from quantized_files import write_fp8_comfy
from safetensors.torch import save_file
from studio_server import create_project, running_studio, studio_settings, tiny_pipeline, wait_terminal

from flux2.cli.config import parse_key_values
from flux2.pipeline import Flux2Pipeline
from flux2.provenance import read_provenance
from flux2.request import GenerationRequest, LoraChoice
from flux2.transforms.quantized import QuantizedLinear
from flux2.util import load_flow_model

SIZE = dict(width=64, height=64, seed=11)
TARGETS = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1")


def write_lora(path, model, rank: int = 4, scale: float = 0.5, seed: int = 0):
    """A LoRA on a few layers of `model`, as ai-toolkit names them, with factors large enough to show."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors = {}
    for name in TARGETS:
        out_features, in_features = modules[name].weight.shape
        tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
        tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    save_file(tensors, str(path))
    return path


def pixels(out) -> np.ndarray:
    return np.asarray(out.image, dtype=np.int16)


@pytest.fixture(scope="module")
def pipe() -> Flux2Pipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def style(tmp_path_factory, pipe):
    return write_lora(tmp_path_factory.mktemp("loras") / "style.safetensors", pipe.flow_model)


def test_a_request_applies_its_loras_alone_and_records_them(pipe, style):
    [base] = pipe.generate("a fox", **SIZE)
    [styled] = pipe.generate("a fox", loras=[(str(style), 0.8)], **SIZE)
    assert np.abs(pixels(styled) - pixels(base)).mean() > 1  # the LoRA changes the image
    [entry] = styled.record.loras
    assert entry == {"name": "style.safetensors", "sha256": hashlib.sha256(style.read_bytes()).hexdigest(),
                     "strength": 0.8, "fused": False}  # fmt: skip
    assert base.record.loras == ()
    # The next request without it runs the base weights exactly: switching needs no reload.
    [again] = pipe.generate("a fox", **SIZE)
    assert np.array_equal(pixels(again), pixels(base)) and again.record.loras == ()
    [off] = pipe.generate("a fox", loras=[f"{style}:0"], **SIZE)
    assert np.array_equal(pixels(off), pixels(base))  # strength 0 is no change at all


def test_fused_gives_the_pixels_of_the_request_and_unfuses_exactly(pipe, style):
    [unfused] = pipe.generate("a fox", loras=[(str(style), 0.8)], **SIZE)
    weights = {k: v.clone() for k, v in pipe.flow_model.state_dict().items()}
    fresh = Flux2Pipeline("tiny", device="cpu")
    fresh.fuse_loras([(str(style), 0.8)])
    [fused] = fresh.generate("a fox", **SIZE)
    assert np.abs(pixels(fused) - pixels(unfused)).max() <= 1  # float rounding in the merged weights, at most
    assert fused.record.loras[0]["fused"] is True and fused.record.loras[0]["strength"] == 0.8
    fresh.unfuse_loras()
    assert all(torch.equal(fresh.flow_model.state_dict()[k], v) for k, v in weights.items())


def test_bad_lora_settings_name_the_field():
    with pytest.raises(ValueError, match=r"loras\[0\] \(a.safetensors:80\): its strength must be in \[-10, 10\]"):
        GenerationRequest.from_settings(prompt="x", loras=["a.safetensors:80"]).check()
    with pytest.raises(ValueError, match="a LoRA is PATH"):
        GenerationRequest.from_settings(prompt="x", loras=[3])
    assert LoraChoice.parse(r"C:\loras\a.safetensors") == LoraChoice(r"C:\loras\a.safetensors", 1.0)
    stored = GenerationRequest.from_settings(prompt="x", loras=["a.safetensors:0.5"]).to_json()
    assert stored["loras"] == [{"path": "a.safetensors", "strength": 0.5}]
    assert GenerationRequest.from_json(stored).loras == (LoraChoice("a.safetensors", 0.5),)


def test_cli_lora_option_is_repeatable_and_recorded(tmp_path, cli_env, pipe, style):
    other = write_lora(tmp_path / "detail.safetensors", pipe.flow_model, seed=1)
    args = ["generate", "a fox", "--model", "tiny", "--width", "64", "--height", "64", "--seed", "3", "--json",
            "--lora", f"{style}:0.7", "--lora", str(other), "-o", "out.png"]  # fmt: skip
    result = flux2(*args, cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    names = [(lora["name"], lora["strength"]) for lora in json.loads(result.stdout)["images"][0]["loras"]]
    assert names == [("style.safetensors", 0.7), ("detail.safetensors", 1.0)]
    assert read_provenance(tmp_path / "out.png")["loras"][0]["sha256"] == hashlib.sha256(style.read_bytes()).hexdigest()
    missing = flux2("generate", "x", "--model", "tiny", "--lora", "gone.safetensors", cwd=tmp_path, env=cli_env)
    assert missing.returncode == 1 and "--lora gone.safetensors: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_repl_loras_key(tmp_path, style):
    said = []
    values = parse_key_values(f"loras={style}:0.5,{style}", said.append)
    assert values["loras"] == (LoraChoice(str(style), 0.5), LoraChoice(str(style), 1.0))
    assert parse_key_values("loras=[]", said.append)["loras"] == ()
    with pytest.raises(ValueError, match="loras: no such file: gone.safetensors"):
        parse_key_values("loras=gone.safetensors:0.5", said.append)


def test_studio_offers_the_loras_in_its_folder_and_a_job_names_one(tmp_path, pipe, style):
    data = tmp_path / "data"
    (data / "loras").mkdir(parents=True)
    (data / "loras" / "style.safetensors").write_bytes(style.read_bytes())
    with running_studio(studio_settings(data)) as service:
        client = service.client
        [offered] = client.get("/loras").json()
        assert offered["name"] == "style.safetensors" and offered["size_bytes"] == style.stat().st_size
        project = create_project(client)
        body = {"project_id": project, "prompt": "a fox", "width": 64, "height": 64, "seed": 5}
        jobs_before = service.job_count()
        refusals = (([{"name": "nope.safetensors"}], "loras[0].name 'nope.safetensors' is not a LoRA"),
                    ([{"name": "../studio.db"}], "is not a LoRA of this service; it has style"),
                    ([{"name": "style.safetensors", "strength": 50}], "less than or equal to 10"))  # fmt: skip
        for loras, message in refusals:
            refused = client.post("/generate/image", json={**body, "loras": loras})
            assert refused.status_code == 422 and message in refused.text, refused.text
        assert service.job_count() == jobs_before  # nothing stored for a refused request
        queued = client.post(
            "/generate/image", json={**body, "loras": [{"name": "style.safetensors", "strength": 0.6}]}
        )
        assert queued.status_code == 200, queued.text
        status = wait_terminal(client, queued.json()["job_id"], timeout=60)
        assert status["status"] == "completed", status
        [image] = client.get(f"/projects/{project}/images").json()
        [entry] = json.loads(image["meta_json"])["record"]["loras"]
        assert (entry["name"], entry["strength"]) == ("style.safetensors", 0.6)


def test_a_pipeline_on_an_fp8_file_generates_and_takes_a_lora(tmp_path, pipe, style):
    """The quantised layers stay float8 in memory; the LoRA's hooks read their weights through dense_weight()."""
    path = write_fp8_comfy(pipe.flow_model.state_dict(), tmp_path / "tiny-fp8.safetensors")
    flow_model = load_flow_model(path=path, device="cpu", dtype=torch.float32)
    assert any(isinstance(m, QuantizedLinear) for m in flow_model.modules())
    fp8 = Flux2Pipeline("tiny", device="cpu", flow_model=flow_model, ae=pipe.ae, text_encoder=pipe.text_encoder)
    [base] = pipe.generate("a fox", **SIZE)
    [quantized] = fp8.generate("a fox", **SIZE)
    [styled] = fp8.generate("a fox", loras=[(str(style), 0.8)], **SIZE)
    [styled_full] = pipe.generate("a fox", loras=[(str(style), 0.8)], **SIZE)
    difference = np.abs(pixels(quantized) - pixels(base)).mean()
    assert difference < 3  # float8's rounding (measured: 1.05 of 255 on average), against the LoRA's 8
    assert np.abs(pixels(styled) - pixels(quantized)).mean() > 4  # the LoRA applies on the quantised model...
    assert np.abs(pixels(styled) - pixels(styled_full)).mean() < 3  # ...as it does on the full-precision one
    assert styled.record.loras[0]["name"] == "style.safetensors"
