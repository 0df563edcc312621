"""The transformer against diffusers' Flux2Transformer2DModel on shared random weights (the independent oracle)."""

import logging
import math
from dataclasses import replace

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from flux2.checkpoints.transformer import diffusers_transformer_config, transformer_original_to_diffusers
from flux2.model import Flux2, Flux2Params, Klein4BParams, Klein9BParams, RMSNorm, timestep_embedding
from flux2.sampling import batched_prc_img, batched_prc_txt, listed_prc_img
from flux2.tiny import random_flow_model

log = logging.getLogger(__name__)

TINY = Flux2Params(
    in_channels=16,
    context_in_dim=48,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 8, 8, 8),
    use_guidance_embed=True,
)
TOL = 2e-6  # relative to the output scale: float32 rounding (diffusers computes RoPE frequencies in float64)


def oracle(params: Flux2Params, ours: Flux2) -> Flux2Transformer2DModel:
    model = Flux2Transformer2DModel(**diffusers_transformer_config(params))
    model.load_state_dict(transformer_original_to_diffusers(ours.state_dict()), strict=True)
    return model.eval()


def inputs(params: Flux2Params, seed: int = 0, h: int = 4, w: int = 6, num_txt: int = 12):
    g = torch.Generator().manual_seed(seed)
    x, x_ids = batched_prc_img(torch.randn(1, params.in_channels, h, w, generator=g))
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, num_txt, params.context_in_dim, generator=g))
    ref_tokens, ref_ids = listed_prc_img(
        [torch.randn(params.in_channels, 3, 5, generator=g), torch.randn(params.in_channels, 2, 2, generator=g)],
        t_coord=[10, 20],
    )
    refs, ref_ids = torch.cat(ref_tokens)[None], torch.cat(ref_ids)[None]
    return x, x_ids, ctx, ctx_ids, refs, ref_ids


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_diffusers(model, x, x_ids, ctx, ctx_ids, t, guidance, **kv):
    out = model(
        hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids, guidance=guidance, **kv
    )
    return out


@pytest.mark.parametrize("use_guidance", [True, False])
@pytest.mark.parametrize("with_refs", [False, True])
@torch.no_grad()
def test_forward_matches_diffusers(use_guidance, with_refs):
    params = replace(TINY, use_guidance_embed=use_guidance)
    ours = random_flow_model(params, seed=1).eval()
    theirs = oracle(params, ours)
    x, x_ids, ctx, ctx_ids, refs, ref_ids = inputs(params)
    if with_refs:  # plain path: reference tokens appended after the target
        x, x_ids = torch.cat([x, refs], 1), torch.cat([x_ids, ref_ids], 1)
    t = torch.tensor([0.73])
    g = torch.tensor([4.0]) if use_guidance else None
    a = ours(x, x_ids, t, ctx, ctx_ids, g)
    b = run_diffusers(theirs, x, x_ids, ctx, ctx_ids, t, g).sample
    diff = rel_diff(a, b)
    log.info("transformer guidance=%s refs=%s: max abs %.3g (rel %.3g)", use_guidance, with_refs,
             (a - b).abs().max().item(), diff)  # fmt: skip
    assert a.shape == (1, x.shape[1], params.in_channels)
    assert diff < TOL


@torch.no_grad()
def test_forward_negative_control_theta():
    """RoPE theta 10000 instead of 2000 (the FLUX.1 value) must break the comparison."""
    ours = random_flow_model(TINY, seed=1).eval()
    theirs = oracle(replace(TINY, theta=10000), ours)
    x, x_ids, ctx, ctx_ids, _, _ = inputs(TINY)
    t, g = torch.tensor([0.73]), torch.tensor([4.0])
    diff = rel_diff(ours(x, x_ids, t, ctx, ctx_ids, g), run_diffusers(theirs, x, x_ids, ctx, ctx_ids, t, g).sample)
    assert diff > 100 * TOL


