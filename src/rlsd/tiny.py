"""A character-level tokenizer and a tiny Qwen2 built in code: the offline stand-ins for a hub model.

Both are ordinary `transformers` objects (`PreTrainedTokenizerFast`, `Qwen2ForCausalLM`), saved and loaded with
`save_pretrained` / `from_pretrained`, so everything downstream treats them like any hub checkpoint.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
CHARACTERS = (*string.printable[:95], "\n")  # printable ASCII (space included) and newline

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""A minimal chat template so that conversational prompts work with the tiny tokenizer."""


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, the four reasoning tags as single tokens, `<eos>` to end and `<pad>` to pad."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *TAG_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tag_pattern = "|".join(t.replace("/", r"\/") for t in TAG_TOKENS)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{tag_pattern}|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAG_TOKENS)})
    return tokenizer


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_positions: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM sized for a CPU (hidden 128, 4 layers is about 1M parameters)."""
    import torch

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
