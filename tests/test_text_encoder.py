"""Text encoders on tiny random-weight models, checked against diffusers 0.42.1's FLUX.2 pipelines."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE
from tiny_encoders import save_tiny_mistral3, save_tiny_qwen3, tiny_mistral3
from transformers import Qwen3Config, Qwen3ForCausalLM

from flux2.text_encoder import (
    MAX_LENGTH,
    OUTPUT_LAYERS_MISTRAL,
    OUTPUT_LAYERS_QWEN3,
    SYSTEM_MESSAGE,
    Mistral3SmallEmbedder,
    Qwen3Embedder,
    load_mistral_small_embedder,
    load_qwen3_embedder,
)
from flux2.tiny_text_encoders import TINY_HIDDEN, tiny_qwen3

# A plain prompt, the empty CFG prompt, and one with a literal [IMG] marker.
PROMPTS = ["a red fox jumping over a frozen creek at dawn", "", "two cats [IMG] on a sofa"]
TINY_OUT = 3 * TINY_HIDDEN


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3(seed=0)


@pytest.fixture(scope="module")
def mistral3():
    return tiny_mistral3(seed=0)


@pytest.fixture(scope="module")
def qwen3_embeds(qwen3):
    model, tokenizer = qwen3
    return Qwen3Embedder(model, tokenizer=tokenizer, dtype=torch.float32)(PROMPTS)


@pytest.fixture(scope="module")
def mistral_embeds(mistral3):
    model, processor = mistral3
    return Mistral3SmallEmbedder(model, processor=processor, dtype=torch.float32)(PROMPTS)


def diffusers_qwen3(qwen3, layers=OUTPUT_LAYERS_QWEN3) -> torch.Tensor:
    model, tokenizer = qwen3
    return Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=model, tokenizer=tokenizer, prompt=PROMPTS, hidden_states_layers=layers
    )


def diffusers_mistral(mistral3, layers=OUTPUT_LAYERS_MISTRAL, system_message=SYSTEM_MESSAGE) -> torch.Tensor:
    model, processor = mistral3
    return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        text_encoder=model,
        tokenizer=processor,
        prompt=PROMPTS,
        system_message=system_message,
        hidden_states_layers=layers,
    )


def test_constants_match_the_reference():
    assert OUTPUT_LAYERS_QWEN3 == (9, 18, 27)
    assert OUTPUT_LAYERS_MISTRAL == (10, 20, 30)
    assert MAX_LENGTH == 512
    assert "object\nattribution" in SYSTEM_MESSAGE
    # diffusers copies BFL's system_messages.py verbatim, newline included.
    assert SYSTEM_MESSAGE == DIFFUSERS_SYSTEM_MESSAGE


# ---- Qwen3 (Klein) ----


def test_qwen3_chat_template(qwen3):
    model, tokenizer = qwen3
    embedder = Qwen3Embedder(model, tokenizer=tokenizer, dtype=torch.float32)
    expected = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert embedder.format_prompt("a cat") == expected


def test_qwen3_shape_and_sizes(qwen3, qwen3_embeds):
    model, tokenizer = qwen3
    embedder = Qwen3Embedder(model, tokenizer=tokenizer, dtype=torch.float32)
    assert (embedder.hidden_size, embedder.output_dim) == (TINY_HIDDEN, TINY_OUT)
    assert qwen3_embeds.shape == (len(PROMPTS), MAX_LENGTH, TINY_OUT)
    assert qwen3_embeds.dtype == torch.float32


def padded_hidden_states(model, ids: list[int], pad_id: int, side: str, layers: tuple[int, ...]) -> torch.Tensor:
    """The oracle for one prompt: its token ids padded by hand to MAX_LENGTH on `side`, run through the LLM with
    the matching attention mask, hidden states `layers` concatenated per token -> [1, MAX_LENGTH, 3 * hidden]."""
    pad = MAX_LENGTH - len(ids)
    if side == "right":
        input_ids, mask = ids + [pad_id] * pad, [1] * len(ids) + [0] * pad
    else:
        input_ids, mask = [pad_id] * pad + ids, [0] * pad + [1] * len(ids)
    with torch.no_grad():
        hidden = model(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.tensor([mask]),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
    return torch.cat([hidden[k] for k in layers], dim=-1)


def test_qwen3_embedder_pads_right_and_pad_states_reach_the_output(qwen3, qwen3_embeds):
    """The third-party parity report's right padding for the Qwen3 path, seen in the embedder's output: the
    prompt's tokens come first, and the pad positions after them carry their non-zero hidden states."""
    model, tokenizer = qwen3
    text = Qwen3Embedder(model, tokenizer=tokenizer).format_prompt(PROMPTS[0])
    ids = tokenizer(text)["input_ids"]
    right = padded_hidden_states(model, ids, tokenizer.pad_token_id, "right", OUTPUT_LAYERS_QWEN3)
    assert torch.equal(qwen3_embeds[:1], right)
    assert qwen3_embeds[0, len(ids) :].abs().amax(dim=-1).min() > 0  # every pad position, none zeroed
    # Negative control: the same prompt padded on the left gives other embeddings.
    left = padded_hidden_states(model, ids, tokenizer.pad_token_id, "left", OUTPUT_LAYERS_QWEN3)
    assert max_abs_diff(qwen3_embeds[:1], left) > 1e-3


