"""LoRA loading (every trainer's layout) and application, against weights built directly from known factors."""

import copy
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from lora_files import (
    LowRank,
    hadamard,
    hadamard_state_dict,
    kron,
    kron_state_dict,
    linears,
    lora_state_dict,
    low_rank,
    write,
)
from torch import Tensor, nn

from flux2.checkpoints.lora import LoraError, load_lora
from flux2.checkpoints.lora_layouts import _names, resolve
from flux2.checkpoints.transformer import transformer_original_to_diffusers
from flux2.model import Flux2
from flux2.registry import model_info
from flux2.sampling import batched_prc_img, batched_prc_txt
from flux2.tiny import random_flow_model
from flux2.transforms.lora import active_loras, fuse_loras, fused_loras, set_loras, unfuse_loras

log = logging.getLogger(__name__)
PARAMS = model_info("tiny").params  # hidden 64, no guidance embedder
GUIDED = replace(PARAMS, use_guidance_embed=True)
ATOL = 1e-5  # float32, outputs of order 1

pytestmark = pytest.mark.usefixtures("one_thread")


def base_model(params=PARAMS) -> Flux2:
    return random_flow_model(params, seed=0)


@torch.no_grad()
def run(model: Flux2) -> Tensor:
    g = torch.Generator().manual_seed(0)
    params = model.params
    x, x_ids = batched_prc_img(torch.randn(1, params.in_channels, 4, 6, generator=g))
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, 8, params.context_in_dim, generator=g))
    dtype = model.double_blocks[0].img_attn.norm.query_norm.scale.dtype  # a Linear weight may be packed fp8
    guidance = torch.tensor([3.5], dtype=dtype) if params.use_guidance_embed else None
    return model(x.to(dtype), x_ids, torch.tensor([0.6], dtype=dtype), ctx.to(dtype), ctx_ids, guidance)


@torch.no_grad()
def expected(model: Flux2, factors: dict) -> Tensor:
    """The output of the model with each factor's formula written into its weight."""
    target = copy.deepcopy(model)
    for name, f in factors.items():
        w = linears(target)[name].weight
        w.copy_(f.new_weight(w.clone()))
    return run(target)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def all_linears(model: Flux2) -> list[str]:
    return list(linears(model))


def check_applied(model, lora, factors, label: str) -> float:
    set_loras(model, [(lora, 1.0)])
    want, got = expected(copy.deepcopy(_without_loras(model)), factors), run(model)
    err = max_err(got, want)
    log.info("%s: max abs error vs the formula %.2e (LoRA effect %.2f)", label, err, max_err(want, run_base(model)))
    return err


def _without_loras(model):
    bare = copy.deepcopy(model)
    bare.__dict__.pop("_flux2_loras", None)
    bare._forward_hooks.clear()
    for m in bare.modules():
        m._forward_hooks.clear()
    return bare


def run_base(model) -> Tensor:
    return run(_without_loras(model))


# ----------------------------------------------------------------------------- layouts


