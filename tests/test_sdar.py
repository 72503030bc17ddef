"""SDAR (`distill_loss="sdar"`, method `sdar`): L = L_GRPO + c * mean_t(sg(sigmoid(beta * Delta_t)) * Delta_t) with
Delta_t = tau_t - s_t on the sampled tokens, the gate and the teacher detached; c = 0.1 and beta = 5.0 by default
(ms-swift 4.6's documented reference value and its gate default). Pinned by hand on a 2x3 case, and in a trainer
against a reference written from two plain forwards."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset
from trl import GRPOTrainer

from rlsd.core.distill import SampledTokenLoss, chunked_token_loss, sdar_token_loss, token_loss_fn
from rlsd.experiments.methods import CATALOGUE

A = math.log(3.0) / 5.0  # sigmoid(5 * A) = 3/4, sigmoid(5 * 2A) = 9/10
S = torch.tensor([[-1.0, -0.5, -2.0], [-1.5, -0.2, -0.7]], dtype=torch.float64)
DELTA = torch.tensor([[A, 0.0, -A], [2 * A, -2 * A, 5.0]], dtype=torch.float64)  # the last token is masked
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


def zero_reward(completions, **kwargs):
    """No completion is ever rewarded: every GRPO advantage is 0."""
    return [0.0] * len(completions)


def rollout(trainer):
    """One group on the first dataset row, in training mode, as the loss receives it."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer._generate_and_score_completions([make_dataset()[0]] * trainer.num_generations)


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """log p(y_t) of the sampled tokens from one plain forward over the whole (B, T, V) logits (the reference)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    logits = logits[:, -completion_ids.size(1) - 1 : -1].double() / temperature
    return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------------ the formula
def test_sdar_loss_and_its_gradient_by_hand():
    student = S.clone().requires_grad_()
    teacher = (S + DELTA).requires_grad_()  # a teacher that asked for gradient gets none
    per_token = sdar_token_loss(student, teacher, beta=5.0)
    loss = 0.1 * (per_token * MASK).sum() / MASK.sum()
    # gates 3/4, 1/2, 1/4 and 9/10, 1/10: (0.75 A + 0 - 0.25 A + 1.8 A - 0.2 A) / 5 = 0.42 A, times c = 0.1
    torch.testing.assert_close(per_token[0], torch.tensor([0.75 * A, 0.0, -0.25 * A], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.042 * A, rel=1e-12)
    loss.backward()
    # the gate is a constant: d/ds_t = -c * g_t / N (a gate with gradient adds -c * beta g (1 - g) Delta / N)
    expected = -0.1 * torch.tensor([[0.75, 0.5, 0.25], [0.9, 0.1, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(student.grad, expected, rtol=1e-12, atol=1e-15)
    assert teacher.grad is None


def test_the_registered_loss_reads_the_sampled_tokens_through_the_chunked_kernel():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn((2, 3, 7), generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn((2, 3, 7), generator=generator, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 6, 2], [3, 3, 5]])
    loss_fn = token_loss_fn("sdar", sdar_gate_beta=2.0)
    assert isinstance(loss_fn, SampledTokenLoss)
    log_s = student.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    log_t = teacher.detach().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    expected = torch.sigmoid(2.0 * (log_t - log_s).detach()) * (log_t - log_s)
    torch.testing.assert_close(loss_fn(student, teacher, ids), expected)
    # chunks of 4 of the 6 positions, checkpointed: each chunk reads its own sampled ids
    identity = lambda hidden: hidden  # noqa: E731
    chunked = chunked_token_loss(loss_fn, student, teacher, identity, identity, chunk_tokens=4, sampled_ids=ids)
    torch.testing.assert_close(chunked, expected)
    chunked.sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reads the sampled tokens"):
        loss_fn(student, teacher)


def test_sdar_defaults_knob_and_method(tmp_path):
    config = make_config(tmp_path, distill_loss="sdar")
    assert (config.distill_coef, config.sdar_gate_beta) == (0.1, 5.0)
    assert CATALOGUE["sdar"] == {"credit": "grpo", "distill_loss": "sdar", "teacher": "live"}
    for bad in (0.0, -1.0, True):
        with pytest.raises(ValueError, match=r"^sdar_gate_beta must be a finite number > 0, got "):
            make_config(tmp_path, distill_loss="sdar", sdar_gate_beta=bad)
    with pytest.raises(ValueError, match=r"sdar_gate_beta: must be a finite number, got inf"):
        make_config(tmp_path, distill_loss="sdar", sdar_gate_beta=math.inf)


# ------------------------------------------------------------------------------------------------ in a trainer
def test_sdar_trains_when_no_completion_is_rewarded(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, **CATALOGUE["sdar"])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/distill_loss" in entry]
    assert log["reward"] == 0.0 and log["reward_std"] == 0.0  # all advantages 0: GRPO's loss and gradient are 0
    assert log["rlsd/distill_loss"] != 0.0 and log["loss"] == pytest.approx(0.1 * log["rlsd/distill_loss"], abs=1e-4)
    assert log["grad_norm"] > 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_sdar_is_grpo_plus_c_times_the_gated_mean_and_grpo_at_c_zero(tokenizer, tmp_path):
    sdar = build_trainer(tokenizer, tmp_path / "sdar", temperature=0.7, **CATALOGUE["sdar"])
    off = build_trainer(tokenizer, tmp_path / "off", temperature=0.7, distill_coef=0.0, **CATALOGUE["sdar"])
    batch = rollout(sdar)
    off.model.train()
    off.current_gradient_accumulation_steps = 1
    assert batch["advantages"].abs().sum() > 0  # the parity reward splits the group: GRPO's loss is not 0

    def loss_and_grads(trainer, loss_fn):
        trainer.model.zero_grad()
        loss = loss_fn(trainer.model)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainer.model.parameters()]

    def reference(model):
        """TRL's GRPO loss + 0.1 * the token mean of sg(sigmoid(5 Delta)) Delta, from plain forwards."""
        completion = (batch["completion_ids"], batch["completion_mask"])
        student = completion_logps(model, batch["prompt_ids"], batch["prompt_mask"], *completion, 0.7)
        with torch.no_grad():  # the live teacher: the same weights, shown the answer
            teacher_prompt = (batch["rlsd_teacher_prompt_ids"], batch["rlsd_teacher_prompt_mask"])
            teacher = completion_logps(model, *teacher_prompt, *completion, 0.7)
        delta, mask = teacher - student, batch["completion_mask"].double()
        gated = (torch.sigmoid(5.0 * delta).detach() * delta * mask).sum() / mask.sum()
        assert gated.item() != 0.0
        return GRPOTrainer._compute_loss(sdar, model, batch) + 0.1 * gated

    ours, grads = loss_and_grads(sdar, lambda model: sdar._compute_loss(model, batch))
    expected, expected_grads = loss_and_grads(sdar, reference)
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for (name, _), grad, want in zip(sdar.model.named_parameters(), grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want.to(grad.dtype), rtol=1e-4, atol=1e-6, msg=name)
    # c = 0: exactly TRL's GRPO loss and gradient (same weights, same batch)
    zero, zero_grads = loss_and_grads(off, lambda model: off._compute_loss(model, batch))
    grpo, grpo_grads = loss_and_grads(off, lambda model: GRPOTrainer._compute_loss(off, model, batch))
    assert zero == pytest.approx(grpo, rel=1e-6, abs=1e-9) and abs(ours - grpo) > 1e-6
    for grad, want in zip(zero_grads, grpo_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-8)
