"""Quantised transformer checkpoints (float8, nvfp4, GGUF): detection, round trips within each format's error,
generation, memory, and negative controls that show the checks can fail.

Error bounds, per element of a Linear weight W and its dequantised W':
- float8 e4m3 per tensor, s = amax / 448: |W' - W| <= 2^-4 |W| + 2^-9 s (half an ulp of 3 mantissa bits; the
  subnormal spacing is 2^-9 s). e5m2: 2^-3 |W| + 2^-16 s.
- nvfp4, effective block scale S = block_scale * global_scale: |W' - W| <= S (the widest e2m1 gap, 4 -> 6, is 2 S;
  float8 rounding of the block scale can clamp at 6 S, which costs less than S).
- GGUF Q8_0, d = amax_block / 127: |W' - W| <= 0.57 d (half a step, plus 127 times d's float16 rounding).
- GGUF Q4_0, d = amax_block / 8: |W' - W| <= 1.01 d (the code for -amax clips to 7 d).
"""

import json

import gguf
import numpy as np
import pytest
import torch
from quantized_files import (
    GGML,
    dequantize_reference,
    quantize_nvfp4,
    random_gguf_blocks,
    write_fp8_bfl,
    write_fp8_comfy,
    write_fp8_plain,
    write_gguf,
    write_nvfp4_comfy,
    write_nvfp4_modelopt,
    write_scaled_fp8,
)
from safetensors.torch import load_file, save_file
from torch import nn

from flux2.checkpoints import CheckpointError
from flux2.checkpoints.gguf import _check_supported, dequantize_gguf
from flux2.checkpoints.quantized import (
    COMFY_NVFP4,
    Nvfp4Packing,
    nvfp4_weight,
    swap_nibbles,
    swizzle_block_scales,
    unswizzle_block_scales,
)
from flux2.registry import TINY_PARAMS
from flux2.sampling import batched_prc_img, batched_prc_txt, denoise
from flux2.tiny import random_flow_model
from flux2.transforms.quantized import (
    QuantizedLinear,
    dequantize_linears,
    fp8_scaled_mm,
    has_fp8_tensor_cores,
    quantize_fp8,
    quantize_model_fp8,
    use_scaled_mm,
)
from flux2.util import load_flow_model, read_transformer_state_dict

MIXED = ("final_layer", "img_in", "double_blocks.0")  # layers left in bf16 in the "mixed" files


@pytest.fixture(scope="module")
def reference():
    return random_flow_model(TINY_PARAMS, seed=7)


@pytest.fixture(scope="module")
def sd(reference):
    return reference.state_dict()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, x_ids = batched_prc_img(torch.randn(1, TINY_PARAMS.in_channels, 4, 6, generator=g))
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, 8, TINY_PARAMS.context_in_dim, generator=g))
    return x, x_ids, torch.tensor([0.7]), ctx, ctx_ids, None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# ----------------------------------------------------------------------------- per-format error bounds


def fp8_bound(m: QuantizedLinear, w: torch.Tensor) -> torch.Tensor:
    mantissa, subnormal = (2**-4, 2**-9) if m.weight.dtype == torch.float8_e4m3fn else (2**-3, 2**-16)
    return mantissa * w.abs() + subnormal * m.weight_scale


def nvfp4_bound(m: QuantizedLinear, w: torch.Tensor) -> torch.Tensor:
    return (m.weight_scale.float() * m.weight_scale_2).repeat_interleave(16, dim=-1)


def gguf_bound(m: QuantizedLinear, w: torch.Tensor) -> torch.Tensor:
    amax = w.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
    step = {int(GGML.Q8_0): 0.57 * amax / 127, int(GGML.Q4_0): 1.01 * amax / 8}[m.qtype]
    return step.expand(*step.shape[:-1], 32).flatten(-2)


BOUNDS = {"fp8": fp8_bound, "nvfp4": nvfp4_bound, "gguf": gguf_bound}


def within_bound(m: QuantizedLinear, dequantized: torch.Tensor, w: torch.Tensor) -> bool:
    return bool(((dequantized - w).abs() <= BOUNDS[m.format](m, w) * (1 + 1e-5) + 1e-7).all())  # float slack


