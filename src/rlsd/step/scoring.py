"""No-grad scoring of completions after a prompt, with the prompt's KV cache reused across a group.

`score_tokens` returns log p(y_t | p, y_<t) of every completion token (and optionally the entropy of the
next-token distribution and the backbone's last hidden state at the position that predicts y_t). With
`group_size=G`, rows are taken as G consecutive completions of one prompt: the prompt runs once per group, its
cache is repeated G times, and only the completions run per row. That path reproduces the plain one
(one forward on [prompt ; completion] per row, TRL's `_get_per_token_logps_and_entropies`) to float rounding:
same attention masks, same positions (HF's default `arange` over the whole padded row, pads included), same
last-prompt logits for the first completion token.

Prefix reuse falls back to the plain path (see `prefix_reuse_blocker`) when:
  * `model_kwargs` is not empty (vision / multimodal inputs, token-type ids: they span the whole sequence);
  * the model keeps no standard KV cache (stateful / recurrent models, `_supports_default_dynamic_cache()` false,
    models that cannot generate, encoder-decoders), or the cache it returns is not a `DynamicCache` made only of
    full-attention `DynamicLayer`s (sliding-window, linear-attention, quantized, offloaded caches);
  * the config uses sliding-window attention (`use_sliding_window` with a `sliding_window`, or `layer_types`
    other than `full_attention`);
  * the model derives positions from the attention mask (OPT, BioGPT: learned absolute positions indexed by
    `cumsum(mask) - 1`, which the explicit `arange` positions of the prefix path would contradict for left-padded
    prompts), detected by a positional `nn.Embedding` whose forward takes the attention mask;
  * the config opts out with `rlsd_prefix_reuse = False`.
A fallback is logged once per model class and reason (logger `rlsd.step.scoring`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ScoreResult", "prefix_reuse_blocker", "score_tokens"]

logger = logging.getLogger(__name__)
_LOGGED_FALLBACKS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class ScoreResult:
    """Per-token scores of the completions: `logps` (B, T) float32, `entropy` (B, T) float32 or None, `hidden`
    (B, T, H) in the model's dtype or None. `logps` and `entropy` are 0 where `completion_mask` is 0, as in TRL."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    batch_size: int,
    with_entropy: bool = False,
    with_hidden: bool = False,
    group_size: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    fused_head: bool = False,
) -> ScoreResult:
    """Score `completion_ids` after `prompt_ids` (left-padded prompts, right-padded completions), `batch_size` rows
    per forward. With `group_size=G > 1`, rows g*G .. g*G+G-1 must share one prompt (else ValueError) and the prompt
    runs once per group, unless `prefix_reuse_blocker` names a reason to score row by row. With `fused_head` (the
    model carries TRL's `add_fused_lm_head` patch, with the entropy among its outputs when `with_entropy`), the
    shared-prefix path scores through that head and never builds (rows, T, V) logits.

    Runs under whatever autocast context is open and opens none: under mixed precision the caller must open the
    one its plain pass uses (`Scorer.score` opens `accelerator.autocast()`, as TRL's scoring forward does),
    else the two paths score at different precisions."""
    _check_shapes(prompt_ids, prompt_mask, completion_ids, completion_mask, batch_size, group_size)
    model_kwargs = dict(model_kwargs or {})
    if group_size > 1:
        _check_groups(prompt_ids, prompt_mask, group_size)
        blocker = prefix_reuse_blocker(model, model_kwargs)
        if blocker is not None:
            _log_fallback(model, blocker)
        elif fused_head and prompt_ids.size(1) > 1:
            result = _score_prefix_fused(
                model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                batch_size=batch_size, with_entropy=with_entropy, with_hidden=with_hidden, group_size=group_size,
            )  # fmt: skip
            if result is not None:
                return result
        else:
            result = _score_prefix(
                model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                temperature=temperature, batch_size=batch_size, with_entropy=with_entropy,
                with_hidden=with_hidden, group_size=group_size,
            )  # fmt: skip
            if result is not None:
                return result
    return _score_plain(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask,
        temperature=temperature, batch_size=batch_size, with_entropy=with_entropy, with_hidden=with_hidden,
        model_kwargs=model_kwargs,
    )  # fmt: skip


