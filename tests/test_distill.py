"""Distillation losses against float64 references on random distributions; gradients reach the student only."""

from __future__ import annotations

import pytest
import torch

from rlsd.distill import (
    chunked_token_loss,
    generalized_jsd,
    sdpg_ref_penalty,
    student_top1_kl,
    teacher_top1_ce,
    topk_jsd,
)


def random_logits(seed: int = 0, shape=(2, 3, 11)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * 2


def kl(p_logits, q_logits):
    """KL(p || q) in float64, written out from the definition."""
    p = torch.softmax(p_logits, -1)
    return (p * (torch.log(p) - torch.log(torch.softmax(q_logits, -1)))).sum(-1)


def test_jsd_ends_are_forward_and_reverse_kl():
    student, teacher = random_logits(0), random_logits(1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), kl(teacher, student))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), kl(student, teacher))


def test_jsd_middle_matches_the_definition_and_is_symmetric_at_half():
    student, teacher = random_logits(2), random_logits(3)
    p_s, p_t = torch.softmax(student, -1), torch.softmax(teacher, -1)
    m = 0.3 * p_s + 0.7 * p_t
    expected = 0.3 * (p_t * (p_t / m).log()).sum(-1) + 0.7 * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.3), expected)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), generalized_jsd(teacher, student, 0.5))
    assert (generalized_jsd(student, teacher, 0.5) >= 0).all()
    assert generalized_jsd(student, student, 0.5).abs().max() < 1e-12


@pytest.mark.parametrize("loss", [generalized_jsd, teacher_top1_ce, student_top1_kl])
def test_gradient_flows_only_into_the_student(loss):
    student = random_logits(4).requires_grad_(True)
    teacher = random_logits(5).requires_grad_(True)
    loss(student, teacher).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_topk_with_all_tokens_equals_full_jsd_and_tail_carries_the_rest():
    student, teacher = random_logits(6), random_logits(7)
    torch.testing.assert_close(topk_jsd(student, teacher, k=11, tail=False), generalized_jsd(student, teacher))
    # k = 3 with a tail bucket: a 4-outcome distribution per token, reference built by hand.
    top = teacher.topk(3, -1).indices
    p_s, p_t = torch.softmax(student, -1).gather(-1, top), torch.softmax(teacher, -1).gather(-1, top)
    p_s = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    p_t = torch.cat([p_t, 1 - p_t.sum(-1, keepdim=True)], -1)
    expected = (p_t * (p_t / p_s).log()).sum(-1)
    torch.testing.assert_close(topk_jsd(student, teacher, k=3, beta=0.0, tail=True), expected)


def test_top1_variants():
    student = torch.tensor([[[2.0, 0.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0, 3.0, 0.0]]], dtype=torch.float64)
    log_s = torch.log_softmax(student, -1)[0, 0]
    log_t = torch.log_softmax(teacher, -1)[0, 0]
    assert teacher_top1_ce(student, teacher).item() == pytest.approx(-log_s[1].item())
    expected = log_s[0].exp() * (log_s[0] - log_t[0])
    assert student_top1_kl(student, teacher).item() == pytest.approx(expected.item())


def test_sdpg_reference_penalty():
    assert sdpg_ref_penalty(torch.tensor([-1.0]), torch.tensor([-1.5])).item() == pytest.approx(0.125)


def test_chunked_loss_equals_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, dtype=torch.float64)
    student_h, teacher_h = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    chunked = chunked_token_loss(generalized_jsd, student_h, teacher_h, head, head, chunk_tokens=3)
    torch.testing.assert_close(chunked, generalized_jsd(head(student_h), head(teacher_h)))


def test_chunked_loss_gradient_equals_unchunked_and_never_keeps_full_logits():
    """Chunks are recomputed in the backward pass: nothing of size (tokens, V) is saved for it."""
    torch.manual_seed(1)
    tokens, hidden, vocab, chunk = 40, 8, 1000, 4
    head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)
    student_h = torch.randn(1, tokens, hidden, dtype=torch.float64, requires_grad=True)
    teacher_h = torch.randn(1, tokens, hidden, dtype=torch.float64)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked = chunked_token_loss(generalized_jsd, student_h, teacher_h, head, head, chunk_tokens=chunk)
    assert max(saved) < chunk * vocab  # the whole logits would be tokens * vocab = 40000
    chunked.sum().backward()
    grad_chunked, head_grad_chunked = student_h.grad.clone(), head.weight.grad.clone()
    student_h.grad, head.weight.grad = None, None
    generalized_jsd(head(student_h), head(teacher_h)).sum().backward()
    torch.testing.assert_close(grad_chunked, student_h.grad)
    torch.testing.assert_close(head_grad_chunked, head.weight.grad)