# ----------------------------------------------------------------------------- every layout loads and round-trips

LAYOUTS = {
    "fp8-bfl": (write_fp8_bfl, {}),
    "fp8-comfy": (write_fp8_comfy, {}),
    "fp8-comfy-e5m2": (write_fp8_comfy, {"dtype": torch.float8_e5m2}),
    "fp8-comfy-rowwise": (write_fp8_comfy, {"rowwise": True}),
    "fp8-comfy-mixed": (write_fp8_comfy, {"keep_dense": MIXED}),
    "fp8-bfl-mixed": (write_fp8_bfl, {"keep_dense": MIXED}),
    "scaled-fp8": (write_scaled_fp8, {}),
    "fp8-plain-cast": (write_fp8_plain, {}),
    "nvfp4-bfl": (write_nvfp4_comfy, {}),
    "nvfp4-comfy-quant": (write_nvfp4_comfy, {"metadata": False, "keep_dense": MIXED}),
    "nvfp4-modelopt": (write_nvfp4_modelopt, {}),
    "gguf-q8_0": (write_gguf, {"default": GGML.Q8_0}),
    "gguf-q4_0": (write_gguf, {"default": GGML.Q4_0}),
}
# Relative L2 distance of the forward output from the unquantised model's; measured: 0.037 (e4m3), 0.074 (e5m2),
# 0.15 (nvfp4), 0.004 (Q8_0), 0.068 (Q4_0).
OUTPUT_TOLERANCE = {"fp8": 0.1, "nvfp4": 0.5, "gguf-q8_0": 0.02, "gguf-q4_0": 0.3}


def output_tolerance(layout: str) -> float:
    return next(tol for key, tol in OUTPUT_TOLERANCE.items() if key in layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loads_round_trips_and_generates(layout, reference, sd, tmp_path):
    write, kwargs = LAYOUTS[layout]
    path = write(sd, tmp_path / "model.bin", **kwargs)
    model = load_flow_model(path=path, device="cpu", dtype=torch.float32)  # dense tensors in the inputs' dtype
    assert model.params == TINY_PARAMS  # the architecture is read from the logical shapes
    layers = quantized_layers(model)
    expected = {k.removesuffix(".weight") for k, v in sd.items() if v.ndim == 2}
    if "mixed" in layout or "comfy-quant" in layout:
        expected = {name for name in expected if not name.startswith(MIXED)}
    if layout.startswith("gguf"):
        expected.discard("img_in")  # 16 inputs: not a whole block of 32, written in F16
    assert set(layers) == expected
    for name, m in layers.items():
        assert within_bound(m, m.dense_weight(), sd[f"{name}.weight"]), name
    with torch.no_grad():
        assert rel(model(*inputs()), reference(*inputs())) < output_tolerance(layout)


def test_quantized_model_runs_exactly_as_its_dequantized_twin(sd, tmp_path):
    """Flux2.forward is unchanged: QuantizedLinear computes what a dense Linear with the dequantised weight does."""
    path = write_fp8_comfy(sd, tmp_path / "fp8.safetensors", keep_dense=MIXED)
    quantized = load_flow_model(path=path, device="cpu", dtype=torch.float32)
    dense = load_flow_model(path=path, device="cpu", dtype=torch.float32, dequantize=True)
    assert not quantized_layers(dense) and quantized_layers(quantized)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in quantized_layers(quantized).values())  # dtype kept
    with torch.no_grad():
        assert rel(quantized(*inputs()), dense(*inputs())) < 1e-5
        x, x_ids, _, ctx, ctx_ids, _ = inputs(1)
        timesteps = [1.0, 0.6, 0.0]
        a = denoise(quantized, x, x_ids, ctx, ctx_ids, timesteps, guidance=None)
        b = denoise(dense, x, x_ids, ctx, ctx_ids, timesteps, guidance=None)
    assert rel(a, b) < 1e-5


