"""A tiny random-weight Llama with its own byte-level BPE tokenizer and chat template, built on the spot.

vLLM can load and serve it like any Hugging Face checkpoint, so the `vllm` tests exercise the real engine
without downloading anything. The weights are random, so the text is gibberish, but it is deterministic for
a prompt under greedy decoding. Two choices keep the tests meaningful:
- head_dim is 64: vLLM's CPU attention kernel refuses 16;
- the end-of-sequence row of the output projection is zero, so greedy decoding never picks EOS over the
  random (mostly positive at the top) logits of the other tokens: a generation runs to max_tokens unless a
  stop string ends it, which keeps streams long enough to cancel mid-way.

Built models are cached under a directory, keyed by a hash of everything that shapes them, so a test
session builds one once. transformers, tokenizers and torch are imported inside the builder: this module
imports in any environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"

# Each message is wrapped in role markers, so a rendered prompt is easy to tell from the raw messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CONFIG = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "vocab_size": 512,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
SEED = 1234

# Enough English-ish text for the BPE trainer to learn merges that make words a few tokens long.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "ChatterBot streams tokens from a language model to many users at once.",
    "A request waits in the queue until the engine has a free slot for it.",
    "Continuous batching keeps the accelerator busy while sequences come and go.",
    "user system assistant message reply answer question context history",
    "What is the capital of France? Paris is the capital of France.",
    "one two three four five six seven eight nine ten eleven twelve",
    "The cache keeps recent turns; the store keeps every turn forever.",
    "0123456789 !?.,;:'\"()[]{}<>|/-_+=*&^%$#@~`",
]


def _fingerprint() -> str:
    """Hash of everything that shapes the model; a change builds a new one."""
    spec = {
        "config": CONFIG,
        "seed": SEED,
        "template": CHAT_TEMPLATE,
        "corpus": _CORPUS,
        "special": [BOS, EOS, PAD],
        "v": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_tiny_llama(path: Path) -> Path:
    """The tiny model's directory under the cache directory `path`, built there first if missing."""
    path = Path(path)
    target = path / f"tiny-llama-{_fingerprint()}"
    if (target / ".complete").exists():
        return target
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=path))
    try:
        _build(staging)
        (staging / ".complete").write_text("ok\n")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) <= CONFIG["vocab_size"], len(tokenizer)

    config = LlamaConfig(
        **{k: v for k, v in CONFIG.items() if k != "torch_dtype"},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
