"""The pipeline object with the tiny model: outputs, seeds, records, progress, cancellation and bad input."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from flux2.pipeline import Flux2Pipeline, GenerationCancelled, Progress
from flux2.registry import TINY_AE_PARAMS, TINY_PARAMS
from flux2.tiny import random_ae, random_flow_model


@pytest.fixture(scope="module")
def pipe() -> Flux2Pipeline:
    return Flux2Pipeline("tiny", device="cpu")


def pixels(out) -> np.ndarray:
    return np.asarray(out.image)


def test_tiny_generates_an_image_with_a_full_record(pipe):
    [out] = pipe.generate("a lighthouse", width=64, height=48, seed=11)
    assert out.image.size == (64, 48) and out.image.mode == "RGB"
    record = out.record.to_dict()
    assert record["model"] == "tiny" and record["seed"] == 11 and record["num_steps"] == 4
    assert (record["width"], record["height"], record["guidance"]) == (64, 48, 1.0)
    assert "noise" in record["note"]  # the tiny model is labelled as producing noise
    assert record["software"].startswith("flux2 ")


def test_same_seed_same_image_and_other_seed_differs(pipe):
    a = pipe.generate("a fox", width=32, height=32, seed=3)[0]
    b = pipe.generate("a fox", width=32, height=32, seed=3)[0]
    c = pipe.generate("a fox", width=32, height=32, seed=4)[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_random_seed_is_recorded_and_reproduces(pipe):
    first = pipe.generate("a fox", width=32, height=32)[0]
    again = pipe.generate("a fox", width=32, height=32, seed=first.record.seed)[0]
    assert np.array_equal(pixels(first), pixels(again))


def test_several_images_each_reproducible_from_its_seed(pipe):
    outs = pipe.generate("a fox", width=32, height=32, seed=20, num_images=3)
    assert [o.record.seed for o in outs] == [20, 21, 22]
    single = pipe.generate("a fox", width=32, height=32, seed=22)[0]
    assert np.array_equal(pixels(outs[2]), pixels(single))


def test_a_repeated_prompt_is_not_encoded_again(pipe):
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args))
    try:
        [first] = pipe.generate("a lighthouse in fog", width=32, height=32, seed=1)
        [second] = pipe.generate("a lighthouse in fog", width=32, height=32, seed=1)
        assert len(calls) == 1 and pixels(first).tobytes() == pixels(second).tobytes()
        pipe.generate("a lighthouse in rain", width=32, height=32, seed=1)
        assert len(calls) == 2  # another prompt is encoded
    finally:
        handle.remove()


def test_prompt_changes_the_image(pipe):
    a = pipe.generate("a fox", width=32, height=32, seed=1)[0]
    b = pipe.generate("a ship", width=32, height=32, seed=1)[0]
    assert not np.array_equal(pixels(a), pixels(b))


def test_editing_with_references_and_match_image_size(pipe):
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 112, 3), dtype=np.uint8))
    plain = pipe.generate("make it blue", width=112, height=80, seed=5)[0]
    [edited] = pipe.edit("make it blue", [ref], seed=5, match_image_size=0)
    assert edited.image.size == (112, 80)
    assert len(edited.record.references) == 1 and len(edited.record.references[0]) == 64
    assert not np.array_equal(pixels(plain), pixels(edited))


def test_progress_events_cover_every_stage(pipe):
    events: list[Progress] = []
    pipe.generate("a fox", width=32, height=32, seed=1, callback=events.append)
    denoise = [e.step for e in events if e.stage == "denoise"]
    assert denoise == [0, 1, 2, 3, 4]
    assert [e.stage for e in events][0] == "encode_text" and events[-1].stage == "decode"


def test_cancel_between_steps_keeps_finished_images_and_pipeline_usable(pipe):
    cancel = threading.Event()
    denoise_starts = []

    def stop_in_second_image(event: Progress) -> None:
        if event.stage == "denoise" and event.step == 0:
            denoise_starts.append(event)
        if len(denoise_starts) == 2 and event.stage == "denoise" and event.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled) as err:
        pipe.generate("a fox", width=32, height=32, seed=1, num_images=3, callback=stop_in_second_image, cancel=cancel)
    assert [out.record.seed for out in err.value.completed] == [1]
    single = pipe.generate("a fox", width=32, height=32, seed=1)[0]
    assert np.array_equal(pixels(err.value.completed[0]), pixels(single))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=100), "width must be a positive multiple of 16"),
        (dict(height=0), "height must be a positive multiple of 16"),
        (dict(width=-16), "width must be a positive multiple of 16"),
        (dict(num_steps=0), "num_steps must be a positive integer"),
        (dict(num_images=0), "num_images"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(negative_prompt="blurry"), "negative prompt"),
        (dict(reference_images=["/no/such/image.png"]), "reference image 0 not found"),
        (dict(reference_images=[Image.new("RGB", (32, 32))]), "at least 64 px"),
        (dict(reference_images=[Image.new("RGB", (1000, 64))]), "aspect ratio"),
        (dict(match_image_size=0), "match_image_size=0 but there are 0 reference images"),
        (dict(match_image_size=0, width=64), "either width/height or match_image_size"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a fox", **kwargs)


def test_unreadable_reference_file(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.generate("a fox", reference_images=[bad])


@pytest.fixture(scope="module")
def tiny_parts(pipe):
    return dict(
        device="cpu", dtype=torch.float32, flow_model=pipe.flow_model, ae=pipe.ae, text_encoder=pipe.text_encoder
    )


@pytest.mark.parametrize("name", ["flux.2-klein-4b", "flux.2-klein-9b-kv"])
def test_distilled_models_fix_steps_and_guidance(tiny_parts, name):
    pipe = Flux2Pipeline(name, **tiny_parts)
    with pytest.raises(ValueError, match=f"{name} is a distilled model: num_steps is fixed at 4 \\(got 8\\)"):
        pipe.generate("a fox", width=32, height=32, num_steps=8)
    with pytest.raises(ValueError, match="guidance is fixed at 1.0 \\(got 2.5\\)"):
        pipe.generate("a fox", width=32, height=32, guidance=2.5)


def test_base_model_runs_cfg_with_negative_prompt(tiny_parts):
    pipe = Flux2Pipeline("flux.2-klein-base-4b", **tiny_parts)
    a = pipe.generate("a fox", width=32, height=32, seed=2, num_steps=3)[0]
    b = pipe.generate("a fox", width=32, height=32, seed=2, num_steps=3, negative_prompt="blurry")[0]
    c = pipe.generate("a fox", width=32, height=32, seed=2, num_steps=3, guidance=1.0)[0]
    assert a.record.guidance == 4.0 and b.record.negative_prompt == "blurry"
    assert not np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_kv_model_uses_the_cached_path_with_references(tiny_parts):
    pipe = Flux2Pipeline("flux.2-klein-9b-kv", **tiny_parts)
    ref = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    [out] = pipe.edit("a fox", [ref], width=32, height=32, seed=2)
    assert out.record.kv_cache
    [plain] = Flux2Pipeline("flux.2-klein-9b", **tiny_parts).edit("a fox", [ref], width=32, height=32, seed=2)
    assert not plain.record.kv_cache
    assert not np.array_equal(pixels(out), pixels(plain))  # KV: t=0 refs that attend only to themselves


def test_cpu_offload_path_gives_the_same_image(tiny_parts):
    """The offload code path changes nothing numerically (tests/test_offload.py observes the placement)."""
    parts = dict(tiny_parts, flow_model=random_flow_model(TINY_PARAMS), ae=random_ae(TINY_AE_PARAMS))
    on = Flux2Pipeline("tiny", cpu_offload=True, **parts).generate("a fox", width=32, height=32, seed=9)[0]
    off = Flux2Pipeline("tiny", **parts).generate("a fox", width=32, height=32, seed=9)[0]
    assert np.array_equal(pixels(on), pixels(off))


def test_empty_negative_prompt_is_the_default_everywhere(pipe):
    a = pipe.generate("a fox", width=32, height=32, seed=1, negative_prompt="")[0]
    assert a.record.negative_prompt is None


def test_parts_of_different_models_are_refused_clearly(tiny_parts):
    from dataclasses import replace

    wider_text = random_flow_model(replace(TINY_PARAMS, context_in_dim=2 * TINY_PARAMS.context_in_dim))
    with pytest.raises(ValueError, match="text encoder gives 96 features per token but the tiny transformer takes 192"):
        Flux2Pipeline("tiny", **dict(tiny_parts, flow_model=wider_text))
    other_latents = random_flow_model(replace(TINY_PARAMS, in_channels=32))
    with pytest.raises(ValueError, match="autoencoder gives 16 latent channels but the transformer takes 32"):
        Flux2Pipeline("tiny", **dict(tiny_parts, flow_model=other_latents))
