"""A teacher's weights under distributed training: FSDP2 shards (DTensors) gathered into whole tensors to save and laid
out again to load, and the ZeRO-3 partitioning under which a copy of the policy is refused."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from trl.models.utils import prepare_deepspeed, prepare_fsdp


def place_frozen(model: nn.Module, accelerator: Accelerator, *, deepspeed: bool, fsdp: bool) -> nn.Module:
    """Place a no-grad copy the way TRL places its reference model (DeepSpeed, FSDP or plain device): the `place`
    callable of `build_teachers`."""
    if deepspeed:
        return prepare_deepspeed(model, accelerator)
    if fsdp:
        return prepare_fsdp(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


def _refuse_zero3_copy(mode: str, policy: nn.Module) -> None:
    """A copy (of the model or of an adapter) made from ZeRO-3 partitioned parameters would hold empty shards."""
    if is_zero3_partitioned(policy):
        raise ValueError(
            f"teacher={mode!r} keeps a copy of the policy, but the policy's parameters are ZeRO-3 partitioned "
            "(a copy would hold empty shards); use teacher='live' (no copy), a fresh LoRA policy with "
            "teacher='initial' (the adapter disabled, no copy), or ZeRO-2 / FSDP2"
        )


def _is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded the model (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a saved whole tensor) laid out like `param`: this process's shard of it when `param` is a DTensor
    (every process holds `full`, so no communication), else on `param`'s device, keeping `full`'s dtype."""
    if isinstance(param, DTensor):
        full = full.to(param.to_local().device)
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors: FSDP2 shards are gathered (a collective, the result on CPU and on
    rank 0 only); an unsharded model's own `state_dict()`."""
    if not _is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state_dict(model: nn.Module, path: str) -> None:
    """Load a whole-tensor state dict: into an FSDP2 model, rank 0 reads it and every rank keeps its own shard."""
    if not _is_sharded(model):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    first = torch.distributed.get_rank() == 0
    weights = torch.load(path, map_location="cpu", weights_only=True) if first else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters (`zero.Init` or `deepspeed.initialize`
    give each one `ds_id` / `ds_numel`, and leave its `.data` an empty shard holder)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in model.parameters())
