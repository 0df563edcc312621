"""Tiny text-encoder stand-ins that only tests use: a random Mistral-3 VLM for [dev], and both tiny encoders
written as Hub-style folders that the real loading code reads as it reads a download.

The Mistral decoder has one layer more than the deepest layer the embedder reads (31 > 30), for the reason
given in flux2.tiny_text_encoders. Same seed => bit-identical weights.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

from flux2.tiny import seeded
from flux2.tiny_text_encoders import TINY_HIDDEN, byte_vocab, tiny_qwen3

MISTRAL_LAYERS = 31

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


def _tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    vocab = byte_vocab(MISTRAL_SPECIAL_TOKENS)
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
