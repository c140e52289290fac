"""Token counting where no model tokenizer is at hand.

A declared approximation: about four characters of English text per token (the usual figure for BPE
vocabularies of Llama-class models), never less than one token for a non-empty text.
"""

CHARS_PER_TOKEN = 4


def approx_token_count(text: str) -> int:
    """Approximate number of tokens in `text`."""
    if not text:
        return 0
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)
