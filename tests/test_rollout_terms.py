"""The `@loss_term` registry of teacher-rollout terms (`rlsd.step.rollout_term`): a term registered in test code (after
`rlsd.config` is imported, as user code always is) with its own knob is configured by name, checked, trained with, and
its value pinned by a direct computation; unknown names, malformed classes and per-row violations are refused; its
tensors travel through `RLSDEntries.term` as `rlsd_term_<key>`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset, make_model

from rlsd.core.rules import Knob
from rlsd.infra.validate import ConfigError
from rlsd.step.batch import RLSDEntries
from rlsd.step.rollout_term import (
    TERMS,
    LossTerm,
    TeacherRollouts,
    TeacherSamples,
    TermRows,
    TermValue,
    get_loss_term,
    loss_term,
)


def logged(trainer, key: str) -> float:
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


def _positive(value: Any) -> str | None:
    return None if isinstance(value, float | int) and value > 0 else f"must be > 0, got {value!r}"


@pytest.fixture
def first_nll(registries):
    """A term declared here, as a user would: `test_nll_scale` * the token mean of -log pi(y | x) over the teacher's
    first trajectory y of each row's prompt (x the plain prompt), its coefficient defaulting to 0.5. It keeps what it
    added, so that the test can recompute its value."""

    @loss_term("test_first_nll", knobs={"test_nll_scale": Knob(2.0, "Scale of the test NLL.", _positive)},
               default_coef=0.5)  # fmt: skip
    class FirstTrajectoryNLL(LossTerm):
        """Scaled NLL of each prompt's first teacher trajectory (test only)."""

        def __init__(self, rollouts: TeacherRollouts, test_nll_scale: float) -> None:
            self.rollouts, self.scale = rollouts, test_nll_scale
            self.added: list[TeacherSamples] = []

        def add(self, samples: TeacherSamples, pass_logps: torch.Tensor | None) -> TermRows:
            self.added.append(samples)
            first = samples.row_prompt.to(samples.ids.device) * samples.n  # each row's prompt's first trajectory
            return TermRows({"ids": samples.ids[first], "mask": samples.mask[first]}, {"test_rows": len(first)})

        def term(self, model, inputs, values, student_logps) -> TermValue:
            ids, mask = values["ids"], values["mask"]
            input_ids = torch.cat([inputs["prompt_ids"], ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
            logps, _, _ = self.rollouts.trl_logps(model, input_ids, attention_mask, ids.size(1))
            tokens = mask.sum()
            return TermValue(-self.scale * (logps * mask).sum() / tokens.clamp(min=1), tokens.item(), {})

    return FirstTrajectoryNLL


def direct_nll(tokenizer, samples: TeacherSamples, temperature: float) -> float:
    """-log pi(y | x) token mean of the first prompt's first trajectory under the initial student (one prompt per
    batch: every row of the group carries the same pair), from a plain unpadded forward."""
    prompt = samples.plain[0][0][samples.plain[1][0].bool()]
    trajectory = samples.ids[0][samples.mask[0].bool()]
    with torch.no_grad():
        logits = make_model(tokenizer)(input_ids=torch.cat([prompt, trajectory]).unsqueeze(0)).logits[0]
    logps = torch.log_softmax(logits[prompt.size(0) - 1 : -1] / temperature, -1)
    return -logps.gather(-1, trajectory[:, None]).mean().item()


def test_a_term_registered_in_test_code_is_configured_by_name_and_trained_with(tokenizer, tmp_path, first_nll):
    config = make_config(tmp_path, teacher_rollout_loss="test_first_nll", test_nll_scale=3.0)
    assert config.teacher_rollout_coef == 0.5 and config.test_nll_scale == 3.0  # its declared default; a late knob
    assert make_config(tmp_path, teacher_rollout_loss="test_first_nll").test_nll_scale == 2.0
    with pytest.raises(ConfigError, match=r"--test_nll_scale.*must be > 0"):
        make_config(tmp_path, teacher_rollout_loss="test_first_nll", test_nll_scale=0.0)
    runs = {}
    for coef in (0.0, 0.5):
        trainer = build_trainer(tokenizer, tmp_path / str(coef), credit="grpo", teacher_rollouts=2,
                                teacher_rollout_loss="test_first_nll", teacher_rollout_coef=coef)  # fmt: skip
        assert isinstance(trainer.rollout_term.loss, first_nll) and trainer.rollout_term.loss.scale == 2.0
        trainer.train()
        runs[coef] = trainer
    on = runs[0.5]
    (samples,) = on.rollout_term.loss.added  # the one training rollout of the one step
    assert samples.n == 2 and samples.ids.size(0) == 2  # one prompt, N = 2 teacher trajectories
    expected = 2.0 * direct_nll(tokenizer, samples, on.temperature)
    assert logged(on, "rlsd/teacher_rollout_loss") == pytest.approx(expected, abs=1e-5)
    assert logged(on, "rlsd/test_rows") == 4
    # the same rollout (same seed) with the term weighted 0: TRL's loss alone; 0.5 * the term is what it adds
    assert logged(runs[0.0], "rlsd/teacher_rollout_loss") == pytest.approx(expected, abs=1e-5)
    assert logged(on, "loss") - logged(runs[0.0], "loss") == pytest.approx(0.5 * expected, abs=1e-5)


def test_an_unknown_term_is_refused_listing_the_registered_ones(tmp_path, first_nll):
    with pytest.raises(ConfigError, match=r"--teacher_rollout_loss.*'dpo'.*none, brts, pbsd, msd, test_first_nll"):
        make_config(tmp_path, teacher_rollout_loss="dpo")
    with pytest.raises(ValueError, match=r"unknown teacher-rollout term 'dpo'.*brts, pbsd, msd, test_first_nll"):
        get_loss_term("dpo")
    assert get_loss_term("test_first_nll").cls is first_nll


def test_the_registry_refuses_duplicates_incomplete_classes_and_shared_knobs(registries):
    class Complete(LossTerm):
        def add(self, samples, pass_logps):
            return TermRows({}, {})

        def term(self, model, inputs, values, student_logps):
            return TermValue(0.0, 0.0, {})

    for name in ("brts", "none"):
        with pytest.raises(ValueError, match="registered twice"):
            loss_term(name)(Complete)

    class NoTerm(LossTerm):
        def add(self, samples, pass_logps):
            return TermRows({}, {})

    with pytest.raises(TypeError, match=r"'test_no_term' does not define term"):
        loss_term("test_no_term")(NoTerm)

    class Unrelated:  # not a LossTerm subclass: the two checks must then be its own
        add = Complete.add
        term = Complete.term

    with pytest.raises(TypeError, match="does not define check_config, check_supported"):
        loss_term("test_unrelated")(Unrelated)
    with pytest.raises(ValueError, match=r"'distill_jsd_beta'.*already another extension's knob"):
        loss_term("test_shared", knobs={"distill_jsd_beta": Knob(0.5, "shared")})(Complete)
    with pytest.raises(ValueError, match=r"'pbsd_beta'.*differs from its earlier declaration"):
        loss_term("test_beta", knobs={"pbsd_beta": Knob(0.2, "another beta")})(Complete)
    assert "test_no_term" not in TERMS and "test_shared" not in TERMS and "test_beta" not in TERMS


def test_a_term_whose_tensors_are_not_per_row_is_named(tokenizer, tmp_path, registries):
    @loss_term("test_scalar")
    class Scalar(LossTerm):
        def __init__(self, rollouts: TeacherRollouts) -> None:
            pass

        def add(self, samples, pass_logps):
            return TermRows({"ids": samples.ids, "total": samples.mask.sum()}, {})

        def term(self, model, inputs, values, student_logps):
            return TermValue(0.0, 0.0, {})

    trainer = build_trainer(tokenizer, tmp_path, credit="grpo", teacher_rollouts=3, teacher_rollout_loss="test_scalar")
    trainer.model.train()
    with pytest.raises(ValueError, match=r"'test_scalar' returned 'ids' of shape \(3, \d+\).*first dimension of 4"):
        trainer._generate_and_score_completions([make_dataset()[0]] * 4)


def test_term_tensors_travel_as_rlsd_term_keys_and_back():
    ids, ref = torch.arange(6).view(2, 3), torch.tensor([0.5, -1.0])
    entries = RLSDEntries(term={"ids": ids, "ref_logps": ref}, lam=torch.tensor(0.5))
    batch = entries.to_batch()
    assert set(batch) == {"rlsd_term_ids", "rlsd_term_ref_logps", "rlsd_lam"}
    back = RLSDEntries.from_batch({**batch, "completion_ids": ids})
    assert set(back.term) == {"ids", "ref_logps"} and torch.equal(back.term["ids"], ids)
    assert torch.equal(back.term["ref_logps"], ref) and back.state_values == {} and back.teacher_types == {}
    assert RLSDEntries.from_batch({"completion_ids": ids}).term == {}
