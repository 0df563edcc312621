"""The FLUX.2 rectified-flow transformer.

Sequence layout inside the model: [txt | img] where img may carry reference tokens
(appended after the target for plain denoising; placed before it on the klein KV path).
The state_dict keys are the original (BFL) checkpoint keys.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# The sizes live in flux2.params (torch-free, for the CLI's checks); this module's public names include them.
from flux2.params import Flux2Params as Flux2Params
from flux2.params import Klein4BParams as Klein4BParams
from flux2.params import Klein9BParams as Klein9BParams

# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of t * 1000; the product is rounded in t's dtype, as the reference does."""
    t = 1000.0 * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [..., L, dim/2, 2, 2] for integer positions [..., L] along one axis."""
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = torch.einsum("...n,d->...nd", pos.float(), omega)
    rot = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rot.unflatten(-1, (2, 2))


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent feature pairs (x[2p], x[2p+1]) of x [B, heads, L, D] by pe [B, 1, L, D/2, 2, 2]."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.flatten(-2).type_as(x)


class EmbedND(nn.Module):
    """4-axis RoPE over ids (t, h, w, l); head-dim pairs are split between the axes in that order."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:  # ids [B, L, 4] -> [B, 1, L, D/2, 2, 2]
        per_axis = [rope(ids[..., a], d, self.theta) for a, d in enumerate(self.axes_dim)]
        return torch.cat(per_axis, dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


# ----------------------------------------------------------------------------- norms and modulation


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (eps 1e-6), used before every modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# One (shift, scale, gate) triple, each [B, 1, H] or per token [B, L, H].
ModTriple = tuple[Tensor, Tensor, Tensor]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * layer_norm(x) + shift


class Modulation(nn.Module):
    """Linear(SiLU(vec)) chunked into `count` (shift, scale, gate) triples, shared by all blocks of a kind."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.lin = nn.Linear(dim, 3 * count * dim, bias=False)

    def forward(self, vec: Tensor) -> list[ModTriple]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.count, dim=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.count)]


def blend_per_token(parts: list[tuple[list[ModTriple], int]]) -> list[ModTriple]:
    """Per-token modulation from runs of (modulation, token count), laid out along the sequence in order."""
    count = len(parts[0][0])
    blended = []
    for i in range(count):
        triple = []
        for j in range(3):
            runs = [mods[i][j].expand(-1, n, -1) for mods, n in parts]
            triple.append(torch.cat(runs, dim=1))
        blended.append(tuple(triple))
    return blended


class SiLUActivation(nn.Module):
    """SwiGLU: the first half of the features is the gate."""

    def __init__(self):
        super().__init__()
        self.gate_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)
        return self.gate_fn(gate) * value


# ----------------------------------------------------------------------------- attention


@dataclass
class RefKV:
    """Post-norm, post-RoPE reference keys/values of one block ([B, heads, N_ref, D]) for the klein KV path."""

    k: Tensor | None = None
    v: Tensor | None = None


@dataclass
class KVCache:
    """Reference K/V of every block, extracted at the first step and reused at later steps."""

    num_ref_tokens: int
    double_blocks: list[RefKV]
    single_blocks: list[RefKV]


@dataclass
class RefAttention:
    """How one attention call treats reference tokens on the KV path.

    extract: sequence is [txt, ref, img]; ref queries see only ref keys; ref K/V are stored into `slot`.
    cached: sequence is [txt, img]; the cached ref K/V of `slot` are inserted between txt and img keys.
    """

    extract: bool
    num_txt: int
    num_ref: int
    slot: RefKV


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, ref: RefAttention | None = None) -> Tensor:
    """Joint attention over [B, heads, L, D] with RoPE; returns [B, L, heads * D]."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    if ref is None:
        out = sdpa(q, k, v)
    elif ref.extract:
        out = _attention_extract(q, k, v, ref)
    else:
        t = ref.num_txt
        k = torch.cat([k[:, :, :t], ref.slot.k, k[:, :, t:]], dim=2)
        v = torch.cat([v[:, :, :t], ref.slot.v, v[:, :, t:]], dim=2)
        out = sdpa(q, k, v)
    return rearrange(out, "b h l d -> b l (h d)")


def _attention_extract(q: Tensor, k: Tensor, v: Tensor, ref: RefAttention) -> Tensor:
    t, r = ref.num_txt, ref.num_txt + ref.num_ref
    # Clones: slices are views that would keep the whole K/V (in single blocks, all of linear1's output) alive.
    ref.slot.k, ref.slot.v = k[:, :, t:r].clone(), v[:, :, t:r].clone()
    out_ref = sdpa(q[:, :, t:r], k[:, :, t:r], v[:, :, t:r])
    out_rest = sdpa(torch.cat([q[:, :, :t], q[:, :, r:]], dim=2), k, v)
    return torch.cat([out_rest[:, :, :t], out_ref, out_rest[:, :, t:]], dim=2)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3H] laid out (q | k | v), each head-major -> three [B, heads, L, D]."""
    q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=num_heads)
    return q, k, v


class SelfAttention(nn.Module):
    """Container for one stream's attention weights (the reference's keys: qkv, norm, proj)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_normed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SiLUActivation(), nn.Linear(hidden, dim, bias=False))


