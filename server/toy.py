"""Seeded Llama-architecture models and byte-level BPE tokenizers, built here from a config.

No model hub is reachable from our machines, so tests, the benchmark and the demo make their
own models: a tokenizer trained with `tokenizers` on a given corpus (with a chat template),
and a `LlamaForCausalLM` initialised from a seed, both saved with `save_pretrained` so they
load like any Hugging Face model directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each turn: role marker, content, end-of-sequence. Generation for the assistant stops at </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
DEFAULT_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "o rato roeu a roupa do rei de roma",
    "loraserve serves many adapters on one base model",
    "hello world, olá mundo! ação, coração, 東京 🙂",
]


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer (every byte sequence encodes) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(
    vocab_size: int,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer: Any = None,
    **extra: Any,
) -> Any:
    """A randomly initialised LlamaForCausalLM, deterministic for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 1,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        **extra,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def save_toy_model(
    path: Path,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    tokenizer_vocab: int = 384,
    seed: int = 0,
    **model_kwargs: Any,
) -> Path:
    """Builds tokenizer and model and saves both into `path` (a Hugging Face model directory)."""
    path = Path(path)
    tokenizer = build_tokenizer(corpus, tokenizer_vocab)
    vocab = model_kwargs.pop("vocab_size", None) or len(tokenizer)
    model = build_llama(vocab_size=vocab, seed=seed, tokenizer=tokenizer, **model_kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
