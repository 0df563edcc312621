"""Chat models whose yes/no answer a test decides: single-token "yes"/"no", and a bias on the output logits."""

from contextlib import contextmanager

import torch

from flux2.safety import ANSWER_NO, ANSWER_YES


def with_yes_no_tokens(model, tokenizer):
    """The tiny vocabularies are byte-level ("yes" is 3 tokens); add "yes" and "no" as single tokens, as in the
    real Mistral-Small and Qwen3 vocabularies."""
    tokenizer.add_tokens([ANSWER_YES, ANSWER_NO])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model, tokenizer


@contextmanager
def forced_logits(model, boosts: dict[int, float]):
    """Add a bias to the lm_head output (token id -> boost) so that the greedy token is known in advance."""
    bias = torch.zeros(model.get_output_embeddings().out_features)
    for token_id, boost in boosts.items():
        bias[token_id] = boost
    handle = model.get_output_embeddings().register_forward_hook(lambda _module, _args, logits: logits + bias)
    try:
        yield
    finally:
        handle.remove()
