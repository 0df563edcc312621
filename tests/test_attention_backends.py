"""Attention kernel choice (flux2.transforms.attention): every kernel that runs here gives the default's numbers,
the choice holds only inside the "sample" stage and is undone after it, and a missing library is named."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from flux2 import model as flux2_model
from flux2.registry import TINY_PARAMS
from flux2.sampling import batched_prc_img, batched_prc_txt, denoise, get_schedule
from flux2.tiny import random_flow_model
from flux2.transforms import attention
from flux2.transforms.attention import (
    AttentionBackend,
    attention_backend,
    attention_kernel,
    available_kernels,
    swapped_sdpa,
)

RTOL = 1e-5  # fp32; kernels differ in summation order (flash's online softmax), relative to the max |output|
AVAILABLE = available_kernels("cpu")


@pytest.fixture(scope="module")
def model(one_thread):
    return random_flow_model(TINY_PARAMS)


def run_denoise(model):
    gen = torch.Generator().manual_seed(0)
    img, img_ids = batched_prc_img(torch.randn(1, TINY_PARAMS.in_channels, 4, 4, generator=gen))
    txt, txt_ids = batched_prc_txt(torch.randn(1, 8, TINY_PARAMS.context_in_dim, generator=gen))
    return denoise(model, img, img_ids, txt, txt_ids, get_schedule(2, img.shape[1]), guidance=None)


def sdpa_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda  # the process-wide flags sdpa_kernel sets; they steer the CPU dispatcher too
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled()


def test_math_and_auto_always_run_on_cpu():
    assert {"auto", "math"} <= set(AVAILABLE)


@pytest.mark.parametrize("name", AVAILABLE)
def test_each_available_kernel_matches_the_default(model, name):
    expected = run_denoise(model)
    with attention_kernel(name):
        got = run_denoise(model)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < RTOL


def test_a_kernel_that_cannot_run_raises_instead_of_falling_back(model):
    """The negative control: a forced kernel is really forced (efficient attention has no CPU implementation)."""
    if "efficient" in AVAILABLE:
        pytest.skip("memory-efficient attention runs here")
    with pytest.raises(RuntimeError, match="No viable backend|No available kernel"), attention_kernel("efficient"):
        run_denoise(model)


@pytest.mark.parametrize(("name", "package"), [("sage", "sageattention"), ("fa3", "FlashAttention-3")])
def test_missing_optional_kernel_names_its_package(monkeypatch, name, package):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod in ("sageattention",
                        "flash_attn_interface") else real_find_spec(mod, *a))  # fmt: skip
    pipe = SimpleNamespace(stage_hooks=[])
    with pytest.raises(ImportError, match=package):
        attention_backend(pipe, name)
    assert pipe.stage_hooks == []  # nothing changed


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="auto, math, efficient, flash, cudnn, sage, fa3"):
        attention_kernel("xformers")


def test_hook_forces_the_kernel_only_in_the_sample_stage_and_restores_it():
    q = torch.randn(1, 2, 16, 8)
    original, flags = flux2_model.sdpa, sdpa_flags()
    hook = AttentionBackend("efficient")  # no CPU kernel: calling it shows whether it is in force
    with hook("encode_text"):
        assert flux2_model.sdpa is original
    with hook("sample"):
        with pytest.raises(RuntimeError, match="No viable backend"):
            flux2_model.sdpa(q, q, q)  # the transformer's attention: forced
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # anyone else's (the AE's): PyTorch's choice
        assert sdpa_flags() == flags
    assert flux2_model.sdpa is original and sdpa_flags() == flags
    with pytest.raises(KeyError), hook("sample"):
        raise KeyError("a stage that fails")
    assert flux2_model.sdpa is original and sdpa_flags() == flags


def test_library_kernel_swaps_the_models_sdpa_for_the_stage(model, monkeypatch):
    """sage / fa3 are not installed here: a recording stand-in takes sage's place to show the swap and undo."""
    calls = []

    def recording_sdpa(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setitem(attention.KERNEL_FUNCTIONS, "sage", recording_sdpa)
    monkeypatch.setitem(attention.LIBRARY_KERNELS, "sage", ("torch", "the stand-in"))
    original = flux2_model.sdpa
    pipe = SimpleNamespace(stage_hooks=[AttentionBackend("math")])
    hook = attention_backend(pipe, "sage")
    assert pipe.stage_hooks == [hook]  # the earlier choice is replaced, not stacked
    with hook("sample"):
        got = run_denoise(model)
    assert flux2_model.sdpa is original
    n_blocks = TINY_PARAMS.depth + TINY_PARAMS.depth_single_blocks
    assert len(calls) == 2 * n_blocks  # 2 steps x every block
    assert torch.equal(got, run_denoise(model))  # the stand-in computes the default attention
    with pytest.raises(KeyError), swapped_sdpa(recording_sdpa):
        raise KeyError("a stage that fails")
    assert flux2_model.sdpa is original
