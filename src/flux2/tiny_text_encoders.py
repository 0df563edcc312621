"""The text encoder of the `tiny` self-test model: a tiny random-weight Qwen3, built offline in memory.

It has the real architecture (Qwen3, as Klein's) and a tokenizer with the real special tokens and chat-template
shape, so the embedder, diffusers' pipelines and `from_pretrained` treat it exactly as they treat the downloaded
model. Same seed => bit-identical weights. (The tests' tiny Mistral-3 for [dev] lives in tests/tiny_encoders.py.)

The decoder stack has one layer more than the deepest layer the embedder reads (28 > 27): with
`output_hidden_states`, transformers replaces the *last* hidden state by the final-norm output, while the real
models (36 layers) return layer 27 un-normed. The extra layer keeps that true here too.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from flux2.tiny import seeded

TINY_HIDDEN = 32
QWEN3_LAYERS = 28

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


def byte_vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """Specials first, then the 256 byte-level symbols: every string tokenizes, one token per byte."""
    symbols = list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet())
    return {symbol: i for i, symbol in enumerate(symbols)}


def tiny_qwen3(seed: int = 0) -> tuple[Qwen3ForCausalLM, Qwen2TokenizerFast]:
    """A random Qwen3 causal LM (hidden 32, 28 layers) and a byte-level Qwen2 tokenizer with the Qwen3 template."""
    vocab = byte_vocab(QWEN3_SPECIAL_TOKENS)
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
