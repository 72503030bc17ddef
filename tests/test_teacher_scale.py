"""The self-teacher at scale: checkpoints of an FSDP2-sharded teacher (two CPU processes), and a PEFT policy's
teacher kept as a second adapter on the same base instead of a copy of the whole model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, make_dataset, make_model

from rlsd.context.templates import render_teacher_prompts
from rlsd.teachers import TEACHER_ADAPTER, TEACHER_SHADOW_FILE, TEACHER_WEIGHTS_FILE, SelfTeacher

WORKER = Path(__file__).with_name("fsdp2_teacher_worker.py")
TEACHER_KW = dict(sync_steps=1, ema_decay=0.5, temperature=1.0)


def free_port() -> str:
    """A free local TCP port for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.slow
def test_fsdp2_teacher_checkpoint_gives_every_rank_its_own_shards(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), free_port()],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        assert report["shards_differ_across_ranks"], "the check would be vacuous: both ranks hold equal shards"
        assert report["saved_whole_tensors"], report
        assert report["weights_restored"], f"rank {rank} did not get its own teacher shards back"
        assert report["shadow_restored"], f"rank {rank} did not get its own EMA shadow shards back"


# ------------------------------------------------------------------------------------------------------- PEFT
def lora_policy(tokenizer, pretrained: bool, dtype: torch.dtype = torch.float32):
    """The tiny model with a LoRA adapter: fresh (B = 0, the base model) or `pretrained` (random B)."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    policy.to(dtype)
    if pretrained:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return policy


def adapter_params(policy, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter of a PEFT model, in order."""
    return [p for name, p in policy.named_parameters() if f".{adapter}." in name]


