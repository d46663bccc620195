"""Tiny random causal LMs of every supported architecture, built in-process for unit tests.

They share one small byte-level BPE tokenizer trained here on a few sentences, so tests
exercise real tokenization (spaces, multi-token words) without any download.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "gemma3", "gpt2", "qwen2", "gpt_neox")

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The mother tongue of Danielle Darrieux is French. She speaks English too.",
    "The Space Needle is located in the city of Seattle, in Washington.",
    "Michael Jordan plays the sport of basketball. Lionel Messi plays football.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-{}",
]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return fast


def tiny_config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                max_position_embeddings=2048, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"] * 2, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=2048, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=2048, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None):
    """(model, tokenizer): a random model in eval mode, float32, weights frozen."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    model.eval().requires_grad_(False)
    return model, tokenizer