def prefix_reuse_blocker(model: nn.Module, model_kwargs: dict[str, Any] | None = None) -> str | None:
    """Why the prompt's cache cannot be shared across a group for `model` (None when it can): checked before any
    forward; the cache the prefix forward returns is checked again by `_is_plain_dynamic_cache`."""
    if model_kwargs:
        return f"model_kwargs ({', '.join(sorted(model_kwargs))}) span the whole sequence"
    base = _unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        return "the model has no config"
    if getattr(config, "rlsd_prefix_reuse", True) is False:
        return "config.rlsd_prefix_reuse is False"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if getattr(base, "_is_stateful", False):
        return "stateful (recurrent) model"
    mask_positions = _mask_derived_positions(base)
    if mask_positions is not None:
        return f"positions derived from the attention mask ({mask_positions}, model_type {config.model_type!r})"
    supports_cache = getattr(base, "_supports_default_dynamic_cache", None)
    can_generate = getattr(base, "can_generate", None)
    if supports_cache is None or not supports_cache() or can_generate is None or not can_generate():
        return "the model has no standard dynamic KV cache"
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text_config, "use_sliding_window", False) and getattr(text_config, "sliding_window", None):
        return "sliding-window attention"
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"layer types other than full attention: {sorted(set(layer_types))}"
    return None


def _mask_derived_positions(model: nn.Module) -> str | None:
    """The class name of the first positional `nn.Embedding` of `model` whose forward takes the attention mask (None
    if there is none). Such a table is indexed by positions counted over the mask (OPT, BioGPT: `cumsum(mask) - 1`,
    pads skipped), not by HF's default `arange` over the padded row that the prefix path passes. Detected by
    structure, not by a list of model types, so that copies of these models (Galactica, remote code) are caught;
    BioGPT is caught although its decoder (transformers 5.24) passes `arange` positions itself: that costs only the
    plain path."""
    for module in model.modules():
        if isinstance(module, nn.Embedding) and _forward_takes_mask_first(type(module)):
            return type(module).__name__
    return None


@functools.cache
def _forward_takes_mask_first(module_type: type[nn.Module]) -> bool:
    """Whether `module_type.forward`'s first argument is `attention_mask` (OPT's and BioGPT's learned positions)."""
    parameters = [name for name in inspect.signature(module_type.forward).parameters if name != "self"]
    return bool(parameters) and parameters[0] == "attention_mask"


def _log_fallback(model: nn.Module, reason: str) -> None:
    """Log, once per model class and reason, that `score_tokens` scores row by row instead of sharing prefixes."""
    key = (type(_unwrap(model)).__name__, reason)
    if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        logger.warning("prefix sharing off for %s: %s; scoring row by row", key[0], reason)


def _check_shapes(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    batch_size: int,
    group_size: int,
) -> None:
    """Refuse inputs whose shapes do not line up, before any forward."""
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} differ")
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and completion_mask {tuple(completion_mask.shape)} differ"
        )
    if prompt_ids.size(0) != completion_ids.size(0):
        raise ValueError(f"{prompt_ids.size(0)} prompt rows for {completion_ids.size(0)} completion rows")
    if batch_size < 1 or group_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and group_size ({group_size}) must be positive")
    if prompt_ids.size(0) % group_size:
        raise ValueError(f"{prompt_ids.size(0)} rows are not whole groups of {group_size}")