LAYOUTS = {
    "ai-toolkit": "ai-toolkit",
    "bare": "ai-toolkit",
    "comfy": "ai-toolkit",
    "kohya": "kohya",
    "diffusers": "diffusers",
    "fal": "fal",
    "diffsynth": "diffsynth",
    "onetrainer": "onetrainer",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loads_and_equals_the_formula(tmp_path, layout):
    model = base_model()
    factors = low_rank(model, all_linears(model))
    lora = load_lora(write(tmp_path / f"{layout}.safetensors", lora_state_dict(factors, layout)))
    assert lora.layout == LAYOUTS[layout] and set(lora.adapters) == set(factors)
    assert lora.name == layout and len(lora.sha256) == 64
    assert check_applied(model, lora, factors, layout) < ATOL
    assert max_err(run(model), run_base(model)) > 0.1  # the LoRA matters


def test_peft_alpha_from_safetensors_metadata(tmp_path):
    model = base_model()
    factors = low_rank(model, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"])
    sd = lora_state_dict({n: replace(f, alpha=f.down.shape[0]) for n, f in factors.items()}, "diffusers")
    metadata = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 2.0}'}
    lora = load_lora(write(tmp_path / "peft.safetensors", sd, metadata))
    assert check_applied(model, lora, factors, "diffusers + metadata alpha") < ATOL


def test_lokr_equals_kron_formula(tmp_path):
    model = base_model()
    factors = kron(model, all_linears(model))
    lora = load_lora(write(tmp_path / "lokr.safetensors", kron_state_dict(factors)))
    assert lora.layout == "lycoris-lokr" and lora.family == "kohya"
    assert check_applied(model, lora, factors, "lycoris-lokr") < ATOL


def test_lokr_with_swapped_factors_differs(tmp_path):
    model = base_model()
    factors = kron(model, ["double_blocks.0.img_mlp.0", "single_blocks.0.linear1"])
    sd = {}
    for name, f in factors.items():  # w2 as the (factored) left factor, w1 as the right: kron(w2, w1)
        base = f"lora_unet_{name.replace('.', '_')}"
        sd |= {f"{base}.lokr_w1_a": f.w2_a, f"{base}.lokr_w1_b": f.w2_b, f"{base}.lokr_w2": f.w1}
        sd[f"{base}.alpha"] = torch.tensor(f.alpha)
    lora = load_lora(write(tmp_path / "swapped.safetensors", sd))
    err = check_applied(model, lora, factors, "lokr, factors swapped (negative control)")
    assert err > 0.5 * max_err(expected(_without_loras(model), factors), run_base(model))


def test_lokr_alpha_is_ignored_when_both_factors_are_full(tmp_path):
    model = base_model()
    name = "double_blocks.1.txt_mlp.2"
    f = kron(model, [name])[name]
    w2 = f.w2_a @ f.w2_b
    base = f"lora_unet_{name.replace('.', '_')}"
    sd = {f"{base}.lokr_w1": f.w1, f"{base}.lokr_w2": w2, f"{base}.alpha": torch.tensor(7.0)}
    lora = load_lora(write(tmp_path / "full.safetensors", sd))
    assert torch.allclose(lora.adapters[name].delta(), torch.kron(f.w1, w2))


def test_loha_equals_hadamard_formula(tmp_path):
    model = base_model()
    factors = hadamard(model, all_linears(model))
    lora = load_lora(write(tmp_path / "loha.safetensors", hadamard_state_dict(factors)))
    assert lora.layout == "lycoris-loha"
    assert check_applied(model, lora, factors, "lycoris-loha") < ATOL


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])  # LyCORIS dora_scale [out, 1]; PEFT magnitude [out]
def test_dora_equals_its_formula(tmp_path, layout):
    model = base_model()
    factors = low_rank(model, all_linears(model), dora=True)
    lora = load_lora(write(tmp_path / f"dora-{layout}.safetensors", lora_state_dict(factors, layout)))
    assert lora.is_dora
    assert check_applied(model, lora, factors, f"dora ({layout})") < ATOL


def test_norm_out_without_the_half_swap_differs(tmp_path):
    """What diffusers' converter does to a BFL-named final-modulation LoRA: up's halves left in [shift; scale]."""
    model = base_model()
    name = "final_layer.adaLN_modulation.1"
    factors = low_rank(model, [name])
    f = factors[name]
    sd = {
        "transformer.norm_out.linear.lora_A.weight": f.down,
        "transformer.norm_out.linear.lora_B.weight": f.up * f.scale,
    }
    unswapped = load_lora(write(tmp_path / "unswapped.safetensors", sd))
    err = check_applied(model, unswapped, factors, "norm_out.linear without the swap (negative control)")
    effect = max_err(expected(_without_loras(model), factors), run_base(model))
    assert err > 0.5 * effect  # O(1) of the LoRA's own effect


# ----------------------------------------------------------------------------- refusals


def test_lycoris_lokr_on_diffusers_q_k_v_lands_on_the_fused_rows(tmp_path):
    """LyCORIS wraps diffusers' model: underscored diffusers names, q/k/v separate (a Kronecker delta per part)."""
    model = base_model()
    g = torch.Generator().manual_seed(3)
    parts = {p: (torch.randn(2, 2, generator=g), 0.2 * torch.randn(32, 32, generator=g)) for p in ("q", "k", "v")}
    sd = {}
    for p, (w1, w2) in parts.items():
        sd |= {
            f"lycoris_transformer_blocks_1_attn_to_{p}.lokr_w1": w1,
            f"lycoris_transformer_blocks_1_attn_to_{p}.lokr_w2": w2,
        }
    lora = load_lora(write(tmp_path / "lycoris.safetensors", sd))
    assert lora.layout == "lycoris-lokr" and lora.family == "lycoris"
    delta = torch.cat([torch.kron(w1, w2) for w1, w2 in parts.values()])
    factors = {"double_blocks.1.img_attn.qkv": _Dense(delta)}
    assert check_applied(model, lora, factors, "lycoris-lokr, diffusers q/k/v") < ATOL