def move_policy_adapter(policy, scale: float = 0.1, seed: int = 2) -> None:
    """A stand-in optimizer step: add noise to the policy's ("default") adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(policy, "default"):
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


def logps(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `ids[1:]` under `model` (one unpadded row)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)


def teacher_logps(teacher: SelfTeacher, policy, ids: torch.Tensor) -> torch.Tensor:
    """Log-probs under the teacher, through its forward context."""
    with teacher.forward_context(policy, policy) as model:
        return logps(model, ids)


IDS = torch.tensor([[3, 10, 11, 12, 13, 14, 15]])


def test_peft_synced_teacher_is_an_adapter_not_a_model_copy(tokenizer):
    policy = lora_policy(tokenizer, pretrained=True)
    base_numel = sum(p.numel() for p in policy.parameters())
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    teacher = SelfTeacher("synced", policy, **TEACHER_KW)
    assert teacher.model is None and teacher.adapter_name == TEACHER_ADAPTER
    policy_adapter = sum(p.numel() for p in adapter_params(policy, "default"))
    assert sum(p.numel() for p in adapter_params(policy, TEACHER_ADAPTER)) == policy_adapter
    assert sum(p.numel() for p in policy.parameters()) == base_numel + policy_adapter  # no second base
    assert [name for name, p in policy.named_parameters() if p.requires_grad] == trainable  # teacher frozen
    assert policy.active_adapter == "default"


def test_peft_teacher_forward_restores_the_policy_adapter_and_trainable_flags(tokenizer):
    policy = lora_policy(tokenizer, pretrained=True)
    teacher = SelfTeacher("synced", policy, **TEACHER_KW)
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    move_policy_adapter(policy)
    teacher_logps(teacher, policy, IDS)
    assert policy.active_adapter == "default"
    assert {name: p.requires_grad for name, p in policy.named_parameters()} == flags


def test_peft_synced_teacher_scores_like_the_policy_after_a_sync(tokenizer):
    policy = lora_policy(tokenizer, pretrained=True)
    teacher = SelfTeacher("synced", policy, **TEACHER_KW)
    before = logps(policy, IDS)
    torch.testing.assert_close(teacher_logps(teacher, policy, IDS), before, rtol=0, atol=0)
    move_policy_adapter(policy)
    after = logps(policy, IDS)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(teacher_logps(teacher, policy, IDS), before, rtol=0, atol=0)  # not yet synced
    assert teacher.on_optimizer_step(1, policy)
    torch.testing.assert_close(teacher_logps(teacher, policy, IDS), after, rtol=0, atol=0)


def test_peft_initial_teacher_with_a_pretrained_adapter_is_the_starting_policy(tokenizer):
    policy = lora_policy(tokenizer, pretrained=True)
    teacher = SelfTeacher("initial", policy, **TEACHER_KW)
    assert not teacher.uses_disabled_adapter and teacher.model is None
    start = logps(policy, IDS)
    with policy.disable_adapter():
        base = logps(policy, IDS)
    assert not torch.allclose(start, base)
    torch.testing.assert_close(teacher_logps(teacher, policy, IDS), start, rtol=0, atol=0)
    move_policy_adapter(policy)
    assert not teacher.on_optimizer_step(1, policy)
    torch.testing.assert_close(teacher_logps(teacher, policy, IDS), start, rtol=0, atol=0)


def test_peft_initial_teacher_with_a_fresh_lora_disables_the_adapter(tokenizer):
    policy = lora_policy(tokenizer, pretrained=False)
    teacher = SelfTeacher("initial", policy, **TEACHER_KW)
    assert teacher.uses_disabled_adapter and teacher.adapter_name is None
    assert TEACHER_ADAPTER not in policy.peft_config and "rlsd_initial" not in policy.peft_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_ema_teacher_adapter_moves_as_exact_ema(tokenizer, dtype):
    policy = lora_policy(tokenizer, pretrained=True, dtype=dtype)
    decay = 0.75
    teacher = SelfTeacher("ema", policy, sync_steps=1, ema_decay=decay, temperature=1.0)
    expected = [p.detach().float().clone() for p in adapter_params(policy, "default")]
    for step in (1, 2, 3):
        move_policy_adapter(policy, seed=step)
        teacher.on_optimizer_step(step, policy)
        moved = adapter_params(policy, "default")
        expected = [decay * e + (1 - decay) * p.float() for e, p in zip(expected, moved, strict=True)]
    for ema, got in zip(expected, adapter_params(policy, TEACHER_ADAPTER), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ema.to(dtype).float(), rtol=0, atol=1e-6)
    if dtype == torch.bfloat16:  # the fp32 shadow holds the EMA itself
        for ema, shadow in zip(expected, teacher.shadow, strict=True):
            torch.testing.assert_close(shadow, ema, rtol=1e-6, atol=1e-7)


def test_peft_teacher_checkpoint_holds_only_the_adapter(tokenizer, tmp_path):
    policy = lora_policy(tokenizer, pretrained=True, dtype=torch.bfloat16)
    teacher = SelfTeacher("ema", policy, **TEACHER_KW)
    move_policy_adapter(policy)
    teacher.on_optimizer_step(1, policy)
    saved = [p.detach().clone() for p in adapter_params(policy, TEACHER_ADAPTER)]
    shadow = [s.clone() for s in teacher.shadow]
    teacher.save(str(tmp_path), lambda m: m)
    weights = torch.load(tmp_path / TEACHER_WEIGHTS_FILE, weights_only=True)
    assert all(f".{TEACHER_ADAPTER}." in name for name in weights)
    assert sum(w.numel() for w in weights.values()) == sum(p.numel() for p in adapter_params(policy, "default"))
    assert (tmp_path / TEACHER_SHADOW_FILE).exists()
    fresh = SelfTeacher("ema", lora_policy(tokenizer, pretrained=False, dtype=torch.bfloat16), **TEACHER_KW)
    fresh.load(str(tmp_path), lambda m: m)
    assert fresh.last_sync_step == 1
    for want, got in zip(saved, adapter_params(fresh._peft_policy, TEACHER_ADAPTER), strict=True):
        assert torch.equal(want, got)
    for want, got in zip(shadow, fresh.shadow, strict=True):
        assert torch.equal(want, got)


def trainer_logps(trainer, model) -> torch.Tensor:
    """Log-probs of a fixed completion after the first row's teacher prompt, through the trainer's scoring."""
    row = make_dataset()[0]
    prompt = render_teacher_prompts([row["prompt"]], trainer.args.teacher_template, {"answer": [row["solution"]]})
    prompt_ids = torch.tensor([trainer.processing_class(prompt[0])["input_ids"]])
    ids = torch.cat([prompt_ids, torch.tensor([[10, 11, 12]])], dim=1)
    return trainer._get_per_token_logps_and_entropies(model, ids, torch.ones_like(ids), 3)[0]


def test_peft_synced_teacher_in_the_trainer_follows_the_policy(tokenizer, tmp_path):
    policy = lora_policy(tokenizer, pretrained=True)
    trainer = build_trainer(tokenizer, tmp_path, model=policy, teacher="synced", teacher_sync_steps=1, max_steps=2)
    assert trainer.teacher.model is None and trainer.teacher.adapter_name == TEACHER_ADAPTER
    start = [p.detach().clone() for p in adapter_params(trainer.model, "default")]
    trainer.train()
    moved = adapter_params(trainer.model, "default")
    assert any(not torch.equal(a, b) for a, b in zip(start, moved, strict=True))
    for teacher_p, policy_p in zip(adapter_params(trainer.model, TEACHER_ADAPTER), moved, strict=True):
        assert torch.equal(teacher_p, policy_p)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with trainer.teacher.forward_context(trainer.model, unwrapped) as model:
        teacher = trainer_logps(trainer, model)
    torch.testing.assert_close(teacher, trainer_logps(trainer, trainer.model), rtol=0, atol=0)


def test_peft_resume_restores_the_teacher_adapter(tokenizer, tmp_path):
    # Synced at step 3 and saved with checkpoint-3; step 4 does not sync, so the final teacher adapter is the policy
    # adapter after step 3 only if resuming restored it (a fresh trainer's teacher adapter is the starting one).
    settings = dict(teacher="synced", teacher_sync_steps=3, max_steps=4, save_strategy="steps", save_steps=3)
    straight = build_trainer(tokenizer, tmp_path / "straight", model=lora_policy(tokenizer, True), **settings)
    straight.train()
    resumed = build_trainer(tokenizer, tmp_path / "resumed", model=lora_policy(tokenizer, True), **settings)
    final = adapter_params(straight.model, TEACHER_ADAPTER)
    start = adapter_params(resumed.model, TEACHER_ADAPTER)
    assert any(not torch.equal(a, b) for a, b in zip(start, final, strict=True))
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert resumed.teacher.last_sync_step == 3
    for got, want in zip(adapter_params(resumed.model, TEACHER_ADAPTER), final, strict=True):
        assert torch.equal(got, want)


def test_peft_initial_teachers_share_one_snapshot_and_use_trls_ref_adapter(tokenizer):
    policy = lora_policy(tokenizer, pretrained=True)
    first, second = (SelfTeacher("initial", policy, **TEACHER_KW) for _ in range(2))  # teacher and SDPG reference
    assert first.adapter_name == second.adapter_name == "rlsd_initial"
    assert sorted(policy.peft_config) == ["default", "rlsd_initial"]
    with pytest.raises(ValueError, match="already has an adapter"):
        SelfTeacher("synced", policy, **TEACHER_KW) and SelfTeacher("synced", policy, **TEACHER_KW)
    with_ref = lora_policy(tokenizer, pretrained=True)
    with_ref.add_adapter("ref", with_ref.peft_config["default"])  # as TRL's GRPOTrainer does with beta != 0
    assert SelfTeacher("initial", with_ref, **TEACHER_KW).adapter_name == "ref"
    assert sorted(with_ref.peft_config) == ["default", "ref"]