@torch.no_grad()
def test_guidance_changes_dev_output_and_is_required():
    ours = random_flow_model(TINY, seed=1).eval()
    x, x_ids, ctx, ctx_ids, _, _ = inputs(TINY)
    t = torch.tensor([0.5])
    a = ours(x, x_ids, t, ctx, ctx_ids, torch.tensor([4.0]))
    b = ours(x, x_ids, t, ctx, ctx_ids, torch.tensor([2.5]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, x_ids, t, ctx, ctx_ids, None)


def kv_oracle(params, ours):
    theirs = oracle(params, ours)
    for block in theirs.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in theirs.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return theirs


@torch.no_grad()
def test_kv_path_matches_diffusers():
    params = replace(TINY, use_guidance_embed=False)
    ours = random_flow_model(params, seed=2).eval()
    theirs = kv_oracle(params, ours)
    x, x_ids, ctx, ctx_ids, refs, ref_ids = inputs(params)
    t = torch.tensor([0.9])

    a_extract, cache = ours.forward_kv_extract(x, x_ids, t, ctx, ctx_ids, None, refs, ref_ids)
    b_extract, b_cache = run_diffusers(
        theirs, torch.cat([refs, x], 1), torch.cat([ref_ids, x_ids], 1), ctx, ctx_ids, t, None,
        kv_cache_mode="extract", num_ref_tokens=refs.shape[1], return_dict=False,
    )  # fmt: skip
    t2 = torch.tensor([0.4])
    a_cached = ours.forward_kv_cached(x, x_ids, t2, ctx, ctx_ids, None, cache)
    (b_cached,) = run_diffusers(
        theirs, x, x_ids, ctx, ctx_ids, t2, None, kv_cache=b_cache, kv_cache_mode="cached", return_dict=False
    )
    log.info("kv extract rel %.3g, cached rel %.3g", rel_diff(a_extract, b_extract), rel_diff(a_cached, b_cached))
    assert a_extract.shape == x.shape
    assert rel_diff(a_extract, b_extract) < TOL
    assert rel_diff(a_cached, b_cached) < TOL
    assert cache.num_ref_tokens == refs.shape[1]
    assert cache.double_blocks[0].k.shape == (1, params.num_heads, refs.shape[1], params.head_dim)


@torch.no_grad()
def test_kv_cached_equals_extract_and_differs_from_plain_concat():
    params = replace(TINY, use_guidance_embed=False)
    ours = random_flow_model(params, seed=3).eval()
    x, x_ids, ctx, ctx_ids, refs, ref_ids = inputs(params)
    t = torch.tensor([0.6])
    extract, cache = ours.forward_kv_extract(x, x_ids, t, ctx, ctx_ids, None, refs, ref_ids)
    cached = ours.forward_kv_cached(x, x_ids, t, ctx, ctx_ids, None, cache)
    assert rel_diff(cached, extract) < TOL
    # Negative control: a plain forward with the references concatenated is a different computation.
    plain = ours(torch.cat([x, refs], 1), torch.cat([x_ids, ref_ids], 1), t, ctx, ctx_ids, None)[:, : x.shape[1]]
    assert rel_diff(plain, extract) > 100 * TOL


def test_real_presets_have_the_published_sizes():
    """Parameter and tensor counts of spec §1.1, counted on the meta device (no memory)."""
    expected = {Flux2Params: (32_223_281_152, 299), Klein9BParams: (9_078_581_248, 201),
                Klein4BParams: (3_875_544_576, 149)}  # fmt: skip
    for cls, (num_params, num_tensors) in expected.items():
        with torch.device("meta"):
            model = Flux2(cls())
        assert sum(p.numel() for p in model.parameters()) == num_params
        assert len(model.state_dict()) == num_tensors
        assert all(not k.endswith(".bias") for k in model.state_dict())


def test_constructor_checks():
    with pytest.raises(ValueError, match="divisible"):
        Flux2(replace(TINY, hidden_size=65))
    with pytest.raises(ValueError, match="axes_dim"):
        Flux2(replace(TINY, axes_dim=(8, 8, 8, 4)))


@torch.no_grad()
def test_bf16_forward_runs_and_stays_close_to_fp32():
    ours = random_flow_model(TINY, seed=4).eval()
    x, x_ids, ctx, ctx_ids, _, _ = inputs(TINY)
    t, g = torch.tensor([0.5]), torch.tensor([4.0])
    ref = ours(x, x_ids, t, ctx, ctx_ids, g)
    low = ours.to(torch.bfloat16)(x.bfloat16(), x_ids, t.bfloat16(), ctx.bfloat16(), ctx_ids, g.bfloat16())
    assert low.dtype == torch.bfloat16
    assert rel_diff(low.float(), ref) < 0.05


# ----------------------------------------------------------------------------- bf16 rounding points (spec §1.3, §1.7)

# bf16 timesteps whose 1000x product is not a bf16 number: 0.7314 -> 0.73046875, x1000 = 730.46875, which bf16
# rounds to 732; 0.5123 -> 0.51171875 -> 511.71875 -> 512; 0.05 -> 0.050048828125 -> 50.048828125 -> 50.
# 1.0 (x1000 = 1000, exact in bf16) is included as the case where both roundings agree.
BF16_TIMESTEPS = [0.7314, 0.5123, 0.05, 1.0]


def spec_timestep_embedding(t: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    """Spec §1.3 step 2: t * 1000 rounded in `product_dtype`, float32 args against exp(-ln(10000) k / 128),
    [cos | sin], cast back to t's dtype."""
    scaled = (t.to(product_dtype) * 1000).float()
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = scaled[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def test_timestep_embedding_multiplies_by_1000_in_bf16():
    t = torch.tensor(BF16_TIMESTEPS, dtype=torch.bfloat16)
    assert (t * 1000).tolist() == [732.0, 512.0, 50.0, 1000.0]  # the bf16 products the comment above derives
    ours = timestep_embedding(t)
    assert ours.dtype == torch.bfloat16 and ours.shape == (4, 256)
    assert torch.equal(ours, spec_timestep_embedding(t, torch.bfloat16))
    # Negative control: the product taken in float32 (730.46875 instead of 732) gives another embedding for
    # every t whose product bf16 rounds, and the same one for t = 1.0.
    fp32_product = spec_timestep_embedding(t, torch.float32)
    differs = (ours != fp32_product).any(dim=-1).tolist()
    assert differs == [True, True, True, False]


def spec_rms_norm(x: torch.Tensor, scale: torch.Tensor, cast_before_scale: bool = True) -> torch.Tensor:
    """Spec §1.3/§1.7: x * rsqrt(mean(x^2) + 1e-6) in float32, cast to x's dtype, then times the scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + 1e-6)
    if cast_before_scale:
        return normed.to(x.dtype) * scale
    return (normed * scale.float()).to(x.dtype)  # the negative control: one rounding instead of two


@torch.no_grad()
def test_rms_norm_casts_to_bf16_before_the_scale():
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 2, 5, 128, generator=g)).bfloat16()  # [B, heads, L, head_dim], as q and k
    norm = RMSNorm(128).to(torch.bfloat16)
    norm.scale.copy_(0.5 + 2 * torch.rand(128, generator=g))  # bf16 weights far from 1, so the order matters
    ours = norm(x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, spec_rms_norm(x, norm.scale))
    # Negative control: scaling the float32 result before the bf16 cast rounds differently on many elements.
    mismatched = (ours != spec_rms_norm(x, norm.scale, cast_before_scale=False)).float().mean().item()
    assert mismatched > 0.01, f"only {mismatched:.2%} of the elements differ"


@torch.no_grad()
def test_kv_cache_holds_only_the_reference_slices():
    """Cached K/V must not keep the whole attention tensors (or linear1's output) alive: 2 GiB per 4096 refs."""
    params = replace(TINY, use_guidance_embed=False)
    ours = random_flow_model(params, seed=3).eval()
    x, x_ids, ctx, ctx_ids, refs, ref_ids = inputs(params)
    _, cache = ours.forward_kv_extract(x, x_ids, torch.tensor([0.6]), ctx, ctx_ids, None, refs, ref_ids)
    for slot in cache.double_blocks + cache.single_blocks:
        for t in (slot.k, slot.v):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