class _Dense:
    def __init__(self, delta: Tensor):
        self.delta = delta

    def new_weight(self, w: Tensor) -> Tensor:
        return w + self.delta


def test_dora_normed_per_input_column(tmp_path):
    """LyCORIS without wd_on_out keeps dora_scale as [1, in]: W' = (W + dW) m / ||W + dW|| per column."""
    model = base_model()
    name = "single_blocks.0.linear2"
    f = low_rank(model, [name])[name]
    w = linears(model)[name].weight.detach()
    v = w + f.scale * f.up @ f.down
    m = v.norm(dim=0) * (1 + 0.3 * torch.randn(v.shape[1], generator=torch.Generator().manual_seed(4)))
    base = f"lora_unet_{name.replace('.', '_')}"
    sd = {f"{base}.lora.down.weight": f.down, f"{base}.lora.up.weight": f.up, f"{base}.alpha": torch.tensor(f.alpha)}
    lora = load_lora(write(tmp_path / "col.safetensors", sd | {f"{base}.dora_scale": m[None, :]}))
    target = _Dense(v * m[None, :] / v.norm(dim=0, keepdim=True) - w)
    assert check_applied(model, lora, {name: target}, "dora per input column") < ATOL
    want = run(model)
    set_loras(model, [])
    fuse_loras(model, [(lora, 1.0)])
    assert max_err(run(model), want) < ATOL


def test_bfloat16_activations(tmp_path):
    model = base_model()
    factors = low_rank(model, all_linears(model), dora=True)
    lora = load_lora(write(tmp_path / "d.safetensors", lora_state_dict(factors, "kohya")))
    want = expected(model, factors)
    model = model.to(torch.bfloat16)
    set_loras(model, [(lora, 1.0)])
    got = run(model)
    assert got.dtype == torch.bfloat16 and ((got.float() - want).abs().max() / want.abs().max()) < 0.05


def test_unmatched_keys_are_all_listed_in_one_error(tmp_path):
    model = base_model()
    sd = lora_state_dict(low_rank(model, ["img_in"]), "kohya")
    junk = [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight",
        "lora_unet_img_in.lora_mid.weight",
    ]
    sd |= {k: torch.zeros(1, 1) for k in junk}
    with pytest.raises(LoraError) as e:
        load_lora(write(tmp_path / "junk.safetensors", sd))
    assert all(k in str(e.value) for k in junk) and "kohya layout" in str(e.value)


def test_a_lora_for_another_hidden_size_names_the_variant(tmp_path):
    model = base_model()
    sd = {
        "lora_unet_img_in.lora_down.weight": torch.zeros(1, 128),
        "lora_unet_img_in.lora_up.weight": torch.zeros(3072, 1),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(1, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * 3072, 1),
    }
    lora = load_lora(write(tmp_path / "klein4b.safetensors", sd))
    with pytest.raises(LoraError, match=r"hidden size 3072 \(flux.2-klein-4b\); the loaded model has 64 \(tiny\)"):
        set_loras(model, [(lora, 1.0)])
    assert active_loras(model) == []


def test_guidance_keys_apply_where_the_model_has_the_embedder_and_are_refused_where_not(tmp_path):
    guided = base_model(GUIDED)
    factors = low_rank(guided, ["guidance_in.in_layer", "guidance_in.out_layer", "img_in"])
    lora = load_lora(write(tmp_path / "fal.safetensors", lora_state_dict(factors, "fal")))
    assert lora.layout == "fal"
    assert check_applied(guided, lora, factors, "fal with guidance_in") < ATOL
    with pytest.raises(LoraError, match=r"guidance_in\.\*: this LoRA was trained on a model with a guidance embedder"):
        set_loras(base_model(), [(lora, 1.0)])


def test_underscored_names_map_back_to_exactly_one_module():
    model = base_model(GUIDED)
    for name in linears(model):
        assert [t.module for t in resolve(name.replace(".", "_"))] == [name]
    assert len({n.pattern for n in _names()}) == len(_names())
    for key in transformer_original_to_diffusers({f"{n}.weight": torch.zeros(6, 1) for n in linears(model)}):
        assert len(resolve(key.removesuffix(".weight").replace(".", "_"))) == 1, key


# ----------------------------------------------------------------------------- application


