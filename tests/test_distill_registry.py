"""The `@distill_loss` registry and rule / loss knobs declared outside rlsd: a loss or credit rule registered in test
code (after `rlsd.config` is imported, as user code always is) with its own knob is configured, checked, staged, built
and trained with, its values pinned by hand."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, make_config

from rlsd import RLSDConfig
from rlsd.config import DISTILL_LOSSES
from rlsd.core.distill import distill_loss, generalized_jsd, token_loss_fn, topk_jsd
from rlsd.core.rules import Knob, Signals, credit_rule, get_rule, rule_params
from rlsd.core.stages import STAGE_FIELDS
from rlsd.infra.validate import ConfigError
from rlsd.step.batch import scalar


def logits(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((2, 3, 11), generator=generator, dtype=torch.float64) * 2


def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) per token, written out from the definition."""
    p_t = torch.softmax(teacher, -1)
    return (p_t * (p_t.log() - torch.log_softmax(student, -1))).sum(-1)


def _positive(value: float) -> str | None:
    return None if isinstance(value, float | int) and value > 0 else f"must be > 0, got {value!r}"


@pytest.fixture
def scaled_kl(registries):
    """A loss declared here, as a user would: `test_kl_scale` * KL(p_T || p_S), its own coefficient default 0.25."""

    @distill_loss("test_scaled_kl", knobs={"test_kl_scale": Knob(2.0, "Scale of the test KL.", _positive)},
                  default_coef=0.25)  # fmt: skip
    def build(test_kl_scale: float):
        """A scaled forward KL (test only)."""
        return lambda student, teacher: test_kl_scale * generalized_jsd(student, teacher, beta=0.0)

    return build


@pytest.fixture
def shifted_rule(registries):
    """A credit rule declared here with a knob: A_it = (A_i + test_shift_scale * (tau_t - s_t)) * mask."""

    @credit_rule("test_shifted", source="test", exact=True, multiplicative=False,
                 knobs={"test_shift_scale": Knob(1.0, "Weight of Delta in the test rule.", _positive)})  # fmt: skip
    def shifted(signals: Signals, params) -> tuple[torch.Tensor, dict[str, float]]:
        delta = (signals.teacher_logps - signals.student_logps).double()
        advantages = signals.seq_advantages.double().unsqueeze(1) + params.test_shift_scale * delta
        return advantages * signals.mask, {}

    return shifted


