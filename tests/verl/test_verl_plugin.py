"""The verl plug-in against verl 0.9.1 itself (`make test-verl`, in .venv-verl; skipped where verl is not installed):
`import verl` registers the loss `rlsd` through the entry point, verl's config selects it, and on micro-batches built
as verl builds them the token advantage of verl's update, A_i - loss_t, is the project's RLSD token advantage, in
value and in the gradient through verl's `distillation_ppo_loss`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the real verl (where tests/ is on sys.path, as under the main suite, this folder is a namespace package `verl`)
pytest.importorskip("verl.trainer.distillation.losses")

import torch
from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
    distillation_ppo_loss,
    get_distillation_loss_fn,
    get_distillation_loss_settings,
)
from verl.workers.utils.losses import ppo_loss
from verl_batches import VOCAB, Batch, build_batch, student_log_probs, verl_configs

from rlsd.core.credit import DEFAULT_RLSD_CLIP, DEFAULT_RLSD_LAMBDA, rlsd_advantages

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def configs():
    """verl's actor and distillation configs with `loss_mode=rlsd` (composed once: Hydra takes seconds)."""
    return verl_configs()


def tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A student and a teacher bigram logit table that disagree (so RLSD's weights differ from 1)."""
    generator = torch.Generator().manual_seed(100 + seed)
    student = torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float32)
    teacher = student + 0.5 * torch.randn(VOCAB, VOCAB, generator=generator)
    return student, teacher


def project_advantages(batch: Batch) -> torch.Tensor:
    """The project's RLSD token advantages of `batch` (lam and eps_w at `RLSDConfig`'s defaults)."""
    token_adv, _ = rlsd_advantages(
        batch.seq_advantages, batch.teacher_logps, batch.student_logps, batch.mask,
        lam=DEFAULT_RLSD_LAMBDA, clip=DEFAULT_RLSD_CLIP,
    )  # fmt: skip
    return token_adv


def test_import_verl_registers_rlsd_through_the_entry_point():
    assert "rlsd.engines.verl_plugin" in sys.modules  # loaded by `import verl`, not by this test
    assert DISTILLATION_LOSS_REGISTRY["rlsd"].__module__ == "rlsd.engines.verl_plugin"
    settings = get_distillation_loss_settings("rlsd")
    assert settings.use_estimator and not settings.use_topk


