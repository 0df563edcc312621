"""Regional compilation (flux2.transforms.compile): same numbers as eager, one graph per block class whatever the
depth, no recompilation across image sizes once warm, and an exact way back to eager.

One inductor compilation (~15 s on 2 cores with a warm inductor cache, over a minute cold) serves most tests, a
frame counter around it; the rest count with `CompileCounter`, which traces like inductor but runs eagerly.
"""

from dataclasses import replace

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from flux2.model import DoubleStreamBlock, SingleStreamBlock
from flux2.pipeline import Flux2Pipeline
from flux2.registry import TINY_PARAMS
from flux2.sampling import batched_prc_img, batched_prc_txt, denoise, get_schedule
from flux2.tiny import random_flow_model
from flux2.transforms.compile import (
    CompiledForward,
    blocks,
    compile_blocks,
    compile_pipeline,
    compiled_settings,
    uncompile_blocks,
    warm_up,
)

RTOL = 1e-5  # fp32: inductor reorders reductions and fuses, so not bitwise; relative to the output's max |value|
TXT_LEN = 8


@pytest.fixture(scope="module")
def compiled(one_thread):
    """The tiny model, compiled once with inductor behind a frame counter; the tests share the compilation
    (Dynamo caches per block class and backend, so even another model of these shapes reuses it)."""
    torch._dynamo.reset()  # counts start here, and no earlier backend uses up the recompile limit
    counter = CompileCounterWithBackend("inductor")
    model = random_flow_model(TINY_PARAMS)
    eager = run_denoise(model)
    yield compile_blocks(model, backend=counter), counter, eager
    torch._dynamo.reset()


def inputs(side: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img, img_ids = batched_prc_img(torch.randn(1, TINY_PARAMS.in_channels, side, side, generator=gen))
    txt, txt_ids = batched_prc_txt(torch.randn(1, TXT_LEN, TINY_PARAMS.context_in_dim, generator=gen))
    return img, img_ids, txt, txt_ids


@torch.inference_mode()  # as the pipeline and warm_up run: no-grad and inference tensors would compile apart
def run_denoise(model, side: int = 4, steps: int = 2):
    img, img_ids, txt, txt_ids = inputs(side)
    return denoise(model, img, img_ids, txt, txt_ids, get_schedule(steps, img.shape[1]), guidance=None)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_compiled_denoise_matches_eager_and_reads_live_weights(compiled):
    model, _, eager = compiled
    assert rel_err(run_denoise(model), eager) < RTOL

    # Negative control: scale one weight in place. The comparison must now fail against the old eager output,
    # and hold against the new one: the compiled graph takes the parameters as inputs, not frozen constants.
    weight = model.single_blocks[1].linear2.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        nudged = run_denoise(model)
        assert rel_err(nudged, eager) > 10 * RTOL
        assert rel_err(nudged, run_denoise(uncompile_blocks(model))) < RTOL
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        compile_blocks(model, backend=compiled[1])  # the same backend: Dynamo's cache serves it, no retrace


def test_one_graph_per_block_class_and_no_recompile_across_sizes(compiled):
    model, counter, _ = compiled
    warm_up(model, [(64, 64)], txt_len=TXT_LEN)
    assert counter.frame_count == 2  # one DoubleStreamBlock and one SingleStreamBlock graph for 4 blocks
    warm_up(model, [(96, 64), (128, 128), (48, 80)], txt_len=TXT_LEN)  # 24, 64 and 15 image tokens
    run_denoise(model, side=6)
    assert counter.frame_count == 2


def test_static_shapes_recompile_per_size():
    """The control for the counter above: with dynamic=False every new size is a new graph (single blocks only,
    to keep it short)."""
    model = random_flow_model(replace(TINY_PARAMS, depth=0))
    counter = CompileCounter()
    compile_blocks(model, backend=counter, dynamic=False)
    warm_up(model, [(64, 64), (96, 64)], txt_len=TXT_LEN)
    assert counter.frame_count == 2
    warm_up(model, [(64, 64)], txt_len=TXT_LEN)  # a size already seen: cached
    assert counter.frame_count == 2
    uncompile_blocks(model)


def test_compile_is_idempotent_and_uncompile_restores_eager_exactly(compiled):
    model, counter, eager = compiled
    forwards = [block.forward for block in blocks(model)]
    assert all(isinstance(f, CompiledForward) for f in forwards)
    compile_blocks(model, backend=counter)  # same settings: nothing changes
    assert [block.forward for block in blocks(model)] == forwards
    tensors = dict(model.state_dict(keep_vars=True))

    uncompile_blocks(model)
    uncompile_blocks(model)  # harmless twice
    try:
        assert compiled_settings(model) is None
        for block in blocks(model):
            assert "forward" not in block.__dict__
            assert block.forward.__func__ in (DoubleStreamBlock.forward, SingleStreamBlock.forward)
        assert all(t is tensors[name] for name, t in model.state_dict(keep_vars=True).items())
        assert torch.equal(run_denoise(model), eager)  # bitwise: the eager code path again
    finally:
        compile_blocks(model, backend=counter)


def test_other_settings_recompile_and_bad_mode_is_rejected():
    model = random_flow_model(TINY_PARAMS)
    compile_blocks(model, backend="eager")
    compile_blocks(model, backend="eager", dynamic=False)
    assert compiled_settings(model).dynamic is False
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_blocks(model, mode="fast")


def test_pipeline_warm_up_then_new_sizes_do_not_recompile(compiled):
    _, counter, _ = compiled
    pipe = Flux2Pipeline("tiny", device="cpu")
    compile_pipeline(pipe, backend=counter)
    warm_up(pipe, [(64, 64)])
    frames = counter.frame_count
    pipe.generate("a fox", width=96, height=48, seed=1)
    pipe.generate("a fox", width=128, height=128, seed=1)
    assert counter.frame_count == frames
