"""CPU offload (flux2.transforms.offload), observed: each model is on the device exactly while a stage that runs it
does, and back home on the CPU, as the very same tensors, afterwards.

The pipeline runs on the meta device, so that "on the device" and "on the CPU" differ on a machine without a
GPU (meta tensors carry shapes, not values). The Qwen3 text encoder cannot run on meta (transformers reads mask
values), so a small pure-torch encoder of the same width stands in for it here.
"""

import pytest
import torch
from PIL import Image
from torch import nn

from flux2.pipeline import Flux2Pipeline
from flux2.registry import TINY_AE_PARAMS, TINY_PARAMS
from flux2.tiny import random_ae, random_flow_model
from flux2.transforms import offload

MODELS = ("text_encoder", "flow_model", "ae")


class WordEmbedder(nn.Module):
    """Prompts -> [B, 8, width]: one embedding per word (hashed), on whatever device its weights are."""

    def __init__(self, width: int):
        super().__init__()
        self.output_dim = width
        self.table = nn.Embedding(97, width)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.tensor([[hash(w) % 97 for w in (p.split() + [""] * 8)[:8]] for p in prompts])
        return self.table(ids.to(self.table.weight.device))


class Stop(Exception):
    """Raised as decoding starts: meta tensors have no values to unpack latents by, nor pixels to make."""


def placements(pipe: Flux2Pipeline) -> list[tuple[str, dict[str, str]]]:
    """Run one edit and record, as each model starts a forward, which device every model's weights are on."""
    seen = []

    def recorder(name: str):
        def record(module, args) -> None:
            seen.append((name, {m: next(getattr(pipe, m).parameters()).device.type for m in MODELS}))

        return record

    running = {"text_encoder": pipe.text_encoder, "flow_model": pipe.flow_model, "ae.encoder": pipe.ae.encoder}
    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in running.items()]

    def stop_at_decode(progress) -> None:
        if progress.stage == "decode":
            raise Stop

    try:
        with pytest.raises(Stop):
            pipe.edit("a fox", [Image.new("RGB", (64, 64))], width=32, height=32, seed=1, callback=stop_at_decode)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def expected_on_device(name: str) -> set[str]:
    """The reference images are encoded by the AE alone; the sampling stage holds the transformer and the AE
    that decodes its latents."""
    return {"text_encoder": {"text_encoder"}, "ae.encoder": {"ae"}, "flow_model": {"flow_model", "ae"}}[name]


def check(seen: list[tuple[str, dict[str, str]]]) -> None:
    assert {name for name, _ in seen} == {"text_encoder", "flow_model", "ae.encoder"}
    for name, devices in seen:
        on_device = {model for model, device in devices.items() if device == "meta"}
        assert on_device == expected_on_device(name), (name, devices)


@pytest.fixture
def offloaded() -> Flux2Pipeline:
    parts = dict(text_encoder=WordEmbedder(TINY_PARAMS.context_in_dim), flow_model=random_flow_model(TINY_PARAMS),
                 ae=random_ae(TINY_AE_PARAMS))  # fmt: skip
    return Flux2Pipeline("tiny", device="meta", dtype=torch.float32, cpu_offload=True, watermark=None, **parts)


def test_each_model_is_on_the_device_only_while_its_stage_runs(offloaded):
    home = {name: dict(getattr(offloaded, name).state_dict(keep_vars=True)) for name in MODELS}
    before = {name: {k: v.detach().clone() for k, v in tensors.items()} for name, tensors in home.items()}
    check(placements(offloaded))
    for name in MODELS:  # back home: the same tensor objects, with their values
        after = getattr(offloaded, name).state_dict(keep_vars=True)
        assert all(after[key] is tensor for key, tensor in home[name].items())
        assert all(torch.equal(after[key], value) for key, value in before[name].items())


def test_the_check_fails_for_a_broken_offload(offloaded, monkeypatch):
    """Negative control: a stage that forgets one of its models is caught."""
    monkeypatch.setitem(offload.STAGE_MODELS, "sample", ("flow_model",))  # the AE would decode at home
    with pytest.raises(AssertionError):
        check(placements(offloaded))


def test_without_offload_everything_stays_on_the_device(offloaded):
    """Negative control: the same check on a pipeline without offload (every model always on the device)."""
    parts = {name: getattr(offloaded, name).to("meta") for name in ("text_encoder", "flow_model", "ae")}
    pipe = Flux2Pipeline("tiny", device="meta", dtype=torch.float32, watermark=None, **parts)
    seen = placements(pipe)
    assert all(set(devices.values()) == {"meta"} for _, devices in seen)
    with pytest.raises(AssertionError):
        check(seen)


def test_only_the_text_encoder_can_be_offloaded(offloaded):
    """It runs once per new prompt: the cheapest model to keep away from the device."""
    parts = {name: getattr(offloaded, name).to("meta") for name in ("flow_model", "ae")}
    pipe = Flux2Pipeline("tiny", device="meta", dtype=torch.float32, watermark=None,
                         text_encoder=offloaded.text_encoder, **parts)  # fmt: skip
    offload.cpu_offload(pipe, parts=("text_encoder",))
    for name, devices in placements(pipe):
        expected = {"text_encoder", "flow_model", "ae"} if name == "text_encoder" else {"flow_model", "ae"}
        assert {model for model, device in devices.items() if device == "meta"} == expected, (name, devices)
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="parts must be among text_encoder, ae, flow_model, got vae"):
        offload.cpu_offload(pipe, parts=("vae",))
