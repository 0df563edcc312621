"""The LoRA layouts trainers write for FLUX.2, as data: key prefixes, tensor suffixes and module names.

A LoRA key is `<prefix><module path><separator><suffix>`, e.g.
    diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight        (ai-toolkit: BFL names)
    lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight            (kohya / musubi-tuner: BFL names, underscored)
    transformer.transformer_blocks.0.attn.to_q.lora_A.weight           (diffusers / PEFT: diffusers names)
    lycoris_transformer_blocks_0_attn_to_q.lokr_w1                     (LyCORIS: diffusers names, underscored)
Module paths are resolved against the module names of `flux2.model.Flux2` and of diffusers'
`Flux2Transformer2DModel` (the tables of `flux2.checkpoints.transformer`), whole-path, so an underscored path maps
back to exactly one dotted name. `{n}` stands for a block index.
"""

import re
from dataclasses import dataclass
from functools import cache

from flux2.checkpoints.transformer import HALF_SWAPS, QKV_SPLITS, RENAMES

# (key prefix, layout family), tried in order: longer prefixes before the ones they contain.
PREFIXES: list[tuple[str, str]] = [
    ("base_model.model.", "fal"),  # PEFT's wrapper prefix, as fal's trainer writes it
    ("pipe.dit.", "diffsynth"),
    ("model.diffusion_model.", "ai-toolkit"),
    ("diffusion_model.", "ai-toolkit"),
    ("transformer.", "diffusers"),
    ("lora_unet_", "kohya"),
    ("lycoris_", "lycoris"),
    ("lora_transformer_", "onetrainer"),  # kohya-style keys over diffusers names
]

# Tensor suffix -> role. PEFT in-memory names carry the adapter name (`.default`); DiffSynth keeps it on save.
SUFFIXES: dict[str, str] = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "magnitude",  # LyCORIS / kohya DoRA
    "lora_magnitude_vector": "magnitude",  # PEFT DoRA, as saved
    "lora_magnitude_vector.weight": "magnitude",
    "lora_magnitude_vector.default.weight": "magnitude",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1_a",
    "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b",
    "lokr_t2": "lokr_t2",
    "hada_w1_a": "hada_w1_a",
    "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1",
    "hada_t2": "hada_t2",
}
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)

# diffusers' fused q/k/v projections (after `fuse_qkv_projections()`; its LoKr converter targets them).
FUSED_QKV_RENAMES: list[tuple[str, str]] = [
    ("double_blocks.{n}.img_attn.qkv", "transformer_blocks.{n}.attn.to_qkv"),
    ("double_blocks.{n}.txt_attn.qkv", "transformer_blocks.{n}.attn.to_added_qkv"),
]


@dataclass(frozen=True)
class Target:
    """Where a file's module lands in our model: `module`, rows `part` of `parts` (q/k/v), halves swapped."""

    module: str
    part: int = 0
    parts: int = 1
    swap_halves: bool = False
    naming: str = "bfl"  # "bfl" | "diffusers": which model's names the file used


@dataclass(frozen=True)
class _Name:
    pattern: str  # a module name in the file's naming, with {n}
    ours: str  # our module name, with {n}
    part: int = 0
    parts: int = 1
    swap_halves: bool = False
    naming: str = "bfl"


def _strip_weight(key: str) -> str:
    return key.removesuffix(".weight")


def _names() -> list[_Name]:
    """Every linear module name, in both namings, from the checkpoint tables (no re-typed names)."""
    linear = [(_strip_weight(o), _strip_weight(d)) for o, d in RENAMES if o.endswith(".weight")]
    names = [_Name(o, o) for o, _ in linear] + [_Name(d, o, naming="diffusers") for o, d in linear]
    for original, parts in QKV_SPLITS:
        ours = _strip_weight(original)
        names.append(_Name(ours, ours))
        names += [_Name(_strip_weight(p), ours, i, 3, naming="diffusers") for i, p in enumerate(parts)]
    for original, swapped in HALF_SWAPS:
        ours = _strip_weight(original)
        names += [_Name(ours, ours), _Name(_strip_weight(swapped), ours, swap_halves=True, naming="diffusers")]
    names += [_Name(d, o, naming="diffusers") for o, d in FUSED_QKV_RENAMES]
    return names


def _regex(pattern: str, sep: str) -> re.Pattern:
    return re.compile(re.escape(pattern.replace(".", sep)).replace(r"\{n\}", r"(?P<n>\d+)"))


@cache
def _compiled(sep: str) -> list[tuple[re.Pattern, _Name]]:
    return [(_regex(name.pattern, sep), name) for name in _names()]


def resolve(path: str) -> list[Target]:
    """Every target a dotted or underscored module path names (exactly one for a known module, else none)."""
    found = []
    for sep in (".", "_"):
        for regex, name in _compiled(sep):
            if (m := regex.fullmatch(path)) is not None:
                ours = name.ours.replace("{n}", m.groupdict().get("n") or "")
                found.append(Target(ours, name.part, name.parts, name.swap_halves, name.naming))
    return list(dict.fromkeys(found))


def split_prefix(key: str) -> tuple[str, str | None]:
    """(rest of the key, layout family of its prefix; None when it has no known prefix)."""
    for prefix, family in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :], family
    return key, None


def split_suffix(key: str) -> tuple[str, str] | None:
    """(module path, role) for a key ending in a known tensor suffix."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


# Modules whose OUTPUT size is the hidden size (the rest take the hidden size as input): to name the model a
# mismatched LoRA was trained for.
OUTPUT_IS_HIDDEN = re.compile(r"(img_in|txt_in|time_in\..*|guidance_in\..*|.*_mlp\.2|.*\.proj|.*\.linear2)")
