"""A PEFT policy's teacher adapter (`rlsd_teacher`, `rlsd_initial`) scores without dropout, and carries every
parameter of the policy's adapter, the embedding's LoRA (PEFT ParameterDicts) included."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch import nn

from rlsd.teachers import (
    INITIAL_ADAPTER,
    TEACHER_ADAPTER,
    TEACHER_WEIGHTS_FILE,
    SelfTeacher,
    _disable_adapter_dropout,
)

IDS = torch.tensor([[3, 10, 11, 12, 13, 14, 15]])
WITH_EMBEDDING = ["q_proj", "v_proj", "embed_tokens"]
EMBEDDING_PARAMS = ("lora_embedding_A", "lora_embedding_B")


def lora_policy(tokenizer, targets: list[str], *, dropout: float = 0.0, pretrained: bool = True) -> nn.Module:
    """The tiny model with a LoRA adapter on `targets`: `pretrained` gives every factor random values (a non-zero
    delta), else PEFT's fresh init (linear B = 0, embedding A = 0: the base model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=targets, lora_dropout=dropout, init_lora_weights=not pretrained)
    return get_peft_model(make_model(tokenizer), config)


def logps(model: nn.Module) -> torch.Tensor:
    """Per-token log-probs of `IDS[1:]` under `model`, in whatever mode (train / eval) the model is."""
    with torch.no_grad():
        logits = model(input_ids=IDS).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, IDS[0, 1:].unsqueeze(1)).squeeze(1)


def teacher_logps(teacher: SelfTeacher, policy: nn.Module) -> torch.Tensor:
    """Log-probs under the teacher, through its forward context."""
    with teacher.forward_context(policy, policy) as model:
        return logps(model)


def embedding_lora(policy: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The embedding's LoRA parameters of `adapter`, by their container's name (lora_embedding_A / _B)."""
    embedding = policy.get_base_model().model.embed_tokens
    return {name: getattr(embedding, name)[adapter] for name in EMBEDDING_PARAMS}


def move_policy_adapter(policy: nn.Module, seed: int = 2) -> None:
    """A stand-in optimizer step on every parameter of the policy's ("default") adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "default" in name.split("."):
                p.add_(0.3 * torch.randn(p.shape, generator=generator))


# --------------------------------------------------------------------------------------------------- dropout (N2)
@pytest.mark.parametrize("mode", ["synced", "ema", "initial"])
def test_teacher_adapter_scores_without_dropout_while_the_policy_trains(tokenizer, mode):
    policy = lora_policy(tokenizer, ["q_proj", "v_proj"], dropout=0.5)
    policy.eval()
    deterministic = logps(policy)
    teacher = SelfTeacher(mode, policy, sync_steps=1, ema_decay=0.5, temperature=1.0)
    adapter = INITIAL_ADAPTER if mode == "initial" else TEACHER_ADAPTER
    assert teacher.adapter_name == adapter
    policy.train()  # training rollouts score the teacher with the policy in train mode
    first, second = teacher_logps(teacher, policy), teacher_logps(teacher, policy)
    torch.testing.assert_close(first, deterministic, rtol=0, atol=1e-6)  # teacher == policy at step 1: Delta = 0
    torch.testing.assert_close(second, deterministic, rtol=0, atol=1e-6)
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj
    assert policy.peft_config[adapter].lora_dropout == 0.0 and not isinstance(q_proj.lora_dropout[adapter], nn.Dropout)
    # the policy's own adapter keeps its dropout (TRL's disable_dropout decides it), so the check above is not vacuous
    assert policy.peft_config["default"].lora_dropout == 0.5 and q_proj.lora_dropout["default"].p == 0.5
    assert not torch.allclose(logps(policy), deterministic)


def test_disabling_an_adapters_dropout_leaves_the_other_adapters_dropout(tokenizer):
    from peft import LoraConfig

    policy = lora_policy(tokenizer, ["q_proj", "v_proj"], dropout=0.5)
    policy.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.25))
    _disable_adapter_dropout(policy, "other")
    rates = {
        (name.rsplit(".", 1)[-1], type(module).__name__, getattr(module, "p", None))
        for name, module in policy.named_modules()
        if ".lora_dropout." in name
    }
    assert rates == {("default", "Dropout", 0.5), ("other", "Dropout", 0.0)}