def _check_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int) -> None:
    """Rows g*G .. g*G+G-1 must carry the same prompt ids and mask: a ValueError names the first group that does
    not (sharing its cache would silently score completions after another prompt)."""
    rows, length = prompt_ids.shape
    ids = prompt_ids.view(rows // group_size, group_size, length)
    mask = prompt_mask.view(rows // group_size, group_size, length)
    same = (ids == ids[:, :1]).all(dim=(1, 2)) & (mask == mask[:, :1]).all(dim=(1, 2))
    if not bool(same.all()):
        group = int((~same).nonzero()[0, 0])
        raise ValueError(
            f"group {group} (rows {group * group_size}..{group * group_size + group_size - 1}) does not share one "
            f"prompt: rows of a group must have identical prompt_ids and prompt_mask for group_size={group_size}"
        )


def _score_plain(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    batch_size: int,
    with_entropy: bool,
    with_hidden: bool,
    model_kwargs: dict[str, Any],
) -> ScoreResult:
    """One forward on [prompt ; completion] per chunk of `batch_size` rows, as TRL scores: logits at the T positions
    before each completion token. Tensors of `model_kwargs` with one row per sample are chunked with the rows."""
    rows, length = completion_ids.shape
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    if model_kwargs and batch_size < rows and any(not _is_per_row(v, rows) for v in model_kwargs.values()):
        raise ValueError("model_kwargs that are not one row per sample cannot be chunked: raise batch_size to B")
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for start in range(0, rows, batch_size):
        end = min(start + batch_size, rows)
        extra = {k: v[start:end] if _is_per_row(v, rows) else v for k, v in model_kwargs.items()}
        with _captured_hidden(model if with_hidden else None) as hidden:
            out = model(
                input_ids=input_ids[start:end], attention_mask=attention_mask[start:end],
                use_cache=False, logits_to_keep=length + 1, **extra,
            )  # fmt: skip
        logits = out.logits[:, -length - 1 : -1]
        parts.append(_token_scores(logits, completion_ids[start:end], temperature, with_entropy))
        if with_hidden:
            parts[-1] = (*parts[-1][:2], hidden[-1][:, -length - 1 : -1])
    return _assemble(parts, completion_mask)


def _score_prefix(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    batch_size: int,
    with_entropy: bool,
    with_hidden: bool,
    group_size: int,
) -> ScoreResult | None:
    """The prompt once per group (cache and last-position logits repeated G times), then the completions with the
    prompt's mask and positions continuing after the padded prompt; chunks of whole groups, max(1, batch_size // G)
    groups each. None when the returned cache cannot be shared (the caller then scores row by row)."""
    rows, length = completion_ids.shape
    prompt_length = prompt_ids.size(1)
    groups_per_chunk = max(1, batch_size // group_size)
    cache_kwarg = _cache_kwarg(model)
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for first in range(0, rows // group_size, groups_per_chunk):
        start = first * group_size
        end = min(start + groups_per_chunk * group_size, rows)
        unique = slice(start, end, group_size)
        # Positions as the plain path's model computes them: arange over the padded row, pads included (models that
        # count positions over the mask are blocked: `_mask_derived_positions`)
        prompt_positions = torch.arange(prompt_length, device=prompt_ids.device).expand(end - start, -1)
        with _captured_hidden(model if with_hidden else None) as hidden:
            prefix = model(
                input_ids=prompt_ids[unique], attention_mask=prompt_mask[unique],
                position_ids=prompt_positions[::group_size], use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        cache = _output_cache(prefix)
        if not _is_plain_dynamic_cache(cache):
            return None
        cache.batch_repeat_interleave(group_size)
        attention_mask = torch.cat([prompt_mask[start:end], completion_mask[start:end]], dim=1)
        positions = prompt_positions[:, -1:] + 1 + torch.arange(length, device=prompt_ids.device)
        with _captured_hidden(model if with_hidden else None) as completion_hidden:
            out = model(
                input_ids=completion_ids[start:end], attention_mask=attention_mask, position_ids=positions,
                use_cache=True, logits_to_keep=length, **{cache_kwarg: cache},
            )  # fmt: skip
        first_logits = prefix.logits[:, -1:].repeat_interleave(group_size, dim=0)
        logits = torch.cat([first_logits, out.logits[:, :-1]], dim=1)
        part = _token_scores(logits, completion_ids[start:end], temperature, with_entropy)
        if with_hidden:
            first_hidden = hidden[-1][:, -1:].repeat_interleave(group_size, dim=0)
            part = (*part[:2], torch.cat([first_hidden, completion_hidden[-1][:, :-1]], dim=1))
        parts.append(part)
        del cache, prefix, out
    return _assemble(parts, completion_mask)


def _score_prefix_fused(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    batch_size: int,
    with_entropy: bool,
    with_hidden: bool,
    group_size: int,
) -> ScoreResult | None:
    """`_score_prefix` through TRL's fused log-prob head: the prompt but its last token runs once per group; the
    last prompt token and the completion then run per row on the repeated cache, with the completion as labels, so
    that the head scores exactly the T completion tokens in tiles (no logits tensor). None when the cache cannot be
    shared."""
    rows, length = completion_ids.shape
    prompt_length = prompt_ids.size(1)
    groups_per_chunk = max(1, batch_size // group_size)
    cache_kwarg = _cache_kwarg(model)
    device = prompt_ids.device
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for first in range(0, rows // group_size, groups_per_chunk):
        start = first * group_size
        end = min(start + groups_per_chunk * group_size, rows)
        unique = slice(start, end, group_size)
        prefix_positions = torch.arange(prompt_length - 1, device=device).expand(
            len(range(start, end, group_size)), -1
        )
        prefix = model(
            input_ids=prompt_ids[unique, :-1], attention_mask=prompt_mask[unique, :-1], position_ids=prefix_positions,
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        cache = _output_cache(prefix)
        if not _is_plain_dynamic_cache(cache):
            return None
        cache.batch_repeat_interleave(group_size)
        input_ids = torch.cat([prompt_ids[start:end, -1:], completion_ids[start:end]], dim=1)
        labels = input_ids.masked_fill(
            torch.cat([prompt_mask[start:end, -1:], completion_mask[start:end]], 1) == 0, -100
        )
        positions = prompt_length - 1 + torch.arange(length + 1, device=device).expand(end - start, -1)
        with _captured_hidden(model if with_hidden else None) as hidden:
            out = model(
                input_ids=input_ids, attention_mask=torch.cat([prompt_mask[start:end], completion_mask[start:end]], 1),
                position_ids=positions, labels=labels, fused_lm_head=True, **{cache_kwarg: cache},
            )  # fmt: skip
        if with_entropy and out.entropy is None:
            raise ValueError("with_entropy needs a fused head installed with the entropy among its outputs")
        entropy = out.entropy.float() if with_entropy else None
        parts.append((out.log_probs.float(), entropy, hidden[-1][:, :-1] if with_hidden else None))
        del cache, prefix, out
    return _assemble(parts, completion_mask)


def _token_scores(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """log p(target) and the entropy of softmax(logits / temperature), in float32 (TRL's fused head's maths)."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    logps = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
    return logps, entropy, None


def _assemble(
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], completion_mask: torch.Tensor
) -> ScoreResult:
    """Concatenate chunk results and zero `logps`/`entropy` off the completion mask, as TRL's labels do."""
    keep = completion_mask.bool()
    logps = torch.cat([p[0] for p in parts]).masked_fill(~keep, 0.0)
    entropy = torch.cat([p[1] for p in parts]).masked_fill(~keep, 0.0) if parts[0][1] is not None else None
    hidden = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
    return ScoreResult(logps=logps, entropy=entropy, hidden=hidden)


def _is_per_row(value: Any, rows: int) -> bool:
    """Whether `value` is a tensor with one entry per sample (then it is chunked with the rows)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == rows


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` in transformers >= 5.24, `past_key_values` before."""
    forward = type(_unwrap(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either of transformers' names (None if it returned none)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _is_plain_dynamic_cache(cache: Any) -> bool:
    """Whether `cache` is a `DynamicCache` of full-attention `DynamicLayer`s only: the one layout whose batch can
    be repeated and then extended without changing what each row attends to."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        return False
    return len(cache.layers) > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)


@contextlib.contextmanager
def _captured_hidden(model: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Collect the backbone's last hidden state (after its final norm, what the LM head projects) of every forward
    of `model` while open; None captures nothing."""
    captured: list[torch.Tensor] = []
    if model is None:
        yield captured
        return

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = _unwrap(model).base_model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
