"""One image over several processes (torch.distributed, gloo, 2 ranks on the CPU) with the tiny model.

Forwards are checked inside the ranks against the same model run whole in the same process (same thread count):
sequence parallelism to 1e-6 (bit for bit where the CPU's matrix products round a row alike whatever the row
count, as on the AMD EPYC box; ~1.5e-7 on an AVX-512 Xeon), CFG halves bit for bit against one half at a time,
tensor parallelism to 1e-6. Whole generations run through a real ParallelWorker against a Flux2Pipeline in this
process, both on one thread per process: on 2 threads a single process already differs from itself on 1 thread by
the rounding of split matrix products (1/255 in a pixel here), so exactness is only defined at equal thread counts.
"""

import threading
from unittest import mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from flux2.parallel import ParallelWorker
from flux2.parallel import forward as parallel_forward_module
from flux2.parallel import tensor as tensor_module
from flux2.parallel.forward import parallel_forward, restore_forward
from flux2.parallel.group import Groups, free_port, init_group, teardown
from flux2.parallel.run import WorkerSpec, build_pipeline
from flux2.parallel.sequence import Layout
from flux2.parallel.tensor import tensor_parallel_text_encoder, tensor_parallel_transformer
from flux2.pipeline import Flux2Pipeline, GenerationCancelled
from flux2.registry import TINY_PARAMS
from flux2.request import GenerationRequest
from flux2.sampling import batched_prc_img, batched_prc_txt
from flux2.tiny import random_flow_model, seeded

WORLD = 2
TOLERANCE = 1e-6  # tensor parallelism: relative to the output's largest magnitude


# ----------------------------------------------------------------------------- forwards, checked in the ranks