# ------------------------------------------------------------------------------------------- embedding LoRA (N4)
def test_synced_teacher_carries_the_embedding_lora_at_construction_and_after_a_sync(tokenizer):
    policy = lora_policy(tokenizer, WITH_EMBEDDING)
    teacher = SelfTeacher("synced", policy, sync_steps=1, ema_decay=0.5, temperature=1.0)
    before = logps(policy)
    torch.testing.assert_close(teacher_logps(teacher, policy), before, rtol=0, atol=0)
    policy_adapter = [name for name, _ in policy.named_parameters() if "default" in name.split(".")]
    assert len(teacher.adapter_pairs(policy)) == len(policy_adapter) == 10  # 2 layers x (q, v) x (A, B) + (A, B)
    for name, p in embedding_lora(policy, TEACHER_ADAPTER).items():
        assert torch.equal(p, embedding_lora(policy, "default")[name]) and not p.requires_grad
    move_policy_adapter(policy)
    after = logps(policy)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(teacher_logps(teacher, policy), before, rtol=0, atol=0)  # not yet synced
    assert teacher.on_optimizer_step(1, policy)
    torch.testing.assert_close(teacher_logps(teacher, policy), after, rtol=0, atol=0)


def test_ema_teacher_moves_the_embedding_lora(tokenizer):
    policy = lora_policy(tokenizer, WITH_EMBEDDING)
    policy_embedding = embedding_lora(policy, "default")
    with torch.no_grad():
        for p in policy_embedding.values():
            p.fill_(1.0)
    teacher = SelfTeacher("ema", policy, sync_steps=1, ema_decay=0.75, temperature=1.0)
    with torch.no_grad():
        for p in policy_embedding.values():
            p.fill_(3.0)
    teacher.on_optimizer_step(1, policy)
    for p in embedding_lora(policy, TEACHER_ADAPTER).values():  # 0.75 * 1 + 0.25 * 3
        torch.testing.assert_close(p, torch.full_like(p, 1.5), rtol=0, atol=0)


def test_teacher_checkpoint_round_trips_the_embedding_lora(tokenizer, tmp_path):
    policy = lora_policy(tokenizer, WITH_EMBEDDING)
    teacher = SelfTeacher("synced", policy, sync_steps=1, ema_decay=0.5, temperature=1.0)
    move_policy_adapter(policy)
    teacher.on_optimizer_step(1, policy)
    saved = {name: p.detach().clone() for name, p in embedding_lora(policy, TEACHER_ADAPTER).items()}
    teacher.save(str(tmp_path), lambda m: m)
    weights = torch.load(tmp_path / TEACHER_WEIGHTS_FILE, weights_only=True)
    assert {name.rsplit(".", 2)[-2] for name in weights if "embed_tokens" in name} == set(EMBEDDING_PARAMS)
    fresh_policy = lora_policy(tokenizer, WITH_EMBEDDING, pretrained=False)
    fresh = SelfTeacher("synced", fresh_policy, sync_steps=1, ema_decay=0.5, temperature=1.0)
    fresh.load(str(tmp_path), lambda m: m)
    for name, p in embedding_lora(fresh_policy, TEACHER_ADAPTER).items():
        assert torch.equal(p, saved[name])
    torch.testing.assert_close(teacher_logps(fresh, fresh_policy), teacher_logps(teacher, policy), rtol=0, atol=0)


def test_initial_teacher_sees_a_trained_embedding_lora_as_no_identity(tokenizer):
    fresh = lora_policy(tokenizer, WITH_EMBEDDING, pretrained=False)  # embedding A = 0, B random: still the base
    assert SelfTeacher("initial", fresh, sync_steps=1, ema_decay=0.5, temperature=1.0).uses_disabled_adapter
    policy = lora_policy(tokenizer, WITH_EMBEDDING, pretrained=False)
    with torch.no_grad():  # only the embedding's LoRA moved away from the base (every linear B is still 0)
        embedding_lora(policy, "default")["lora_embedding_A"].fill_(0.5)
    start = logps(policy)
    with policy.disable_adapter():
        assert not torch.allclose(logps(policy), start)
    teacher = SelfTeacher("initial", policy, sync_steps=1, ema_decay=0.5, temperature=1.0)
    assert not teacher.uses_disabled_adapter and teacher.adapter_name == INITIAL_ADAPTER
    move_policy_adapter(policy)
    torch.testing.assert_close(teacher_logps(teacher, policy), start, rtol=0, atol=0)
