"""Token counting for context budgets: the model's tokenizer when one is configured, else an approximation.

The declared approximation: about four characters of English text per token (the usual figure for BPE
vocabularies of Llama-class models), never less than one token for a non-empty text. A configured tokenizer
(`CHATTERBOT_CONTEXT_TOKENIZER`, a Hugging Face `tokenizer.json`) needs the `tokenizers` package. A process
builds its counter once, at start-up, and counts each text once: chat_svc counts a user's turn for history
and context alike, context_svc only what arrives without a count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

CHARS_PER_TOKEN = 4

# Counts the tokens of a text.
TokenCounter: TypeAlias = Callable[[str], int]


def approx_token_count(text: str) -> int:
    """Approximate number of tokens in `text`."""
    if not text:
        return 0
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)


def token_counter(tokenizer_path: str = "") -> TokenCounter:
    """A function counting the tokens of a text: with the tokenizer at `tokenizer_path`, or approximately."""
    if not tokenizer_path:
        return approx_token_count
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    return count