def test_read_transformer_state_dict_dequantizes(sd, tmp_path):
    path = write_fp8_bfl(sd, tmp_path / "fp8.safetensors")
    dense = read_transformer_state_dict(path)
    assert dense.keys() == sd.keys()
    assert dense["single_blocks.0.linear1.weight"].dtype == torch.bfloat16
    assert rel(dense["single_blocks.0.linear1.weight"].float(), sd["single_blocks.0.linear1.weight"]) < 0.05


# ----------------------------------------------------------------------------- GGUF: our torch decoders vs gguf's


@pytest.mark.parametrize("qtype", [GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1])
def test_gguf_torch_decoder_matches_oracle_on_quantized_weights(qtype):
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    ours = dequantize_gguf(torch.from_numpy(raw), int(qtype), (8, 256))
    np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [GGML.Q4_K, GGML.Q5_K, GGML.Q6_K, GGML.Q3_K, GGML.Q2_K])
def test_gguf_k_quant_decoder_matches_oracle_on_random_blocks(qtype):
    """The gguf package cannot write K-quants: random valid blocks, decoded by us and by `gguf.quants.dequantize`
    (Q2_K and Q3_K go through the numpy fallback, so that path is exercised too)."""
    raw = random_gguf_blocks(qtype, 4, 512, seed=int(qtype))
    ours = dequantize_gguf(torch.from_numpy(raw), int(qtype), (4, 512))
    oracle = gguf.quants.dequantize(raw, qtype)
    assert np.abs(oracle).max() > 0
    np.testing.assert_allclose(ours.numpy(), oracle, rtol=1e-6, atol=1e-7)


def test_gguf_k_quant_file_loads_and_generates(sd, tmp_path):
    """K-quants need rows of 256: the tiny model's 256-wide layers are written as K-quants, the rest as Q8_0/F16."""
    qtypes = {"single_blocks.0": GGML.Q4_K, "single_blocks.1": GGML.Q6_K, "time_in": GGML.Q5_K}
    path = write_gguf(sd, tmp_path / "k.gguf", default=GGML.Q8_0, qtypes=qtypes)
    model = load_flow_model(path=path, device="cpu", dtype=torch.float32)
    layers = quantized_layers(model)
    assert {layers[n].qtype for n in ("single_blocks.0.linear2", "single_blocks.1.linear2", "time_in.in_layer")} == {
        int(GGML.Q4_K), int(GGML.Q6_K), int(GGML.Q5_K)}  # fmt: skip
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    raw = tensors["single_blocks.1.linear2.weight"]
    oracle = gguf.quants.dequantize(np.array(raw.data), GGML.Q6_K)
    np.testing.assert_allclose(layers["single_blocks.1.linear2"].dense_weight().numpy(), oracle, rtol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(*inputs())).all()


# ----------------------------------------------------------------------------- negative controls


def test_negative_control_fp8_scale_ignored(reference, sd, tmp_path):
    model = load_flow_model(path=write_fp8_comfy(sd, tmp_path / "fp8.safetensors"), device="cpu", dtype=torch.float32)
    layer = quantized_layers(model)["double_blocks.0.img_attn.qkv"]
    w = sd["double_blocks.0.img_attn.qkv.weight"]
    assert within_bound(layer, layer.dense_weight(), w)
    assert not within_bound(layer, layer.weight.float(), w)  # the white-image bug: scale never applied
    for m in quantized_layers(model).values():
        m.weight_scale = torch.ones_like(m.weight_scale)
    with torch.no_grad():
        assert not rel(model(*inputs()), reference(*inputs())) < output_tolerance("fp8")  # far off, or NaN


