"""The teacher of a PEFT policy as a second adapter on the same base: the policy's one active adapter, whether it is
an identity LoRA (the base model), a frozen copy of it without dropout, the two adapters' parameters matched by name,
and switching to the teacher's adapter for a forward."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from rlsd.teachers.sharding import _is_sharded


def _single_active_adapter(policy: nn.Module) -> str:
    """The name of the PEFT policy's one active adapter (the one training updates)."""
    active = policy.active_adapter
    if not isinstance(active, str):
        raise ValueError(f"a self-teacher needs a PEFT policy with one active adapter, not {active!r}")
    return active


def _is_identity_lora(policy: nn.Module, adapter: str) -> bool:
    """True when `adapter` is a LoRA (without DoRA) whose every layer adds zero: the policy is its base model. A linear
    layer's delta is zero when its B is; an embedding's when its A or its B is (PEFT starts embeddings at A = 0)."""
    config = policy.peft_config[adapter]
    if getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False):
        return False
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return False  # those are full copies of modules, not a zero-init delta
    layers = _lora_factors(policy, adapter)
    if not layers:
        return False
    factors = [factor for layer in layers for factor in layer]
    local = [[t.to_local() if isinstance(t, DTensor) else t for t in factor] for factor in factors]
    nonzero = torch.tensor([float(sum(int(t.count_nonzero()) for t in factor)) for factor in local])
    nonzero = nonzero.to(local[0][0].device)  # the collective's device
    if _is_sharded(policy):  # each process sees its own shards
        torch.distributed.all_reduce(nonzero)
    zero_factors = torch.split(nonzero == 0, [len(factors) for factors in layers])
    return all(bool(zero.any()) for zero in zero_factors)


def _lora_factors(policy: nn.Module, adapter: str) -> list[list[list[torch.Tensor]]]:
    """Per LoRA layer of `adapter`, the factors (each a list of tensors) of which any one being all zero makes the
    layer's delta zero: [B] for a linear / conv layer (its bias, if any, is B's), [A, B] for an embedding."""
    layers = []
    for module in policy.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and adapter in lora_b:
            layers.append([[p.detach() for p in lora_b[adapter].parameters()]])
        embedding_a, embedding_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
        if isinstance(embedding_a, nn.ParameterDict) and adapter in embedding_a:
            layers.append([[embedding_a[adapter].detach()], [embedding_b[adapter].detach()]])
    return layers


def _add_frozen_adapter_copy(policy: nn.Module, source: str, target: str) -> None:
    """Add adapter `target` to the PEFT policy as a frozen copy (config and weights, same dtypes) of `source`, without
    dropout, leaving the active adapter, every existing parameter's trainable flag and `source`'s dropout as they were
    (it is added after TRL's `disable_dropout_in_model`, and the teacher scores while the policy is in train mode)."""
    trainable = {name: p.requires_grad for name, p in policy.named_parameters()}
    config = _without_dropout(copy.deepcopy(policy.peft_config[source]))
    config.inference_mode = True
    policy.add_adapter(target, config)
    _disable_adapter_dropout(policy, target)
    if policy.active_adapter != source:
        policy.set_adapter(source)
    for name, p in policy.named_parameters():
        p.requires_grad_(trainable.get(name, False))
    with torch.no_grad():
        for teacher, student in _adapter_pairs(policy, source, target):
            teacher.data = student.data.detach().clone()


def _adapter_pairs(policy: nn.Module, source: str, target: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(target, source) parameter pairs of two adapters of a PEFT model, matched by name."""
    params = dict(policy.named_parameters())
    pairs = []
    for name, p in _adapter_named_parameters(policy, source):
        twin = ".".join(target if part == source else part for part in name.split("."))
        if twin not in params:
            raise ValueError(f"adapter {target!r} has no parameter matching {name}")
        pairs.append((params[twin], p))
    return pairs


def _adapter_named_parameters(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one adapter of a PEFT model. PEFT keys an adapter's weights by its name in a ModuleDict
    (`lora_A.<adapter>.weight`) or a ParameterDict (`lora_embedding_A.<adapter>`): one segment of the dotted name."""
    return [(name, p) for name, p in model.named_parameters() if adapter in name.split(".")]


def _without_dropout(config: Any) -> Any:
    """`config` (a PEFT adapter config) with every dropout rate set to 0 (`lora_dropout`, LoHa / LoKr's
    `rank_dropout` and `module_dropout`, ...): a teacher's scores must not be a random sample."""
    for field, value in list(vars(config).items()):
        if "dropout" in field and isinstance(value, float):
            setattr(config, field, 0.0)
    return config


def _disable_adapter_dropout(policy: nn.Module, adapter: str) -> None:
    """Zero every dropout module PEFT keyed by `adapter` (LoRA's `lora_dropout[adapter]`), whatever its config said."""
    for module in policy.modules():
        if isinstance(module, nn.ModuleDict) and adapter in module and isinstance(module[adapter], nn.Dropout):
            module[adapter].p = 0.0


@contextlib.contextmanager
def _adapter_active(model: nn.Module, adapter: str) -> Iterator[None]:
    """Activate `adapter` (frozen) for a forward; restore the previous adapter and every trainable flag after
    (PEFT's `set_adapter` marks the activated adapter trainable and the others frozen)."""
    previous = model.active_adapter
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in trainable:
            p.requires_grad_(flag)