SEQ_ADVANTAGES = torch.tensor([1.0, -0.5], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
TAU = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0]], dtype=torch.float64)
S = torch.tensor([[-1.5, -1.0, -2.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)


# --------------------------------------------------------------------------------------------- built-in losses
def test_the_config_is_derived_from_the_registry_with_the_same_fields_and_defaults(tmp_path):
    # the project's own losses (rlsd.core.distill), then the family's (rlsd.core.family_losses)
    assert DISTILL_LOSSES[:7] == ("none", "jsd", "topk_jsd", "teacher_top1", "student_top1", "sdpg", "sdar")
    assert "msd" in DISTILL_LOSSES[7:] and "trace" in DISTILL_LOSSES[7:]
    fields = {item.name: item for item in dataclasses.fields(RLSDConfig)}
    assert [(fields[k].type, fields[k].default) for k in ("distill_jsd_beta", "distill_topk", "distill_tail")] == [
        (float, 0.5), (int, 100), (bool, True)
    ]  # fmt: skip
    assert {"distill_jsd_beta", "distill_topk", "distill_tail"} <= set(STAGE_FIELDS)
    assert make_config(tmp_path, distill_loss="sdpg").distill_coef == 0.001
    assert make_config(tmp_path, distill_loss="topk_jsd").distill_coef == 1.0


def test_token_loss_fn_reads_the_knobs_from_the_config_and_keywords(tmp_path):
    student, teacher = logits(0), logits(1)
    config = make_config(tmp_path, distill_loss="topk_jsd", distill_topk=3, distill_tail=False, distill_jsd_beta=0.25)
    expected = topk_jsd(student, teacher, k=3, beta=0.25, tail=False)
    torch.testing.assert_close(token_loss_fn("topk_jsd", config)(student, teacher), expected)
    assert not torch.allclose(expected, topk_jsd(student, teacher, k=3))  # the knobs matter here
    # keywords (by field name) over the config; an object without the knobs reads their defaults
    torch.testing.assert_close(token_loss_fn("jsd", config, distill_jsd_beta=0.0)(student, teacher),
                               forward_kl(student, teacher))  # fmt: skip
    torch.testing.assert_close(token_loss_fn("jsd", SimpleNamespace())(student, teacher),
                               generalized_jsd(student, teacher, beta=0.5))  # fmt: skip
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'; the known ones are jsd, topk_jsd"):
        token_loss_fn("kl", config)
    with pytest.raises(TypeError, match=r"unknown distillation knob\(s\) \['beta'\]"):
        token_loss_fn("jsd", beta=0.3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distill_jsd_beta": 1.5}, r"^distill_jsd_beta must lie in \[0, 1\], got 1\.5$"),
        ({"distill_topk": 0}, r"^distill_topk must be an integer >= 1, got 0$"),
        ({"distill_tail": "yes"}, r"^distill_tail must be true or false, got 'yes'$"),
        ({"distill_chunk_tokens": 0}, r"^distill_chunk_tokens must be >= 1, got 0$"),
        ({"distill_loss": "kl"}, r"^distill_loss='kl' is not one of none, jsd, topk_jsd, .*sdpg, sdar, .*msd\b"),
    ],
)
def test_bad_distillation_values_are_refused_by_their_declared_checks(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


# ------------------------------------------------------------------------------------- declared outside rlsd
def test_a_loss_declared_outside_rlsd_is_configured_checked_and_staged(tmp_path, scaled_kl):
    student, teacher = logits(2), logits(3)
    config = make_config(tmp_path, distill_loss="test_scaled_kl", test_kl_scale=3.0)
    assert config.test_kl_scale == 3.0 and config.distill_coef == 0.25  # the declared coefficient default
    torch.testing.assert_close(token_loss_fn(config.distill_loss, config)(student, teacher),
                               3.0 * forward_kl(student, teacher))  # fmt: skip
    default = make_config(tmp_path, distill_loss="test_scaled_kl")  # not given: the declared default, 2.0
    assert default.test_kl_scale == 2.0
    torch.testing.assert_close(token_loss_fn("test_scaled_kl", default)(student, teacher),
                               2.0 * forward_kl(student, teacher))  # fmt: skip
    with pytest.raises(ValueError, match=r"^test_kl_scale must be > 0, got -1\.0$"):
        make_config(tmp_path, distill_loss="test_scaled_kl", test_kl_scale=-1.0)
    # a stage may set the knob, and gets the loss's default coefficient; its check applies there too
    assert "test_kl_scale" in STAGE_FIELDS
    staged = make_config(tmp_path, stages=[{"until_step": 1, "distill_loss": "test_scaled_kl", "test_kl_scale": 5.0}])
    assert staged.stages[0]["distill_coef"] == 0.25
    with pytest.raises(ConfigError, match=r"--stages\[0\]\.test_kl_scale: must be > 0, got 0"):
        make_config(tmp_path, stages=[{"until_step": 1, "test_kl_scale": 0}])


def test_a_rule_declared_outside_rlsd_computes_credit_through_rule_params(tmp_path, shifted_rule):
    config = make_config(tmp_path, credit="test_shifted", test_shift_scale=3.0)
    signals = Signals(seq_advantages=SEQ_ADVANTAGES, mask=MASK, teacher_logps=TAU, student_logps=S)
    advantages, _ = get_rule("test_shifted").fn(signals, rule_params(config, lam=0.5))
    # A_i + 3 * (tau - s) on the mask: 1 + 3 * 0.5, 1 + 3 * (-1); -0.5 + 3 * 0.5
    torch.testing.assert_close(advantages, torch.tensor([[2.5, -2.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    # the audit's failure: a run with another rule (or any object without the knob) read every knob and raised
    assert rule_params(make_config(tmp_path), lam=0.5).test_shift_scale == 1.0
    assert rule_params(SimpleNamespace(rlsd_clip=0.2, rlsd_negative_only=False)).test_shift_scale == 1.0
    with pytest.raises(ValueError, match=r"^test_shift_scale must be > 0, got -1\.0$"):
        make_config(tmp_path, credit="test_shifted", test_shift_scale=-1.0)


def test_a_trainer_trains_with_a_rule_and_a_loss_declared_outside_rlsd(tokenizer, tmp_path, scaled_kl, shifted_rule):
    trainer = build_trainer(tokenizer, tmp_path, credit="test_shifted", test_shift_scale=3.0,
                            distill_loss="test_scaled_kl", test_kl_scale=3.0)  # fmt: skip
    student, teacher = logits(4), logits(5)
    torch.testing.assert_close(trainer.plan.distill_fn(student, teacher), 3.0 * forward_kl(student, teacher))
    batch = {
        "completion_ids": torch.zeros_like(MASK),
        "completion_mask": MASK,
        "rlsd_seq_advantages": SEQ_ADVANTAGES,
        "rlsd_teacher_logps": TAU,
        "rlsd_has_context": torch.tensor([True, False]),  # row 1 has no context: its teacher is the student
        "rlsd_lam": scalar(0.5),
    }
    expected = torch.tensor([[2.5, -2.0, 0.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(trainer.token_advantages(batch, S), expected)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rlsd/distill_loss" in entry]
    assert logged and all(math.isfinite(entry["loss"]) and entry["rlsd/distill_loss"] > 0 for entry in logged)
