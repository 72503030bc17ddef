"""A character-level tokenizer and a tiny Qwen2 built in code: the offline stand-ins for a hub model.

Both are ordinary `transformers` objects (`Qwen2Tokenizer`, `Qwen2ForCausalLM`), saved and loaded with
`save_pretrained` / `from_pretrained`, so everything downstream treats them like any hub checkpoint.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
"""Single tokens, added as ordinary (not special) tokens so that decoding with `skip_special_tokens=True`, as TRL
does before calling the rewards, keeps them."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""A minimal chat template so that conversational prompts work with the tiny tokenizer."""


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges: one token per byte (so one per ASCII character), the four reasoning
    tags as single tokens, `<eos>` to end and `<pad>` to pad.

    It is a `Qwen2Tokenizer` so that `AutoTokenizer.from_pretrained` on a folder holding a Qwen2 config rebuilds
    exactly the same tokenizer (transformers picks the tokenizer class from the model type).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: (len(ch.encode()), ch))
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *alphabet))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token="<unk>", eos_token="<eos>", pad_token="<pad>", bos_token=None
    )
    tokenizer.add_tokens(list(TAG_TOKENS), special_tokens=False)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase,
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
