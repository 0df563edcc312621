"""Several prompts in one call (`Flux2Pipeline.generate_many`, `flux2 generate --prompt-file`): one image per prompt
per seed, in prompt order, batched where the run allows it, each one its single run's image."""

import numpy as np
import pytest
from command import flux2
from PIL import Image

from flux2.pipeline import Flux2Pipeline, GenerationCancelled

SIZE = dict(width=32, height=32)
PROMPTS = ["a red fox", "a lighthouse at dusk", "three pears on a table"]


@pytest.fixture(scope="module")
def pipe() -> Flux2Pipeline:
    return Flux2Pipeline("tiny", device="cpu", watermark=None)


def pixels(out) -> np.ndarray:
    return np.asarray(out.image, dtype=np.int16)


def test_batched_images_are_their_single_runs_in_prompt_order(pipe):
    batched = pipe.generate_many(PROMPTS, seed=5, num_images=2, batch_size=2, **SIZE)
    assert [(out.record.prompt, out.record.seed) for out in batched] == [
        (prompt, seed) for prompt in PROMPTS for seed in (5, 6)
    ]
    singles = {(p, seed): pixels(pipe.generate(p, seed=seed, **SIZE)[0]) for p in PROMPTS for seed in (5, 6)}
    for i, out in enumerate(batched):
        own = singles[out.record.prompt, out.record.seed]
        assert np.abs(pixels(out) - own).max() <= 1  # batched matmuls may round differently, at most a level
        other = singles[PROMPTS[(i // 2 + 1) % 3], out.record.seed]  # the same seed, another prompt
        assert np.abs(pixels(out) - own).mean() < np.abs(pixels(out) - other).mean()  # each image is its prompt's


def test_runs_that_cannot_batch_run_one_by_one_exactly(pipe):
    many = pipe.generate_many(PROMPTS[:2], seed=3, true_cfg_scale=2.0, **SIZE)  # CFG: two passes per step
    for out in many:
        [single] = pipe.generate(out.record.prompt, seed=3, true_cfg_scale=2.0, **SIZE)
        assert np.array_equal(pixels(out), pixels(single))


def test_cancel_keeps_the_finished_images_and_bad_input_is_clear(pipe):
    import threading

    cancel, decoded = threading.Event(), []

    def stop_after_first_batch(progress) -> None:
        if progress.stage == "decode" and progress.step == progress.total:
            decoded.append(1)
            if len(decoded) == 2:  # both images of the first batch
                cancel.set()

    with pytest.raises(GenerationCancelled) as stopped:
        pipe.generate_many(PROMPTS, seed=1, batch_size=2, callback=stop_after_first_batch, cancel=cancel, **SIZE)
    assert [out.record.prompt for out in stopped.value.completed] == PROMPTS[:2]
    with pytest.raises(ValueError, match="needs a list of prompts"):
        pipe.generate_many("one prompt", **SIZE)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        pipe.generate_many(PROMPTS, batch_size=0, **SIZE)


def test_cli_prompt_file(tmp_path, cli_env):
    (tmp_path / "prompts.txt").write_text("a red fox\n\n# a comment\na lighthouse at dusk\n")
    result = flux2("generate", "--prompt-file", "prompts.txt", "--model", "tiny", "--width", "32", "--height", "32",
                   "--seed", "4", "-o", "shots", cwd=tmp_path, env=cli_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = sorted((tmp_path / "shots").iterdir())
    assert len(saved) == 2 and all(Image.open(path).size == (32, 32) for path in saved)
    both = flux2("generate", "x", "--prompt-file", "prompts.txt", "--model", "tiny", cwd=tmp_path, env=cli_env)
    assert both.returncode == 1 and "give a prompt or --prompt-file, not both" in both.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    none = flux2("generate", "--prompt-file", "empty.txt", "--model", "tiny", cwd=tmp_path, env=cli_env)
    assert none.returncode == 1 and "--prompt-file empty.txt has no prompts" in none.stderr
