"""The transformers `GenerationConfig` of a run whose rollouts vLLM generates.

TRL builds `GenerationConfig` only when transformers generates the rollouts; with `use_vllm` it has none. The
project's own transformers generation (a teacher that writes its context, `rlsd.step.generation`) still samples "with
the run's settings", so it gets the config TRL would have built from the same arguments."""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig


def run_generation_config(args: Any, tokenizer: Any, eos_token_ids: list[int], temperature: float) -> GenerationConfig:
    """The `GenerationConfig` TRL 1.16's `GRPOTrainer` builds for transformers generation (its non-vLLM branch), from
    the run's arguments: the completion length, sampling knobs and `generation_kwargs`."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": args.max_completion_length,
        "do_sample": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_token_ids,
        "temperature": temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "cache_implementation": args.cache_implementation,
    }
    kwargs.update(args.generation_kwargs or {})
    return GenerationConfig(**kwargs, disable_compile=True)