def test_qwen3_per_token_layout_is_layer_blocks(qwen3, qwen3_embeds):
    model, tokenizer = qwen3
    text = Qwen3Embedder(model, tokenizer=tokenizer).format_prompt(PROMPTS[0])
    tokens = tokenizer([text], return_tensors="pt", padding="max_length", max_length=MAX_LENGTH)
    with torch.no_grad():
        hidden = model(**tokens, output_hidden_states=True).hidden_states
    blocks = qwen3_embeds[:1].split(TINY_HIDDEN, dim=-1)
    for block, layer in zip(blocks, OUTPUT_LAYERS_QWEN3, strict=True):
        assert torch.equal(block, hidden[layer])


def test_qwen3_matches_diffusers(qwen3, qwen3_embeds):
    diff = max_abs_diff(qwen3_embeds, diffusers_qwen3(qwen3))
    assert diff == 0.0, f"Qwen3Embedder vs Flux2KleinPipeline: max abs diff {diff}"


def test_qwen3_parity_check_can_fail(qwen3, qwen3_embeds):
    # Negative control: one layer off in the oracle must show up far above fp32 rounding.
    diff = max_abs_diff(qwen3_embeds, diffusers_qwen3(qwen3, layers=(9, 18, 26)))
    assert diff > 1e-3


def test_qwen3_loads_from_saved_folder(tmp_path, qwen3_embeds):
    folder = save_tiny_qwen3(tmp_path / "qwen3", seed=0)
    by_path = Qwen3Embedder(str(folder), dtype=torch.float32)
    assert torch.equal(by_path(PROMPTS), qwen3_embeds)
    by_loader = load_qwen3_embedder("4B", model_path=folder, dtype=torch.float32)
    assert torch.equal(by_loader(PROMPTS), qwen3_embeds)


def test_qwen3_defaults_to_bf16_when_loaded_by_path(tmp_path, qwen3_embeds):
    folder = save_tiny_qwen3(tmp_path / "qwen3", seed=0)
    embedder = Qwen3Embedder(folder)
    out = embedder(PROMPTS)
    assert embedder.model.dtype == out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert max_abs_diff(out, qwen3_embeds) < 0.05 * qwen3_embeds.abs().max().item()


def test_qwen3_bf16_in_memory_and_max_length():
    model, tokenizer = tiny_qwen3(seed=0)
    out = Qwen3Embedder(model, tokenizer=tokenizer, dtype=torch.bfloat16, max_length=64)(PROMPTS)
    assert out.shape == (len(PROMPTS), 64, TINY_OUT)
    assert out.dtype == torch.bfloat16
    oracle = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=model, tokenizer=tokenizer, prompt=PROMPTS, max_sequence_length=64
    )
    assert torch.equal(out, oracle)  # same bf16 ops in the same order: bit-identical


# ---- Mistral-Small (dev) ----


def test_mistral_conversation_drops_img_markers():
    conversation = Mistral3SmallEmbedder.format_conversation("two [IMG]cats[IMG]")
    assert conversation == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
        {"role": "user", "content": [{"type": "text", "text": "two cats"}]},
    ]


def test_mistral_img_marker_does_not_change_the_embedding(mistral3, mistral_embeds):
    model, processor = mistral3
    embedder = Mistral3SmallEmbedder(model, processor=processor, dtype=torch.float32)
    assert torch.equal(embedder(["two cats  on a sofa"]), mistral_embeds[2:])


def test_tiny_mistral_processor_renders_the_template_and_pads_left(mistral3):
    """The in-memory processor fixture: the reference's chat layout, and left padding as reported for the real
    Mistral-Small processor (the embedder's output is checked in the next test)."""
    _, processor = mistral3
    batch = [Mistral3SmallEmbedder.format_conversation("a cat")]
    tokens = processor.apply_chat_template(
        batch, tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", max_length=MAX_LENGTH
    )
    text = processor.decode(tokens["input_ids"][0][tokens["attention_mask"][0].bool()])
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]"
    assert tokens["attention_mask"][0, 0] == 0 and tokens["attention_mask"][0, -1] == 1


