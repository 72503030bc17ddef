"""Distillation losses against float64 references on random distributions; gradients reach the student only."""

from __future__ import annotations

import functools

import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from rlsd.core.distill import (
    _with_tail,
    chunked_token_loss,
    generalized_jsd,
    mad_opd_token_loss,
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
    m = 0.7 * p_s + 0.3 * p_t  # GKD eq. 1 with P = p_T, Q = p_S: the mixture weighs the teacher by beta
    expected = 0.3 * (p_t * (p_t / m).log()).sum(-1) + 0.7 * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.3), expected)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), generalized_jsd(teacher, student, 0.5))
    assert (generalized_jsd(student, teacher, 0.5) >= 0).all()
    assert generalized_jsd(student, student, 0.5).abs().max() < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.25, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_gkd_in_value_and_student_gradient(beta):
    """Peer: TRL's `GKDTrainer.generalized_jsd_loss` at temperature 1 ("none": per vocabulary entry, summed here)."""
    student, teacher = random_logits(8), random_logits(9)
    ours_in, peer_in = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    ours = generalized_jsd(ours_in, teacher, beta=beta)
    peer = GKDTrainer.generalized_jsd_loss(peer_in, teacher, beta=beta, temperature=1.0, reduction="none").sum(-1)
    torch.testing.assert_close(ours, peer, rtol=1e-10, atol=1e-12)
    ours.sum().backward()
    GKDTrainer.generalized_jsd_loss(peer_in, teacher, beta=beta, temperature=1.0, reduction="sum").backward()
    torch.testing.assert_close(ours_in.grad, peer_in.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.25, 0.9])
def test_topk_jsd_and_mad_opd_use_trls_mixture(beta):
    """The top-k forms are TRL's JSD on the renormalized (or tail-bucketed) top-k distributions; MAD-OPD's term is
    the weighted sum of TRL's JSD per teacher."""
    student, teacher = random_logits(10), random_logits(11)

    def peer(s, t):
        return GKDTrainer.generalized_jsd_loss(s, t, beta=beta, reduction="none").sum(-1)

    top = teacher.topk(4, -1).indices
    renormalized = peer(student.gather(-1, top), teacher.gather(-1, top))  # log_softmax of the gathered logits
    torch.testing.assert_close(topk_jsd(student, teacher, k=4, beta=beta, tail=False), renormalized)
    bucket = [_with_tail(torch.log_softmax(x, -1).gather(-1, top)) for x in (student, teacher)]
    torch.testing.assert_close(topk_jsd(student, teacher, k=4, beta=beta, tail=True), peer(*bucket))
    teachers = torch.stack([teacher[0], random_logits(12)[0]])  # M = 2 teachers, N = 3 tokens
    ids = torch.tensor([0, 5, 9])
    loss, weights = mad_opd_token_loss(functools.partial(generalized_jsd, beta=beta), student[0], teachers, ids)
    expected = (weights * torch.stack([peer(student[0], t) for t in teachers])).sum(0)
    torch.testing.assert_close(loss, expected)


def test_jsd_near_the_ends_points_like_forward_and_reverse_kl():
    """GKD: JSD_beta / beta -> KL(p_T || p_S) as beta -> 0 and JSD_beta / (1 - beta) -> KL(p_S || p_T) as beta -> 1,
    in value and in the student's gradient (the swapped mixture tended to the opposite KL at each end)."""
    student, teacher = random_logits(13), random_logits(14)

    def value_and_grad(beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits = student.clone().requires_grad_(True)
        value = generalized_jsd(logits, teacher, beta=beta)
        value.sum().backward()
        return value.detach(), logits.grad

    forward, forward_grad = value_and_grad(0.0)
    reverse, reverse_grad = value_and_grad(1.0)
    for eps in (1e-4, 1e-6):
        near_0, near_0_grad = value_and_grad(eps)
        near_1, near_1_grad = value_and_grad(1.0 - eps)
        for scaled, limit in ((near_0, forward), (near_0_grad, forward_grad), (near_1, reverse),
                              (near_1_grad, reverse_grad)):  # fmt: skip
            # the next order of the expansion is O(eps): 100 * eps of the limit's scale (measured: below 50 * eps)
            torch.testing.assert_close(scaled / eps, limit, rtol=0, atol=100 * eps * limit.abs().max().item())


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