def test_verl_config_selects_rlsd_like_its_own_losses(configs):
    _, distillation = configs
    assert distillation.distillation_loss.loss_mode == "rlsd"
    assert distillation.distillation_loss.loss_settings.use_estimator
    assert (DEFAULT_RLSD_LAMBDA, DEFAULT_RLSD_CLIP) == (0.5, 0.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_implied_token_advantages_equal_the_projects_rlsd_credit(configs, seed):
    actor, distillation = configs
    student, teacher = tables(seed)
    batch = build_batch(student, teacher, seed=seed)
    losses, metrics = get_distillation_loss_fn("rlsd")(
        config=actor, distillation_config=distillation,
        model_output={"log_probs": student_log_probs(student, batch.data)}, data=batch.data,
    )  # fmt: skip
    implied = batch.data["advantages"].double() - losses.double()
    expected = project_advantages(batch)
    assert (implied - expected).abs().masked_select(batch.mask).max().item() <= TOLERANCE
    assert (losses.masked_select(~batch.mask) == 0).all()
    grpo = batch.seq_advantages.unsqueeze(1) * batch.mask
    assert (expected - grpo).abs().max().item() > 1e-2  # the teacher moved the credit: the check has teeth
    assert 0.0 < metrics["distillation/rlsd_clip_low_frac"] + metrics["distillation/rlsd_clip_high_frac"] < 1.0


def gradient(loss: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """d loss / d table."""
    (grad,) = torch.autograd.grad(loss, table)
    return grad


@pytest.mark.parametrize("seed", [0, 3])
def test_gradient_through_distillation_ppo_loss_is_rlsds(configs, seed):
    actor, distillation = configs
    student, teacher = tables(seed)
    batch = build_batch(student, teacher, seed=seed)
    table = student.clone().requires_grad_(True)
    loss, _ = distillation_ppo_loss(
        config=actor, distillation_config=distillation,
        model_output={"log_probs": student_log_probs(table, batch.data)}, data=batch.data,
    )  # fmt: skip
    through_verl = gradient(loss, table)

    expected = project_advantages(batch)
    rlsd_data = batch.data.clone()
    rlsd_data["advantages"] = expected.to(torch.float32)
    plain, _ = ppo_loss(actor, {"log_probs": student_log_probs(table, rlsd_data)}, rlsd_data)
    assert (through_verl - gradient(plain, table)).abs().max().item() <= TOLERANCE

    # by hand: on-policy (ratio 1), token-mean: loss = -sum_t A_it log p_t / N
    log_softmax = torch.log_softmax(table, dim=-1)
    logps = torch.stack([log_softmax[p, t] for p, t in _pairs(batch)]).view_as(expected)
    by_hand = -(expected.to(torch.float32) * logps * batch.mask).sum() / batch.mask.sum()
    assert (through_verl - gradient(by_hand, table)).abs().max().item() <= TOLERANCE
    assert through_verl.abs().max().item() > 1e-3


def _pairs(batch: Batch) -> list[tuple[int, int]]:
    """(previous token, token) of every (row, response position) in row-major order; (0, 0) past a response's end."""
    prompts, responses = batch.data["prompts"], batch.data["responses"]
    pairs = []
    for row in range(responses.size(0)):
        prompt = prompts[row][prompts[row] != 0]
        for k in range(responses.size(1)):
            if not batch.mask[row, k]:
                pairs.append((0, 0))
                continue
            previous = prompt[-1] if k == 0 else responses[row, k - 1]
            pairs.append((int(previous), int(responses[row, k])))
    return pairs


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("distillation.distillation_loss.use_policy_gradient=False", "use_policy_gradient"),
        ("distillation.distillation_loss.distillation_loss_coef=0.5", "distillation_loss_coef"),
        ("distillation.distillation_loss.loss_max_clamp=0.001", "loss_max_clamp"),
    ],
)
def test_settings_that_break_the_composition_are_refused_by_name(override, named):
    actor, distillation = verl_configs(override)
    student, teacher = tables(0)
    batch = build_batch(student, teacher)
    with pytest.raises(ValueError, match=named):
        get_distillation_loss_fn("rlsd")(
            config=actor, distillation_config=distillation,
            model_output={"log_probs": student_log_probs(student, batch.data)}, data=batch.data,
        )  # fmt: skip


def test_token_advantages_without_one_value_per_response_are_refused(configs):
    actor, distillation = configs
    student, teacher = tables(0)
    batch = build_batch(student, teacher)
    varying = batch.data["advantages"].clone()
    varying[0, 0] += 0.5
    batch.data["advantages"] = varying
    with pytest.raises(ValueError, match="one advantage per response"):
        get_distillation_loss_fn("rlsd")(
            config=actor, distillation_config=distillation,
            model_output={"log_probs": student_log_probs(student, batch.data)}, data=batch.data,
        )  # fmt: skip


def readme_command() -> list[str]:
    """The overrides of the README's one-node verl command (its "verl" section)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## verl\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    tokens = block.replace("\\\n", " ").split()
    assert tokens[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    return [token.replace("$HOME", "/home/user") for token in tokens[3:]]


def test_the_readme_command_composes_a_verl_config_that_runs_rlsd_exactly():
    from rlsd.engines.verl_plugin import check_composition

    actor, distillation = verl_configs(*readme_command())
    loss = distillation.distillation_loss
    assert (loss.loss_mode, loss.use_policy_gradient, loss.use_task_rewards) == ("rlsd", True, True)
    assert loss.loss_max_clamp is None and loss.distillation_loss_coef == 1.0
    assert actor.ppo_epochs == 1
    check_composition(actor, distillation)
