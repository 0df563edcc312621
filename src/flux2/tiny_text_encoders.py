"""Tiny random-weight stand-ins for the FLUX.2 text encoders, built offline in memory.

They have the real architectures (Qwen3 for Klein, Mistral-3 for [dev]) and tokenizers with the real special
tokens and chat-template shape, so the embedders, diffusers' pipelines and `from_pretrained` treat them
exactly as they treat the downloaded models. Same seed => bit-identical weights.

The decoder stacks have one layer more than the deepest layer the embedders read (28 > 27, 31 > 30): with
`output_hidden_states`, transformers replaces the *last* hidden state by the final-norm output, while the real
models (36 and 40 layers) return layers 27 and 30 un-normed. The extra layer keeps that true here too.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from flux2.tiny import seeded

TINY_HIDDEN = 32
QWEN3_LAYERS = 28
MISTRAL_LAYERS = 31

QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# The Qwen3 template reduced to what the embedder uses: plain-string turns, the assistant header, and the empty
# think block that the real template emits when `enable_thinking=False`.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Mistral-Small-3.x token names. Only the names matter; the ids are those of this tiny vocabulary.
MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)  # fmt: skip

# Mistral-Small-style template: content may be a string or a list of typed parts, as diffusers and the
# reference send it ([{"type": "text", "text": ...}]); an image part becomes one [IMG] that the processor
# expands to the image's patch grid.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] == 'image' %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _byte_vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """Specials first, then the 256 byte-level symbols: every string tokenizes, one token per byte."""
    symbols = list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet())
    return {symbol: i for i, symbol in enumerate(symbols)}


def tiny_qwen3(seed: int = 0) -> tuple[Qwen3ForCausalLM, Qwen2TokenizerFast]:
    """A random Qwen3 causal LM (hidden 32, 28 layers) and a byte-level Qwen2 tokenizer with the Qwen3 template."""
    vocab = _byte_vocab(QWEN3_SPECIAL_TOKENS)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN3_SPECIAL_TOKENS[1:]),
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        tie_word_embeddings=True,
    )
    return seeded(lambda: Qwen3ForCausalLM(config), seed), tokenizer


def _tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    vocab = _byte_vocab(MISTRAL_SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(MISTRAL_SPECIAL_TOKENS))
    # The Mistral-Small processor pads on the left; keep that so pad positions sit where they do for real.
    # `processor_class` is written to tokenizer_config.json so that AutoProcessor loads this tokenizer back
    # instead of the PixtralProcessor that the folder's model type (mistral3) would otherwise select.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=MISTRAL_CHAT_TEMPLATE,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        processor_class="PreTrainedTokenizerFast",
    )


def tiny_mistral3(seed: int = 0) -> tuple[Mistral3ForConditionalGeneration, PreTrainedTokenizerFast]:
    """A random Mistral-3 VLM (text: hidden 32, 31 layers; a 1-layer Pixtral tower) and its text processor.

    The processor is the tokenizer carrying the chat template. transformers 5.x's `PixtralProcessor` cannot be
    built without torchvision (kept out of this project's test dependencies), and text encoding only calls
    `apply_chat_template`, which the tokenizer answers with the same arguments and the same result. Saved to a
    folder, `AutoProcessor.from_pretrained` loads it back as this tokenizer.
    """
    tokenizer = _tiny_mistral_tokenizer()
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tokenizer),
            hidden_size=TINY_HIDDEN,
            intermediate_size=2 * TINY_HIDDEN,
            num_hidden_layers=MISTRAL_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            sliding_window=None,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    return seeded(lambda: Mistral3ForConditionalGeneration(config), seed), tokenizer


def save_tiny_qwen3(folder: str | Path, seed: int = 0) -> Path:
    """Write `tiny_qwen3(seed)` as a Hub-style folder (model + tokenizer) and return its path."""
    model, tokenizer = tiny_qwen3(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_mistral3(folder: str | Path, seed: int = 0) -> Path:
    """Write `tiny_mistral3(seed)` as a Hub-style folder (model + tokenizer/processor) and return its path."""
    model, tokenizer = tiny_mistral3(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