# ----------------------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = swiglu_mlp(dim, mlp_hidden)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = swiglu_mlp(dim, mlp_hidden)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        mod_img: list[ModTriple],
        mod_txt: list[ModTriple],
        ref: RefAttention | None = None,
    ) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt

        img_q, img_k, img_v = self.img_attn.qkv_normed(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_normed(modulate(txt, txt_shift1, txt_scale1))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe, ref)  # [B, L_txt + L_img, H], text first
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP with fused input (qkv + MLP up) and output (attn out + MLP down) linears."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = dim
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.mlp_act = SiLUActivation()

    def forward(self, x: Tensor, pe: Tensor, mod: list[ModTriple], ref: RefAttention | None = None) -> Tensor:
        (shift, scale, gate) = mod[0]
        qkv, mlp_in = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden_size, 2 * self.mlp_hidden], -1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe, ref), self.mlp_act(mlp_in)], dim=-1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


# ----------------------------------------------------------------------------- the model


class Flux2(nn.Module):
    def __init__(self, params: Flux2Params):
        super().__init__()
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden_size {params.hidden_size} must be divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"sum(axes_dim) = {sum(params.axes_dim)} must equal the head dim {params.head_dim}")
        self.params = params
        h = params.hidden_size
        self.in_channels = self.out_channels = params.in_channels

        self.pe_embedder = EmbedND(params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, h, bias=False)
        self.txt_in = nn.Linear(params.context_in_dim, h, bias=False)
        self.time_in = MLPEmbedder(256, h)
        self.use_guidance_embed = params.use_guidance_embed
        if params.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, h)
        self.double_stream_modulation_img = Modulation(h, count=2)
        self.double_stream_modulation_txt = Modulation(h, count=2)
        self.single_stream_modulation = Modulation(h, count=1)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(h, params.num_heads, params.mlp_hidden) for _ in range(params.depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(h, params.num_heads, params.mlp_hidden) for _ in range(params.depth_single_blocks)]
        )
        self.final_layer = LastLayer(h, self.out_channels)

    def conditioning(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        """The vector that drives every modulation: time embedding (+ guidance embedding on [dev])."""
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.use_guidance_embed:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass a guidance value (e.g. 4.0)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        return vec

    def forward(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None,
        *,
        txt_extra: Tensor | None = None,
    ) -> Tensor:
        """Velocity for x [B, L, 128] (target tokens, then any reference tokens) given text ctx [B, L_txt, C].

        `txt_extra` [B, n, hidden] are tokens already at the hidden size (IP-Adapter image tokens) appended to the
        text stream after txt_in; ctx_ids then covers L_txt + n positions.
        """
        vec = self.conditioning(timesteps, guidance)
        mods = self._modulations(vec)
        return self._run(x, x_ids, ctx, ctx_ids, vec, mods, num_ref=0, cache=None, extract=False, txt_extra=txt_extra)

    def forward_kv_extract(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None,
        x_seq_concat: Tensor,
        x_seq_concat_ids: Tensor,
        ref_fixed_timestep: float = 0.0,
        *,
        txt_extra: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """First KV step: reference tokens go before the target, use t=ref_fixed_timestep modulation, attend only
        to themselves, and leave their K/V in the returned cache."""
        num_ref, num_img, num_txt = x_seq_concat.shape[1], x.shape[1], ctx_ids.shape[1]
        vec = self.conditioning(timesteps, guidance)
        ref_vec = self.conditioning(torch.full_like(timesteps, ref_fixed_timestep), guidance)
        img_d, txt_d, single = self._modulations(vec)
        ref_img_d, _, ref_single = self._modulations(ref_vec)
        mods = (
            blend_per_token([(ref_img_d, num_ref), (img_d, num_img)]),
            txt_d,
            blend_per_token([(single, num_txt), (ref_single, num_ref), (single, num_img)]),
        )
        cache = self._empty_cache(num_ref)
        x = torch.cat([x_seq_concat, x], dim=1)
        x_ids = torch.cat([x_seq_concat_ids, x_ids], dim=1)
        pred = self._run(x, x_ids, ctx, ctx_ids, vec, mods, num_ref=num_ref, cache=cache, extract=True,
                         txt_extra=txt_extra)  # fmt: skip
        return pred, cache

    def forward_kv_cached(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None,
        kv_cache: KVCache,
        *,
        txt_extra: Tensor | None = None,
    ) -> Tensor:
        """Later KV steps: a forward over [txt, img] whose attention also sees the cached reference K/V."""
        vec = self.conditioning(timesteps, guidance)
        mods = self._modulations(vec)
        return self._run(x, x_ids, ctx, ctx_ids, vec, mods, num_ref=0, cache=kv_cache, extract=False,
                         txt_extra=txt_extra)  # fmt: skip

    def _modulations(self, vec: Tensor) -> tuple[list[ModTriple], list[ModTriple], list[ModTriple]]:
        return (
            self.double_stream_modulation_img(vec),
            self.double_stream_modulation_txt(vec),
            self.single_stream_modulation(vec),
        )

    def _empty_cache(self, num_ref: int) -> KVCache:
        return KVCache(
            num_ref_tokens=num_ref,
            double_blocks=[RefKV() for _ in self.double_blocks],
            single_blocks=[RefKV() for _ in self.single_blocks],
        )

    def _run(
        self,
        x: Tensor,
        x_ids: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        vec: Tensor,
        mods: tuple[list[ModTriple], list[ModTriple], list[ModTriple]],
        num_ref: int,
        cache: KVCache | None,
        extract: bool,
        txt_extra: Tensor | None = None,
    ) -> Tensor:
        """x is [img] or, when extracting, [ref, img]; the joint sequence is [txt, txt_extra, x]."""
        mod_img, mod_txt, mod_single = mods
        img, txt = self.img_in(x), self.txt_in(ctx)
        if txt_extra is not None:
            txt = torch.cat([txt, txt_extra.to(txt.dtype)], dim=1)
        num_txt = txt.shape[1]
        pe = self.pe_embedder(torch.cat([ctx_ids, x_ids], dim=1))
        double_refs, single_refs = self._ref_attention(cache, extract, num_txt, num_ref)
        for block, ref in zip(self.double_blocks, double_refs, strict=True):
            img, txt = block(img, txt, pe, mod_img, mod_txt, ref)
        x = torch.cat([txt, img], dim=1)
        for block, ref in zip(self.single_blocks, single_refs, strict=True):
            x = block(x, pe, mod_single, ref)
        return self.final_layer(x[:, num_txt + num_ref :], vec)

    def _ref_attention(self, cache: KVCache | None, extract: bool, num_txt: int, num_ref: int):
        """Per block, how attention treats reference tokens (None everywhere off the KV path)."""
        if cache is None:
            return [None] * len(self.double_blocks), [None] * len(self.single_blocks)
        return (
            [RefAttention(extract, num_txt, num_ref, slot) for slot in cache.double_blocks],
            [RefAttention(extract, num_txt, num_ref, slot) for slot in cache.single_blocks],
        )