def nvfp4_layer(file_sd: dict, name: str, packing: Nvfp4Packing) -> QuantizedLinear:
    t = {s: file_sd[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")}
    return QuantizedLinear(nvfp4_weight(name, t["weight"], t["weight_scale"], t["weight_scale_2"], packing))


def test_negative_control_nvfp4_nibbles_swapped(sd, tmp_path):
    file_sd = load_file(write_nvfp4_comfy(sd, tmp_path / "fp4.safetensors"))
    name, w = "single_blocks.0.linear1", sd["single_blocks.0.linear1.weight"]
    right = nvfp4_layer(file_sd, name, COMFY_NVFP4)
    swapped = nvfp4_layer(file_sd, name, Nvfp4Packing(high_nibble_first=False, swizzled_scales=True))
    assert within_bound(right, right.dense_weight(), w)
    assert not within_bound(swapped, swapped.dense_weight(), w)
    assert rel(swapped.dense_weight(), w) > 0.5


def test_negative_control_nvfp4_scales_not_unswizzled():
    """With rows a multiple of 128 and in / 16 a multiple of 4 the swizzled and plain scales have the same shape,
    so only the values tell them apart."""
    w = torch.randn(256, 128) * torch.logspace(-2, 1, 256)[:, None]  # rows of very different magnitudes
    packed, block, global_scale = quantize_nvfp4(w)
    assert swizzle_block_scales(block).shape == block.shape
    file_tensors = (swap_nibbles(packed), swizzle_block_scales(block), global_scale)
    right = QuantizedLinear(nvfp4_weight("w", *file_tensors, COMFY_NVFP4))
    not_unswizzled = Nvfp4Packing(high_nibble_first=True, swizzled_scales=False)
    kept = QuantizedLinear(nvfp4_weight("w", *file_tensors, not_unswizzled))
    torch.testing.assert_close(right.dense_weight(), dequantize_reference(packed, block, global_scale))
    assert within_bound(right, right.dense_weight(), w)
    assert not within_bound(kept, kept.dense_weight(), w)
    assert rel(kept.dense_weight(), w) > 0.5


def test_swizzle_round_trip_with_padding():
    plain = torch.randn(200, 6).abs().to(torch.float8_e4m3fn)  # padded to 256 x 8
    blocked = swizzle_block_scales(plain)
    assert blocked.shape == (256, 8)
    assert torch.equal(unswizzle_block_scales(blocked, 200, 6).float(), plain.float())


# ----------------------------------------------------------------------------- errors name what is wrong


def test_unsupported_comfy_format_lists_supported(sd, tmp_path):
    path = write_fp8_comfy(sd, tmp_path / "fp8.safetensors")
    tensors = load_file(path)
    key = "model.diffusion_model.single_blocks.0.linear1.comfy_quant"
    tensors[key] = torch.tensor(list(json.dumps({"format": "int8_blockwise"}).encode()), dtype=torch.uint8)
    save_file(tensors, tmp_path / "bad.safetensors")
    supported = r"supported: \['float8_e4m3fn', 'float8_e5m2', 'nvfp4'\]"
    with pytest.raises(CheckpointError, match=r"int8_blockwise.*" + supported):
        load_flow_model(path=tmp_path / "bad.safetensors", device="cpu")


def test_strict_loading_still_names_missing_keys(sd, tmp_path):
    tensors = load_file(write_fp8_bfl(sd, tmp_path / "fp8.safetensors"))
    del tensors["single_blocks.1.norm.key_norm.scale"]
    save_file(tensors, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n\s+single_blocks.1.norm.key_norm.scale"):
        load_flow_model(path=tmp_path / "missing.safetensors", device="cpu")


def test_orphan_scale_is_an_error(sd, tmp_path):
    tensors = load_file(write_fp8_bfl(sd, tmp_path / "fp8.safetensors"))
    tensors["nowhere.weight_scale"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "orphan.safetensors")
    with pytest.raises(CheckpointError, match="nowhere.weight_scale"):
        load_flow_model(path=tmp_path / "orphan.safetensors", device="cpu")


# ----------------------------------------------------------------------------- the float8 fast path


def test_scaled_mm_dispatch(monkeypatch):
    layer = QuantizedLinear(quantize_fp8(torch.randn(32, 64)))
    x = torch.randn(2, 64)
    assert not use_scaled_mm(layer, x)  # CPU: dequantise
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert has_fp8_tensor_cores(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert not has_fp8_tensor_cores(torch.device("cuda"))  # Ampere has no float8 tensor cores
    assert not has_fp8_tensor_cores(torch.device("cpu"))
    e5m2 = QuantizedLinear(quantize_fp8(torch.randn(32, 64), torch.float8_e5m2))
    monkeypatch.setattr("flux2.transforms.quantized.has_fp8_tensor_cores", lambda device: True)
    assert use_scaled_mm(layer, x) and not use_scaled_mm(e5m2, x)
    assert not use_scaled_mm(QuantizedLinear(quantize_fp8(torch.randn(24, 64))), x)  # 24 outputs: not /16


def test_scaled_mm_numerics_match_the_dequantize_path():
    """torch has a CPU `_scaled_mm`, so the fast path's arithmetic is checked here even without a GPU: the only
    extra error is the input's own float8 rounding (2^-4 relative per element)."""
    layer = QuantizedLinear(quantize_fp8(torch.randn(48, 64)))
    x = torch.randn(3, 5, 64)
    fast = fp8_scaled_mm(x, layer.weight, layer.weight_scale)
    assert fast.shape == (3, 5, 48)
    assert rel(fast, layer(x)) < 0.05


# ----------------------------------------------------------------------------- memory


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_memory_fp8_half_and_nvfp4_quarter_of_bf16(reference, sd, tmp_path):
    bf16 = model_bytes(random_flow_model(TINY_PARAMS, seed=7).to(torch.bfloat16))
    fp8 = model_bytes(load_flow_model(path=write_fp8_bfl(sd, tmp_path / "a.safetensors"), device="cpu"))
    fp4 = model_bytes(load_flow_model(path=write_nvfp4_comfy(sd, tmp_path / "b.safetensors"), device="cpu"))
    assert 0.49 < fp8 / bf16 < 0.53  # 1 byte per weight plus one fp32 scale per layer and the bf16 norms
    assert 0.28 < fp4 / bf16 < 0.30  # 0.5 byte per weight + 1 byte per 16 (block scales) = 0.28 of bf16


def test_quantize_model_fp8_and_back(reference):
    model = quantize_model_fp8(random_flow_model(TINY_PARAMS, seed=7))
    assert all(not isinstance(m, nn.Linear) for m in model.modules())
    model.to(torch.bfloat16)  # casts the norms only: quantised buffers keep their dtypes
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
               for m in quantized_layers(model).values())  # fmt: skip
    dense = dequantize_linears(model.float(), torch.float32)
    with torch.no_grad():
        assert rel(dense(*inputs()), reference(*inputs())) < 0.1


def test_unsupported_gguf_type_lists_supported():
    with pytest.raises(CheckpointError, match=r"x.weight: GGUF type Q8_1 is not supported; supported: \[.*'Q6_K'"):
        _check_supported("x.weight", GGML.Q8_1)


def test_rowwise_fp8_compute_quantizes_activations_and_beats_a_per_tensor_scale():
    """The float8 GEMM (torch._scaled_mm; on the CPU here, tensor cores on Ada/Hopper) with row-wise scales: rows of
    very different magnitude keep their precision, where one scale for the tensor crushes the small rows."""
    from flux2.transforms.quantized import QuantizedLinear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=g) * torch.logspace(-6, 0, 64)[:, None]  # beyond e4m3's range
    x = torch.randn(16, 128, generator=g)
    exact = x @ weight.T

    def error(rowwise: bool, compute: str = "scaled_mm") -> float:
        out = QuantizedLinear(quantize_fp8(weight, rowwise=rowwise), compute=compute)(x)
        return ((out - exact).norm(dim=0) / exact.norm(dim=0)).max().item()  # the worst output channel

    assert error(rowwise=True) < 0.08  # e4m3 has 3 mantissa bits: a few % per product
    assert error(rowwise=False) > 3 * error(rowwise=True)  # negative control: one scale for all rows
    weight_only = error(rowwise=True, compute="dequantize")
    assert weight_only < error(rowwise=True)  # the float8 GEMM also rounds the activations
    with pytest.raises(ValueError, match="compute must be one of auto, scaled_mm, dequantize"):
        QuantizedLinear(quantize_fp8(weight), compute="fast")