def test_fuse_equals_unfused_and_unfuse_restores_bit_exactly(tmp_path):
    model = base_model()
    names = all_linears(model)
    lora = load_lora(write(tmp_path / "a.safetensors", lora_state_dict(low_rank(model, names), "kohya")))
    dora = load_lora(
        write(tmp_path / "d.safetensors", lora_state_dict(low_rank(model, names[:5], 4, 1, True), "kohya"))
    )
    pairs = [(lora, 0.8), (dora, 0.6)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_loras(model, pairs)
    assert set(model.state_dict()) == set(before)
    unfused = run(model)
    with pytest.raises(LoraError, match="unfused LoRAs are active"):
        fuse_loras(model, pairs)
    set_loras(model, [])
    fuse_loras(model, pairs)
    assert fused_loras(model) == pairs and active_loras(model) == []
    assert max_err(run(model), unfused) < ATOL
    fuse_loras(model, pairs[:1])  # a fused set is replaced: unfused first, so nothing accumulates
    unfuse_loras(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_loras_compose_as_the_sum_of_their_deltas(tmp_path):
    model = base_model()
    names = all_linears(model)
    fa, fb = low_rank(model, names, seed=1), low_rank(model, names[::2], seed=2)
    a = load_lora(write(tmp_path / "a.safetensors", lora_state_dict(fa, "ai-toolkit")))
    b = load_lora(write(tmp_path / "b.safetensors", lora_state_dict(fb, "diffusers")))
    set_loras(model, [(a, 0.7), (b, -0.4)])
    combined = {n: _Sum([(fa[n], 0.7)] + ([(fb[n], -0.4)] if n in fb else [])) for n in names}
    assert max_err(run(model), expected(_without_loras(model), combined)) < ATOL


def test_unfused_loras_apply_on_top_of_a_fused_set(tmp_path):
    model = base_model()
    names = all_linears(model)
    fa, fb = low_rank(model, names, seed=1), low_rank(model, names[1::2], seed=2, dora=True)
    a = load_lora(write(tmp_path / "a.safetensors", lora_state_dict(fa, "kohya")))
    b = load_lora(write(tmp_path / "b.safetensors", lora_state_dict(fb, "kohya")))
    only_b = expected(model, fb)
    fuse_loras(model, [(a, 1.0)])
    set_loras(model, [(b, 1.0)])  # B's DoRA norm is taken of the fused weights
    assert max_err(run(model), expected(_without_loras(model), fb)) < ATOL
    unfuse_loras(model)  # B stays, re-prepared against the base weights
    assert active_loras(model) == [(b, 1.0)] and fused_loras(model) == []
    assert max_err(run(model), only_b) < ATOL


class _Sum:
    def __init__(self, items: list[tuple[LowRank, float]]):
        self.items = items

    def new_weight(self, w: Tensor) -> Tensor:
        return w + sum(s * (f.new_weight(w) - w) for f, s in self.items)


def test_clearing_gives_back_the_base_output_exactly(tmp_path):
    model = base_model()
    base = run(model)
    lora = load_lora(write(tmp_path / "a.safetensors", lora_state_dict(low_rank(model, all_linears(model)), "kohya")))
    set_loras(model, [(lora, 1.0)])
    assert max_err(run(model), base) > 0.1
    set_loras(model, [])
    assert torch.equal(run(model), base) and active_loras(model) == []


class FakeQuantizedLinear(nn.Module):
    """Stands in for the weight-only quantised linear: int8 rows with a scale, no `.weight` Parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("row_scale", w.abs().amax(dim=1, keepdim=True) / 127)
        self.register_buffer("weight", torch.round(w / self.row_scale).to(torch.int8))  # packed, as fp8 is

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        w = self.weight.float() * self.row_scale
        return w if dtype is None else w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight(x.dtype))


def test_quantised_modules_take_unfused_lora_and_dora(tmp_path):
    model = base_model()
    quantised = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"]
    for name in quantised:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeQuantizedLinear(model.get_submodule(name)))
    dense = base_model()
    with torch.no_grad():
        for name in quantised:
            dense.get_submodule(name).weight.copy_(model.get_submodule(name).dense_weight())
    factors = low_rank(dense, quantised, dora=True)
    lora = load_lora(write(tmp_path / "dora.safetensors", lora_state_dict(factors, "diffusers")))
    set_loras(model, [(lora, 1.0)])
    assert max_err(run(model), expected(dense, factors)) < ATOL
    set_loras(model, [])
    with pytest.raises(LoraError, match="cannot fuse"):
        fuse_loras(model, [(lora, 1.0)])


# ----------------------------------------------------------------------------- diffusers + PEFT as the oracle


def oracle(model: Flux2):
    """diffusers' Flux2Transformer2DModel with our base weights."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from flux2.checkpoints.transformer import diffusers_transformer_config, transformer_original_to_diffusers

    theirs = diffusers.Flux2Transformer2DModel(**diffusers_transformer_config(model.params))
    theirs.load_state_dict(transformer_original_to_diffusers(model.state_dict()), strict=True)
    return theirs.eval()


@torch.no_grad()
def run_oracle(theirs, path) -> Tensor:
    from diffusers import Flux2Pipeline

    Flux2Pipeline.load_lora_into_transformer(Flux2Pipeline.lora_state_dict(str(path)), transformer=theirs)
    g = torch.Generator().manual_seed(0)  # the inputs of run()
    x, x_ids = batched_prc_img(torch.randn(1, PARAMS.in_channels, 4, 6, generator=g))
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, 8, PARAMS.context_in_dim, generator=g))
    t = torch.tensor([0.6])
    return theirs(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids).sample


