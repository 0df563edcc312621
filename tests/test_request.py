"""GenerationRequest: each setting's range and model rule in one place, a seed drawn once, and every door (Python,
CLI, REPL, HTTP) offering the same settings with the same checks."""

import argparse
from dataclasses import replace

import pytest

from flux2.cli.config import REPL_KEYS
from flux2.cli.request_options import add_request_options, request_from_args
from flux2.registry import model_info
from flux2.request import MAX_SEED, GenerationRequest, request_params

KLEIN, BASE, TINY = model_info("flux.2-klein-4b"), model_info("flux.2-klein-base-4b"), model_info("tiny")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(width=100), "width must be a positive multiple of 16 px, at most 4096, got 100"),
        (dict(height=8192), "height must be a positive multiple of 16 px, at most 4096, got 8192"),
        (dict(num_steps=0), "num_steps must be a positive integer, at most 200, got 0"),
        (dict(num_steps=2.5), "num_steps must be a positive integer"),
        (dict(guidance=float("nan")), "guidance must be a number >= 0 and <= 30, got nan"),
        (dict(seed=-1), f"seed must be an integer in [0, {MAX_SEED}], got -1"),
        (dict(seed=MAX_SEED, num_images=2), f"seed must be an integer in [0, {MAX_SEED - 1}] for 2 images"),
        (dict(seed=True), "seed must be an integer"),
        (dict(cfg_mode="parallel"), "cfg_mode must be one of auto, batched, sequential, got 'parallel'"),
        (dict(prompt="x" * 4001), "prompt must be text of at most 4000 characters"),
        (dict(match_image_size=0), "match_image_size=0 but there are 0 reference images"),
        (dict(mode="img2img"), "img2img needs a source image"),
        (dict(mode="inpaint", image="a.png", mask="m.png", width=64), "inpaint takes its size from the source"),
        (dict(mode="outpaint", image="a.png", left=16, crop_padding=4), "outpaint does not take crop_padding"),
        (dict(mode="outpaint", image="a.png"), "outpaint needs at least one margin > 0"),
    ],
)
def test_a_bad_setting_names_the_field_and_what_is_allowed(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GenerationRequest(**{"prompt": "a fox", **settings}).check()


def test_model_rules():
    with pytest.raises(ValueError, match="flux.2-klein-4b is a distilled model: num_steps is fixed at 4"):
        GenerationRequest(num_steps=8).resolve(KLEIN)
    with pytest.raises(ValueError, match="does not use a negative prompt"):
        GenerationRequest(negative_prompt="blurry").resolve(KLEIN)
    with pytest.raises(ValueError, match="runs true CFG already"):
        GenerationRequest(true_cfg_scale=3.0).resolve(BASE)
    with pytest.raises(ValueError, match="tiny has no guidance"):
        GenerationRequest(guidance=3.0).resolve(TINY)
    assert GenerationRequest(negative_prompt="blurry", true_cfg_scale=3.0).resolve(KLEIN).cfg_scale(KLEIN) == 3.0
    assert GenerationRequest().resolve(BASE).cfg_scale(BASE) == 4.0  # base models: the guidance is the CFG scale


def test_resolve_fills_the_model_defaults_and_draws_the_seed_once():
    request = GenerationRequest(prompt="a fox").resolve(BASE)
    assert (request.width, request.height, request.num_steps, request.guidance) == (1024, 1024, 50, 4.0)
    assert isinstance(request.seed, int) and request.resolved_for == BASE.name
    assert request.resolve(BASE) is request  # resolved once: the same seed wherever it travels
    assert GenerationRequest(prompt="a fox", seed=5, num_images=3).resolve(KLEIN).seeds == [5, 6, 7]
    edit = GenerationRequest(mode="img2img", image="a.png").resolve(KLEIN)
    assert (edit.width, edit.height, edit.strength) == (None, None, 0.8)  # the source decides the size


def test_a_changed_request_is_checked_again_unless_only_its_inputs_change():
    request = GenerationRequest(prompt="a fox", seed=3).resolve(KLEIN)
    changed = replace(request, num_steps=8)
    assert changed.resolved_for is None
    with pytest.raises(ValueError, match="num_steps is fixed at 4"):
        changed.resolve(KLEIN)
    settled = request.with_inputs(prompt="a fox @Hero", reference_images=("hero.png",))
    assert settled.resolved_for == KLEIN.name and settled.seed == 3
    with pytest.raises(ValueError, match="with_inputs takes"):
        request.with_inputs(seed=4)
    with pytest.raises(ValueError, match="prompt must be text of at most 4000"):
        request.with_inputs(prompt="x" * 4001)


def test_fitted_drops_what_the_model_cannot_use_and_says_so():
    sent = GenerationRequest(prompt="a fox", num_steps=25, guidance=2.0, negative_prompt="blurry")
    request, notes = sent.fitted(KLEIN)
    assert (request.num_steps, request.guidance, request.negative_prompt) == (4, 1.0, None)
    assert notes == ("flux.2-klein-4b is distilled: it runs 4 steps at guidance 1.0",
                     "the negative prompt needs true CFG on flux.2-klein-4b (true_cfg_scale): not used")  # fmt: skip
    request, notes = GenerationRequest(guidance=2.0).fitted(TINY)
    assert request.guidance == 1.0 and notes == ("tiny has no guidance: guidance_scale not used",)
    request, notes = sent.fitted(BASE)
    assert (request.num_steps, request.guidance, request.negative_prompt, notes) == (25, 2.0, "blurry", ())
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        GenerationRequest(num_steps=0).fitted(KLEIN)  # out of range is refused, not dropped


def test_stored_and_read_back_unchanged_and_still_resolved():
    request = GenerationRequest(prompt="a fox", reference_images=("a.png",), mode="generate").resolve(KLEIN)
    again = GenerationRequest.from_json(request.to_json())
    assert again == request and again.resolved_for == KLEIN.name and again.reference_images == ("a.png",)
    from PIL import Image

    with pytest.raises(ValueError, match="only image paths can be stored"):
        GenerationRequest(reference_images=(Image.new("RGB", (8, 8)),)).to_json()


def test_every_cli_setting_is_an_option_and_a_repl_key_with_the_same_checks():
    parser = argparse.ArgumentParser()
    add_request_options(parser)
    offered = {name for name, spec in request_params().items() if spec.cli}
    assert offered <= set(REPL_KEYS.values())
    args = parser.parse_args(["--steps", "28", "--guidance", "3.5", "--seed", "7", "--cfg-mode", "sequential"])
    request = request_from_args(args, prompt="a fox")
    assert (request.num_steps, request.guidance, request.seed, request.cfg_mode) == (28, 3.5, 7, "sequential")
    assert request.width is None  # not given: the model's default, decided when resolved
    with pytest.raises(SystemExit):
        parser.parse_args(["--cfg-mode", "parallel"])


def test_generate_refuses_an_unknown_setting_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="generate does not take steps; it takes .*num_steps"):
        GenerationRequest.from_settings("generate", prompt="a fox", steps=4)