def forward_inputs(batch: int = 1, num_txt: int = 7, h: int = 3, w: int = 5, seed: int = 0) -> tuple:
    """Arguments of Flux2.forward for the tiny model; 7 text + 15 image tokens do not divide by 2 ranks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, TINY_PARAMS.in_channels, generator=g)
    _, x_ids = batched_prc_img(torch.zeros(batch, 1, h, w))
    ctx, ctx_ids = batched_prc_txt(torch.randn(batch, num_txt, TINY_PARAMS.context_in_dim, generator=g))
    return x, x_ids, torch.linspace(0.3, 0.8, batch), ctx, ctx_ids, None


def request(**settings) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a fox", "seed": 3, "width": 64, "height": 48, **settings})


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_parallel(model, args, **kwargs) -> torch.Tensor:
    parallel_forward(model, Groups())
    try:
        return model(*args, **kwargs)
    finally:
        restore_forward(model)


RIGHT_LAYOUT = Layout.of  # bound before the negative control patches Layout.of


def flipped_layout(lengths, ranks):
    """A deliberately wrong gather: every head sees the sequence reversed (a permutation attention does not
    care about mathematically, only in its rounding)."""
    right = RIGHT_LAYOUT(lengths, ranks)
    return Layout(right.streams, right.order.flip(0))


def sequence_checks(model) -> dict:
    found = {}
    for name, args in {"uneven": forward_inputs(), "even": forward_inputs(num_txt=8, h=4, w=4)}.items():
        found[f"sequence_{name}"] = relative_error(run_parallel(model, args), model(*args))
    args = forward_inputs()
    extra = torch.randn(1, 3, TINY_PARAMS.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.cat([args[4], torch.tensor([[[0, 0, 0, 7], [0, 0, 0, 8], [0, 0, 0, 9]]])], dim=1)
    with_extra = (*args[:4], ids, None)
    found["sequence_txt_extra"] = relative_error(run_parallel(model, with_extra, txt_extra=extra),
                                                 model(*with_extra, txt_extra=extra))  # fmt: skip
    with mock.patch.object(parallel_forward_module.Layout, "of", flipped_layout):
        flipped = run_parallel(model, args)
    found["flipped_equal"] = torch.equal(flipped, model(*args))
    found["flipped_error"] = relative_error(flipped, model(*args))
    # A shuffled shard: rank r holds the other rank's image tokens under its own positions.
    shuffled = (args[0].roll(8, dims=1), *args[1:])
    found["shuffled_error"] = relative_error(run_parallel(model, shuffled).roll(-8, dims=1), model(*args))
    return found


def cfg_checks(model) -> dict:
    args = forward_inputs(batch=2)
    one_at_a_time = torch.cat([model(*(a[i : i + 1] if a is not None else None for a in args)) for i in range(2)])
    split = run_parallel(model, args)
    return {
        "cfg_equal_halves": torch.equal(split, one_at_a_time),
        "cfg_vs_batched": relative_error(split, model(*args)),
    }


def tensor_checks() -> dict:
    mesh = init_device_mesh("cpu", (WORLD,))
    args = forward_inputs()
    whole = random_flow_model(TINY_PARAMS)(*args)
    sharded = tensor_parallel_transformer(random_flow_model(TINY_PARAMS), mesh)(*args)
    with mock.patch.object(tensor_module, "rank_major", lambda sizes, ranks: torch.arange(sum(sizes))):
        unordered = tensor_parallel_transformer(random_flow_model(TINY_PARAMS), mesh)(*args)
    encoder_whole, encoder_sharded = tiny_mistral(), tiny_mistral()
    tensor_parallel_text_encoder(encoder_sharded, mesh)
    tokens = torch.arange(3, 20)[None]
    states = [
        m(input_ids=tokens, output_hidden_states=True).hidden_states[-2] for m in (encoder_whole, encoder_sharded)
    ]
    return {
        "tensor_error": relative_error(sharded, whole),
        "tensor_unordered_error": relative_error(unordered, whole),
        "tensor_text_error": relative_error(states[1], states[0]),
        "tensor_text_heads": encoder_sharded.model.language_model.layers[0].self_attn.q_proj.weight.to_local().shape,
    }


def tensor_generation() -> dict:
    """The tensor-parallel worker's pipeline (sharded transformer; the tiny Qwen3's single key/value head keeps
    the text encoder whole) against a whole one in the same process."""
    sharded = build_pipeline(WorkerSpec("tiny", WORLD, "cpu", tensor=True), torch.device("cpu"))
    images = [pipe.run(request())[0].image for pipe in (sharded, Flux2Pipeline("tiny", device="cpu"))]
    return {"tensor_pixels": int(np.abs(np.asarray(images[0]).astype(int) - np.asarray(images[1])).max())}


def tiny_mistral() -> Mistral3ForConditionalGeneration:
    """A random Mistral-3 with key/value heads that divide over 2 ranks (4 query, 2 key/value heads)."""
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=64, patch_size=16),
    )  # fmt: skip
    return seeded(lambda: Mistral3ForConditionalGeneration(config), 0)


def forward_rank(rank: int, port: int, out_path: str) -> None:
    init_group(rank, WORLD, port)
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model = random_flow_model(TINY_PARAMS)
            found = {**sequence_checks(model), **cfg_checks(model), **tensor_checks(), **tensor_generation()}
        if rank == 0:
            torch.save(found, out_path)
    finally:
        teardown()


@pytest.fixture(scope="module")
def forwards(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parallel") / "forwards.pt"
    mp.start_processes(forward_rank, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return torch.load(out)


def test_sequence_parallel_forward_matches_to_rounding(forwards):
    assert forwards["sequence_uneven"] < TOLERANCE  # 7 + 15 tokens: padded slices
    assert forwards["sequence_even"] < TOLERANCE
    assert forwards["sequence_txt_extra"] < TOLERANCE  # IP-Adapter tokens in the text stream


def test_negative_controls_fail_the_comparison(forwards):
    assert forwards["shuffled_error"] > 1e-4  # a shard under the wrong positions: far beyond any rounding
    # Reversing the gathered order changes only the rounding of attention's sums: no more than rounding.
    assert not forwards["flipped_equal"] and 0 < forwards["flipped_error"] < 1e-5
    assert forwards["tensor_unordered_error"] > 1e-2  # fused [q | k | v] split without regrouping by rank


def test_cfg_halves_on_two_ranks_equal_one_half_at_a_time(forwards):
    assert forwards["cfg_equal_halves"]
    assert forwards["cfg_vs_batched"] < TOLERANCE  # batched on one device differs only in rounding


def test_tensor_parallel_transformer_and_text_encoder_within_1e6(forwards):
    assert forwards["tensor_error"] < TOLERANCE
    assert forwards["tensor_text_error"] < TOLERANCE
    assert tuple(forwards["tensor_text_heads"]) == (16, 32)  # each rank holds 2 of the 4 query heads
    assert forwards["tensor_pixels"] <= 1  # a whole generation: at most the rounding of one pixel level


# ----------------------------------------------------------------------------- whole generations


@pytest.fixture(scope="module")
def single(one_thread) -> Flux2Pipeline:
    return Flux2Pipeline("tiny", device="cpu")


@pytest.fixture(scope="module")
def worker():
    with mock.patch.dict("os.environ", {"OMP_NUM_THREADS": "1"}):  # the ranks' thread count, as `single`'s
        parallel = ParallelWorker("tiny", WORLD)
    yield parallel
    parallel.close()
    assert parallel.exit_codes == [0, 0]  # both ranks ended cleanly


def pixels(images) -> np.ndarray:
    [image] = images
    return np.asarray(image.image)


def test_sequence_parallel_generation_equals_one_process(worker, single):
    events, expected = [], []
    parallel = pixels(worker.run(request(), progress=events.append))
    assert np.array_equal(parallel, pixels(single.run(request(), callback=expected.append)))
    assert events == expected  # rank 0's progress, as one process reports it
    assert not np.array_equal(parallel, pixels(worker.run(request(seed=4))))


def test_cfg_parallel_generation_equals_one_process(worker, single):
    parallel = pixels(worker.run(request(true_cfg_scale=3.0, cfg_mode="batched")))
    assert np.array_equal(parallel, pixels(single.run(request(true_cfg_scale=3.0, cfg_mode="sequential"))))
    assert not np.array_equal(parallel, pixels(single.run(request())))  # CFG made a difference


def test_cancel_from_progress_stops_both_ranks_at_that_step(worker):
    cancel, seen = threading.Event(), []

    def stop_at_step_two(progress):
        seen.append((progress.stage, progress.step))
        if progress.stage == "denoise" and progress.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled, match="denoise"):
        worker.run(request(), progress=stop_at_step_two, cancel=cancel)
    assert seen[-1] == ("denoise", 2)  # no step ran after the decision
    [image] = worker.run(request())  # both ranks are in step again: a collective out of step would hang or fail
    assert image.image is not None


def test_an_error_in_progress_stops_the_ranks_and_comes_out(worker):
    def broken(progress):
        if progress.stage == "denoise":
            raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        worker.run(request(), progress=broken)
    assert worker.run(request())


def test_bad_input_in_the_ranks_comes_out_and_the_worker_carries_on(worker, tmp_path):
    with pytest.raises(ValueError, match="reference image 0"):
        worker.run(request(reference_images=(str(tmp_path / "missing.png"),)))
    assert worker.run(request())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(world_size=3), "must divide tiny's num_heads"),
        (dict(world_size=0), "positive integer"),
        (dict(world_size=2, device="tpu"), "device must be one of cpu, cuda"),
    ],
)
def test_bad_settings_are_named_before_any_process_starts(settings, message):
    with pytest.raises(ValueError, match=message):
        ParallelWorker("tiny", **settings)


def test_cli_gpus_2_makes_the_single_process_image(tmp_path, cli_env):
    """`flux2 generate --gpus 2` (two CPU processes here) saves the image one process makes, at one thread each."""
    from command import flux2
    from PIL import Image

    common = ["generate", "a fox", "--model", "tiny", "--width", "64", "--height", "48", "--seed", "3"]
    split = flux2(*common, "--gpus", "2", "-o", "split.png", cwd=tmp_path, env=cli_env)
    assert split.returncode == 0, split.stderr
    whole = flux2(*common, "-o", "whole.png", cwd=tmp_path, env=cli_env)
    assert whole.returncode == 0, whole.stderr
    pixels = [np.asarray(Image.open(tmp_path / name)) for name in ("split.png", "whole.png")]
    assert np.array_equal(*pixels)
    refused = flux2(*common, "--gpus", "2", "--compile", cwd=tmp_path, env=cli_env)
    assert refused.returncode == 1 and "--gpus cannot be combined" in refused.stderr


def test_studio_gpus_setting_serves_the_model_split(tmp_path, one_thread):
    """`flux2 serve --gpus 2` / `flux2 worker --gpus 2`: the studio's tasks run the same image on the split model."""
    from pydantic import ValidationError
    from studio_server import studio_settings

    from flux2.studio.tasks import PipelineHolder

    pipe = PipelineHolder(studio_settings(tmp_path, gpus=2)).get(lambda *progress: None)
    try:
        [split] = pipe.run(request(width=64, height=48, seed=3))
    finally:
        pipe.close()
    [whole] = Flux2Pipeline("tiny", device="cpu").run(request(width=64, height=48, seed=3))
    assert np.array_equal(np.asarray(split.image), np.asarray(whole.image))
    with pytest.raises(ValidationError, match="gpus > 1 cannot be combined with upsample"):
        studio_settings(tmp_path, gpus=2, upsample="local")
    with pytest.raises(ValidationError, match="gpus > 1 cannot be combined with compile"):
        studio_settings(tmp_path, gpus=2, compile=True)
