"""The speed and memory settings as users give them: `flux2 generate` options, the studio's settings, and
`Acceleration.apply` on a pipeline. Each transform's own numerics are tested in its module's tests."""

import numpy as np
import pytest
from command import flux2
from PIL import Image

from flux2.pipeline import Flux2Pipeline
from flux2.studio.config import StudioSettings
from flux2.transforms.acceleration import Acceleration
from flux2.transforms.step_cache import active_step_cache

SMALL = ["--model", "tiny", "--width", "64", "--height", "64", "--seed", "3", "--no-watermark"]


def test_cli_options_change_nothing_in_the_image_when_they_are_exact(tmp_path, cli_env):
    plain = flux2("generate", "a fox", *SMALL, "-o", "plain.png", cwd=tmp_path, env=cli_env)
    assert plain.returncode == 0, plain.stderr
    options = ["--threads", "1", "--step-cache", "0", "--offload-text-encoder", "--block-offload"]
    same = flux2("generate", "a fox", *SMALL, *options, "-o", "same.png", cwd=tmp_path, env=cli_env)
    assert same.returncode == 0, same.stderr
    assert Image.open(tmp_path / "plain.png").tobytes() == Image.open(tmp_path / "same.png").tobytes()
    cached = flux2("generate", "a fox", *SMALL, "--step-cache", "1", "--memory-report", "-o", "cached.png",
                   cwd=tmp_path, env=cli_env)  # fmt: skip
    assert cached.returncode == 0 and "step cache: skipped" in cached.stderr, cached.stderr
    assert "peak memory per stage" in cached.stderr and "encode_text" in cached.stderr, cached.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--attention", "fastest"], "attention must be one of auto, math, efficient, flash, cudnn, sage, fa3"),
        (["--step-cache", "2"], "step_cache must be a threshold in [0, 1], got 2.0"),
        (["--threads", "0"], "threads must be a positive integer, got 0"),
        (["--tiled-decode", "yes"], "tiled_decode must be one of auto, on, off, got 'yes'"),
        (["--fp8", "e4m3"], "fp8 must be one of off, tensor, rowwise, got 'e4m3'"),
    ],
)
def test_bad_settings_fail_before_loading(tmp_path, cli_env, args, message):
    result = flux2("generate", "x", "--model", "tiny", *args, cwd=tmp_path, env=cli_env)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_apply_puts_the_transforms_on_a_pipeline_and_the_studio_uses_the_same_settings():
    pipe = Flux2Pipeline("tiny", device="cpu", watermark=None)
    [before] = pipe.generate("a fox", width=32, height=32, seed=1)
    settings = StudioSettings(step_cache=0.0001, attention="math", offload_text_encoder=True, tiled_decode="on")
    applied = settings.acceleration().apply(pipe)
    assert pipe.tiling is True
    assert active_step_cache(pipe.flow_model) is applied.step_cache and applied.step_cache in pipe.stage_hooks
    [after] = pipe.generate("a fox", width=32, height=32, seed=1)
    assert applied.step_cache.stats["calls"] >= 1
    # 32 px is one tile: tiling changes nothing here (its error is measured in test_tiling.py)
    assert np.abs(np.asarray(after.image, float) - np.asarray(before.image, float)).max() <= 1
    with pytest.raises(ValueError, match="attention must be one of"):
        Acceleration(attention="fastest").check()


def test_the_cli_lists_the_attention_backends_the_transform_knows():
    from flux2.transforms.acceleration import ATTENTION_NAMES
    from flux2.transforms.attention import NAMES

    assert ATTENTION_NAMES == NAMES


def test_fp8_setting_quantizes_the_transformer_and_halves_its_linear_weights():
    from flux2.transforms.quantized import QuantizedLinear

    pipe = Flux2Pipeline("tiny", device="cpu", watermark=None)
    [before] = pipe.generate("a fox", width=64, height=64, seed=1)
    dense_bytes = sum(
        m.weight.nbytes for m in pipe.flow_model.modules() if type(m).__name__ == "Linear" and m.bias is None
    )
    Acceleration(fp8="rowwise").check().apply(pipe)
    layers = [m for m in pipe.flow_model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.weight_scale.shape == (m.out_features, 1) for m in layers)
    assert sum(m.weight.nbytes for m in layers) == dense_bytes // 4  # fp32 -> float8 (bf16 -> float8 on a GPU: 1/2)
    [after] = pipe.generate("a fox", width=64, height=64, seed=1)
    error = np.abs(np.asarray(after.image, float) - np.asarray(before.image, float))
    assert 0 < error.max() and error.mean() < 8  # measured: a few levels on the tiny model's noise images