def test_mistral_embedder_pads_left_and_pad_states_reach_the_output():
    """Left padding for the Mistral path, seen in the embedder's output: the pad positions come first and carry
    their non-zero hidden states, the prompt's tokens sit at the end.

    The tiny model's pad embedding is zero (transformers zero-initialises the `padding_idx` row) and left pads see
    only masked pads, so their states would be zero whatever the embedder did. A trained checkpoint's pad row need
    not be zero, so this test gives the pad token a random embedding first."""
    model, processor = tiny_mistral3(seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[processor.pad_token_id].normal_(generator=torch.Generator().manual_seed(0))
    embeds = Mistral3SmallEmbedder(model, processor=processor, dtype=torch.float32)(PROMPTS[:1])
    conversation = Mistral3SmallEmbedder.format_conversation(PROMPTS[0])
    ids = processor.apply_chat_template([conversation], tokenize=True, return_dict=True)["input_ids"][0]
    left = padded_hidden_states(model, ids, processor.pad_token_id, "left", OUTPUT_LAYERS_MISTRAL)
    assert torch.equal(embeds, left)
    assert embeds[0, : MAX_LENGTH - len(ids)].abs().amax(dim=-1).min() > 0  # every pad position, none zeroed
    # Negative control: the same prompt padded on the right gives other embeddings.
    right = padded_hidden_states(model, ids, processor.pad_token_id, "right", OUTPUT_LAYERS_MISTRAL)
    assert max_abs_diff(embeds, right) > 1e-3


def test_mistral_shape_and_sizes(mistral3, mistral_embeds):
    model, processor = mistral3
    embedder = Mistral3SmallEmbedder(model, processor=processor, dtype=torch.float32)
    assert (embedder.hidden_size, embedder.output_dim) == (TINY_HIDDEN, TINY_OUT)
    assert mistral_embeds.shape == (len(PROMPTS), MAX_LENGTH, TINY_OUT)


def test_mistral_matches_diffusers(mistral3, mistral_embeds):
    diff = max_abs_diff(mistral_embeds, diffusers_mistral(mistral3))
    assert diff == 0.0, f"Mistral3SmallEmbedder vs Flux2Pipeline: max abs diff {diff}"


def test_mistral_parity_check_can_fail(mistral3, mistral_embeds):
    # Negative controls: the system message without its line break, and one layer off.
    flat_message = SYSTEM_MESSAGE.replace("\n", " ")
    assert max_abs_diff(mistral_embeds, diffusers_mistral(mistral3, system_message=flat_message)) > 1e-3
    assert max_abs_diff(mistral_embeds, diffusers_mistral(mistral3, layers=(10, 20, 29))) > 1e-3


def test_mistral_loads_from_saved_folder(tmp_path, mistral_embeds):
    folder = save_tiny_mistral3(tmp_path / "mistral3", seed=0)
    by_path = Mistral3SmallEmbedder(str(folder), dtype=torch.float32)
    assert torch.equal(by_path(PROMPTS), mistral_embeds)
    by_loader = load_mistral_small_embedder(model_path=folder, dtype=torch.float32)
    assert torch.equal(by_loader(PROMPTS), mistral_embeds)
    bf16 = Mistral3SmallEmbedder(folder)
    out = bf16(PROMPTS)
    assert bf16.model.dtype == out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, diffusers_mistral((bf16.model, bf16.processor)))


# ---- tiny models ----


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first, second, other = tiny_qwen3(0)[0], tiny_qwen3(0)[0], tiny_qwen3(1)[0]
    assert torch.equal(torch.get_rng_state(), state)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    mistral_a, mistral_b = tiny_mistral3(0)[0], tiny_mistral3(0)[0]
    pairs = zip(mistral_a.state_dict().values(), mistral_b.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


# ---- errors ----


@pytest.mark.parametrize(
    ("prompts", "match"),
    [("a cat", r"wrap it as \[prompt\]"), ([], "non-empty list"), (["ok", 3], r"prompts\[1\] must be a str")],
)
def test_bad_prompts_raise_value_error(qwen3, mistral3, prompts, match):
    qwen_model, tokenizer = qwen3
    mistral_model, processor = mistral3
    with pytest.raises(ValueError, match=match):
        Qwen3Embedder(qwen_model, tokenizer=tokenizer, dtype=torch.float32)(prompts)
    with pytest.raises(ValueError, match=match):
        Mistral3SmallEmbedder(mistral_model, processor=processor, dtype=torch.float32)(prompts)


def test_bad_constructor_arguments_raise_value_error(qwen3, mistral3):
    qwen_model, tokenizer = qwen3
    with pytest.raises(ValueError, match="tokenizer is required"):
        Qwen3Embedder(qwen_model)
    with pytest.raises(ValueError, match="processor is required"):
        Mistral3SmallEmbedder(mistral3[0])
    with pytest.raises(ValueError, match="model_spec must be"):
        Qwen3Embedder(42, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        Qwen3Embedder(qwen_model, tokenizer=tokenizer, max_length=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        load_qwen3_embedder("2B")
    shallow = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    )  # fmt: skip
    with pytest.raises(ValueError, match="has 4 decoder layers"):
        Qwen3Embedder(shallow, tokenizer=tokenizer)