@pytest.mark.parametrize("dora", [False, True])
def test_diffusers_layout_matches_diffusers_with_peft(tmp_path, dora):
    """Every module, norm_out.linear included: in its own layout diffusers applies [scale; shift] rows consistently."""
    model = base_model()
    factors = low_rank(model, all_linears(model), dora=dora)
    path = write(tmp_path / "diffusers.safetensors", lora_state_dict(factors, "diffusers"))
    theirs = run_oracle(oracle(model), path)
    set_loras(model, [(load_lora(path), 1.0)])
    err = max_err(run(model), theirs)
    log.info("diffusers layout (dora=%s): ours vs diffusers+PEFT max abs %.2e", dora, err)
    assert err < ATOL


def test_diffusers_misplaces_a_bfl_named_final_modulation_lora(tmp_path):
    """diffusers 0.42.1 maps final_layer.adaLN_modulation.1 to norm_out.linear without swapping up's halves: its
    output is off by O(1) of the LoRA's effect, ours equals the formula. Without that module the two agree."""
    model = base_model()
    name = "final_layer.adaLN_modulation.1"
    others = low_rank(model, [n for n in all_linears(model) if n != name])
    path = write(tmp_path / "others.safetensors", lora_state_dict(others, "ai-toolkit"))
    set_loras(model, [(load_lora(path), 1.0)])
    assert max_err(run(model), run_oracle(oracle(model), path)) < ATOL

    final = low_rank(model, [name])
    path = write(tmp_path / "final.safetensors", lora_state_dict(final, "ai-toolkit"))
    set_loras(model, [(load_lora(path), 1.0)])
    ours, formula = run(model), expected(_without_loras(model), final)
    theirs = run_oracle(oracle(_without_loras(model)), path)
    effect = max_err(formula, run_base(model))
    log.info("BFL-named adaLN LoRA: diffusers off by %.3g (effect %.3g); ours %.2e", max_err(theirs, formula),
             effect, max_err(ours, formula))  # fmt: skip
    assert max_err(ours, formula) < ATOL
    assert max_err(theirs, formula) > 0.5 * effect


def test_real_fp8_quantized_linears_take_lora_and_dora(tmp_path):
    """The weight-only QuantizedLinear keeps a packed float8 `weight` buffer: W must come from dense_weight()."""
    quantized = pytest.importorskip("flux2.transforms.quantized")
    model = quantized.quantize_model_fp8(base_model())
    dense = quantized.dequantize_linears(copy.deepcopy(model), torch.float32)
    factors = low_rank(dense, all_linears(dense), dora=True)
    lora = load_lora(write(tmp_path / "dora.safetensors", lora_state_dict(factors, "kohya")))
    set_loras(model, [(lora, 1.0)])
    assert max_err(run(model), expected(dense, factors)) < ATOL


def test_peft_alpha_from_adapter_config_beside_the_file(tmp_path):
    model = base_model()
    factors = low_rank(model, ["double_blocks.1.txt_attn.qkv", "img_in"])
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2.0}')
    sd = lora_state_dict({n: replace(f, alpha=f.down.shape[0]) for n, f in factors.items()}, "diffusers")
    lora = load_lora(write(tmp_path / "adapter_model.safetensors", sd))
    assert check_applied(model, lora, factors, "diffusers + adapter_config.json alpha") < ATOL
