"""Text generation outside TRL's rollout: a model completes prompts under the run's generation settings.

Used by privileged sources that make their context with a model (`RolloutView.generate`). The caller picks the model
and its mode; this module only tokenizes, generates and decodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig
from trl.trainer.utils import pad

from rlsd.core.rollout_losses import completion_mask


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    prompts: Sequence[Any],
    *,
    tokenize_prompts: Callable[[list[Any]], tuple[list[list[int]], Any, Any]],
    pad_token_id: int,
    decode: Callable[[list[torch.Tensor]], list[str]],
    generation_config: GenerationConfig,
    eos_token_ids: Sequence[int],
    synced_gpus: bool = False,
) -> list[str]:
    """One completion per prompt (rendered and tokenized as the rollout tokenizes its prompts, left-padded), cut after
    its first end-of-sequence token and decoded."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids_list, _, _ = tokenize_prompts(list(prompts))
    ids = pad([torch.tensor(x) for x in ids_list], padding_value=pad_token_id, padding_side="left").to(device)
    mask = pad([torch.ones(len(x), dtype=torch.long) for x in ids_list], padding_value=0, padding_side="left")
    sequences = model.generate(input_ids=ids, attention_mask=mask.to(device), generation_config=generation_config,
                               synced_gpus=synced_gpus)  # fmt: skip
    completion = sequences[:, ids.size(1) :]
    keep = completion_mask(completion, eos_token_ids).bool()
    return decode([row[kept] for row, kept in zip(completion, keep, strict=True)])
