"""A tiny Qwen2-VL and its processor built in code: the offline vision-language stand-ins for a hub model.

The tokenizer is the character tokenizer of `rlsd.experiments.tiny` plus Qwen-VL's special tokens; the image
processor is the PIL one (no torchvision). One 28x28 image region (2x2 patches of 14 pixels) becomes one image token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rlsd.experiments.tiny import build_char_tokenizer

VISION_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
"""The special tokens Qwen2-VL's processor and chat template need."""
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""The tiny chat template of `rlsd.experiments.tiny`, with an image block rendered as Qwen-VL's placeholder."""
CELL = 28
"""Pixels per image token side: patch 14 times spatial merge 2."""


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision): images and text only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_vl_processor(max_tokens_per_image: int = 16) -> ImageOnlyQwen2VLProcessor:
    """The character tokenizer with Qwen-VL's special tokens and a PIL image processor that keeps images of up to
    `max_tokens_per_image` 28x28 cells at their size (so a 28x28 image is one image token)."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    images = Qwen2VLImageProcessorPil(
        min_pixels=CELL * CELL, max_pixels=CELL * CELL * max_tokens_per_image, patch_size=14, merge_size=2
    )
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=VL_CHAT_TEMPLATE)


def load_vl_processor(path: str | Path) -> ImageOnlyQwen2VLProcessor:
    """The processor saved with `save_pretrained` in a model folder (tokenizer and image processor files)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    images = Qwen2VLImageProcessorPil.from_pretrained(path)
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=VL_CHAT_TEMPLATE)


def build_tiny_qwen2_vl(
    processor: ImageOnlyQwen2VLProcessor,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vision_width: int = 32,
    vision_depth: int = 1,
    seed: int = 0,
) -> Qwen2VLForConditionalGeneration:
    """A freshly initialised Qwen2-VL sized for a CPU (the defaults give about 170k parameters: text hidden 64 in 2
    layers, a 1-layer vision tower of width 32). `mrope_section` splits the rotary half-dimension in 1:1.5:1.5."""
    tokenizer = processor.tokenizer
    token = tokenizer.convert_tokens_to_ids
    half = hidden_size // num_heads // 2
    temporal = half // 4
    section = [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size, num_heads=2,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def register_auto_processor() -> None:
    """Let `AutoProcessor.from_pretrained` resolve the saved `ImageOnlyQwen2VLProcessor` by name (tests and demos that
    go through `rlsd train` / `rlsd eval`; a real Qwen2-VL folder names `Qwen2VLProcessor` and is unaffected)."""
    from transformers import AutoProcessor, Qwen2VLConfig

    AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)


def save_tiny_vl_model(folder: str | Path, seed: int = 0, **sizes: int) -> Path:
    """A tiny Qwen2-VL and its processor saved as an ordinary model folder (for `rlsd train` / `rlsd eval`)."""
    processor = build_vl_processor()
    build_tiny_qwen2_vl(processor, seed=seed, **sizes).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
