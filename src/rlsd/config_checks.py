"""The checks that `RLSDConfig.__post_init__` runs: each value, and each combination of fields, that no run can use is
refused at construction with the flag to change, and the defaults that depend on other fields are filled in. Every
check takes the config itself (this module never imports `rlsd.config`, which imports it)."""

from __future__ import annotations

import json
from typing import Any

from rlsd.context.sources import SOURCE_KNOBS, get_source, validate_teacher_template
from rlsd.context.transforms import get_transform
from rlsd.core.distill import LOSS_KNOBS, LOSSES, MAD_CONFIDENCES
from rlsd.core.rules import RULES, check_knobs, check_rule_options
from rlsd.core.srpo_rule import check_srpo_config
from rlsd.core.stages import STAGE_FIELDS, check_stages, parse_stages, reachable, stage_values
from rlsd.engines.vllm_cpu import check_vllm_config
from rlsd.engines.vllm_teacher import check_served_teacher
from rlsd.infra.validate import ConfigError, check_finite_floats, check_positive
from rlsd.step.rollout_term import TERM_KNOBS, TERMS
from rlsd.teachers import DEFAULT_TEACHER, EXTERNAL_TEACHER, NPO_KNOBS, TEACHER_KINDS, teacher_modes

SPANS = ("all", "think")
"""`rlsd_span`'s values (its command-line choices in `rlsd.config`, and what the check accepts)."""
POSITIVE_FIELDS = ("max_completion_length", "num_generations", "per_device_train_batch_size")
"""Counts that must be >= 1 (checked up front: 0 fails deep inside TRL or generation otherwise)."""


def _distill_losses() -> tuple[str, ...]:
    """`distill_loss`'s values now: "none" and every registered loss (also those registered after this import)."""
    return ("none", *LOSSES)


def _distill_coef_default(loss: str) -> float:
    """`distill_coef` when left unset: the loss's declared default (SDPG's beta = 0.001; 1.0 for the others)."""
    return LOSSES[loss].default_coef if loss in LOSSES else 1.0


def _rollout_losses() -> tuple[str, ...]:
    """`teacher_rollout_loss`'s values now: "none" and every registered term (also those registered after this
    import)."""
    return ("none", *TERMS)


def check_numbers(config: Any) -> None:
    """Every float finite, the counts >= 1, `reward_timeout` >= 0: checked before `GRPOConfig`'s own checks."""
    check_finite_floats(config)  # a NaN / inf knob is named by its flag here, not found as a NaN model later
    check_positive({f"--{name}": getattr(config, name) for name in POSITIVE_FIELDS})
    if config.reward_timeout < 0:
        raise ConfigError("--reward_timeout", f"must be >= 0, got {config.reward_timeout}", "0 means no bound")


def check_fields(config: Any) -> None:
    """Every RLSD field checked after `GRPOConfig`'s own checks, alone and against the others, and the defaults
    that depend on other fields filled in (`distill_coef`, `teacher_template`, `teacher_rollout_coef`, ...)."""
    if config.credit not in RULES:
        raise ValueError(f"credit={config.credit!r} is not one of {', '.join(RULES)}")
    if config.rlsd_span not in SPANS:
        raise ValueError(f"rlsd_span={config.rlsd_span!r} is not one of {', '.join(SPANS)}")
    check_rule_options(config.credit, negative_only=config.rlsd_negative_only, span=config.rlsd_span != "all")
    check_knobs(config)
    check_knobs(config, LOSS_KNOBS)
    check_knobs(config, SOURCE_KNOBS)
    check_knobs(config, NPO_KNOBS)
    if getattr(config, "npo_trigger", "none") != "none" and config.teacher != "near_future":
        raise ConfigError("--npo_trigger", f"is {config.npo_trigger!r} but teacher={config.teacher!r}",
                          "set teacher='near_future' (NPO's guide)")  # fmt: skip
    _check_teacher_model(config)
    if not 0.0 <= config.rlsd_lambda <= 1.0:
        raise ValueError(f"rlsd_lambda must lie in [0, 1], got {config.rlsd_lambda}")
    if not 0.0 <= config.rlsd_clip < 1.0:
        raise ValueError(f"rlsd_clip must lie in [0, 1), got {config.rlsd_clip}")
    if config.rlsd_lambda_warmup_steps < 0 or config.rlsd_lambda_decay_steps < 0:
        raise ValueError("rlsd_lambda_warmup_steps and rlsd_lambda_decay_steps must be >= 0")
    if config.teacher_sync_steps < 1:
        raise ValueError(f"teacher_sync_steps must be >= 1, got {config.teacher_sync_steps}")
    if not 0.0 <= config.teacher_ema_decay < 1.0:
        raise ValueError(f"teacher_ema_decay must lie in [0, 1), got {config.teacher_ema_decay}")
    if config.distill_loss not in _distill_losses():
        raise ValueError(f"distill_loss={config.distill_loss!r} is not one of {', '.join(_distill_losses())}")
    if config.distill_coef is None:
        config.distill_coef = _distill_coef_default(config.distill_loss)
    if config.distill_chunk_tokens < 1:
        raise ValueError(f"distill_chunk_tokens must be >= 1, got {config.distill_chunk_tokens}")
    if config.distill_overlap_k < 0:
        raise ValueError(f"distill_overlap_k must be >= 0, got {config.distill_overlap_k}")
    if min(config.distill_coef, config.sdpg_ref_coef, config.policy_loss_coef) < 0.0:
        raise ValueError("distill_coef, sdpg_ref_coef and policy_loss_coef must be >= 0")
    if config.teacher_template is None:
        config.teacher_template = get_source(config.privileged_source).default_template
    validate_teacher_template(config.teacher_template, config.privileged_source)
    if config.teacher_transform is not None:
        get_transform(config.teacher_transform)
    check_srpo_config(config)
    _check_stages(config)
    _check_mad_opd(config)
    _check_teacher_aligned_prompts(config)
    _check_teacher_rollouts(config)
    check_vllm_config(config)
    check_served_teacher(config)


def _check_teacher_rollouts(config: Any) -> None:
    """`teacher_rollout_loss` (a registered term, read now: one registered after import is accepted), the knobs
    of every term and the shared ones checked, its coefficient defaulted, the combinations no teacher-rollout term
    can run with refused, then the term's own checks (`LossTerm.check_config`)."""
    flag = "--teacher_rollout_loss"
    if config.teacher_rollout_loss not in _rollout_losses():
        raise ConfigError(flag, f"is {config.teacher_rollout_loss!r}", f"use one of {', '.join(_rollout_losses())}")
    if config.teacher_rollouts < 1:
        raise ConfigError("--teacher_rollouts", f"must be >= 1, got {config.teacher_rollouts}", "pass e.g. 4")
    for key, knob in TERM_KNOBS.items():
        problem = knob.check(getattr(config, key)) if knob.check else None
        if problem:
            raise ConfigError(f"--{key}", problem, f"pass e.g. {knob.default}")
    term = TERMS.get(config.teacher_rollout_loss)  # None: "none"
    if config.teacher_rollout_coef is None and term is not None:
        config.teacher_rollout_coef = term.default_coef
    if config.teacher_rollout_coef is not None and config.teacher_rollout_coef < 0.0:
        raise ConfigError("--teacher_rollout_coef", f"must be >= 0, got {config.teacher_rollout_coef}",
                          "pass e.g. 0.05")  # fmt: skip
    if term is None:
        return
    refused = {
        "use_vllm": "the teacher rollouts are generated with transformers from the teacher's own weights, and a vLLM "
        "path is not implemented: TRL's colocated engine holds only the policy's weights (it could roll out the live "
        "teacher, not a synced, EMA or external one), and transformers rollouts beside a vLLM engine were never run "
        "(tests/vllm_engine covers vLLM generation, the credit rules and the served teacher on a CPU): set "
        "use_vllm=False",
        "stages": "a stage schedule would switch the term on and off: use one of them",
        "mad_opd_teachers": "the rollouts come from one teacher: use one of them",
    }
    for name, fix in refused.items():
        if getattr(config, name):
            raise ConfigError(flag, f"is {config.teacher_rollout_loss!r} with {name} set", fix)
    if get_source(config.privileged_source).needs_completions:  # a per-completion context ("sibling", "both")
        raise ConfigError(flag, f"is {config.teacher_rollout_loss!r} with privileged_source="
                          f"{config.privileged_source!r}", "a sibling is chosen per student completion, but the "
                          "teacher rolls out once per prompt: use 'answer' or 'none'")  # fmt: skip
    term.cls.check_config(config)


def _check_teacher_aligned_prompts(config: Any) -> None:
    """`teacher_aligned_prompts` is 0 or a fraction in (0, 1], and needs a teacher whose prompt exists before
    training and differs from the student (`rlsd.core.prompt_selection`)."""
    fraction = config.teacher_aligned_prompts
    if fraction == 0.0:
        return
    flag = "--teacher_aligned_prompts"
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(flag, f"must be 0 (off) or lie in (0, 1], got {fraction}", "pass e.g. 0.5")
    base = {name: getattr(config, name) for name in STAGE_FIELDS}
    runs = [stage_values(config.stages, i, base) for i in reachable(config.stages)] if config.stages else [base]
    if not any(v["distill_loss"] != "none" or "teacher_logps" in RULES[v["credit"]].needs for v in runs):
        raise ConfigError(flag, f"is set but credit={config.credit!r} and distill_loss={config.distill_loss!r} use "
                          "no teacher", "it ranks prompts by teacher-student agreement: use a credit rule that "
                          "reads the teacher or a distillation loss, with teacher_model for OPD")  # fmt: skip
    if config.privileged_source == "sibling":
        fix = "a sibling's teacher prompt needs a rollout, which does not exist before training: use 'answer'"
        raise ConfigError(flag, "is set with privileged_source='sibling'", fix + ", 'both' or 'none'")
    if config.teacher_model is None and config.privileged_source == "none":
        raise ConfigError(flag, "is set with a self-teacher shown the plain prompt (privileged_source='none')",
                          "at construction that teacher is the student itself and every prompt scores 1: set "
                          "teacher_model, or a privileged source")  # fmt: skip


def _check_mad_opd(config: Any) -> None:
    """`mad_opd_teachers` decoded (a JSON list or comma-separated names) and its requirements checked."""
    teachers = config.mad_opd_teachers
    if isinstance(teachers, str):
        try:
            teachers = json.loads(teachers) if teachers.lstrip().startswith("[") else teachers.split(",")
        except json.JSONDecodeError as err:
            fix = 'pass a JSON list such as ["org/a", "org/b"] or comma-separated names'
            raise ConfigError("--mad_opd_teachers", f"is not valid JSON ({err})", fix) from err
    if teachers is not None and (
        not isinstance(teachers, list | tuple) or not all(isinstance(name, str) for name in teachers)
    ):
        raise ConfigError("--mad_opd_teachers", f"must be a list of model names, got {teachers!r}",
                          'pass e.g. ["org/a", "org/b"]')  # fmt: skip
    if teachers is not None:
        teachers = [name.strip() for name in teachers if name.strip()] or None
    config.mad_opd_teachers = teachers
    if config.mad_opd_confidence not in MAD_CONFIDENCES:
        raise ConfigError("--mad_opd_confidence", f"is {config.mad_opd_confidence!r}",
                          f"use one of {', '.join(MAD_CONFIDENCES)}")  # fmt: skip
    if not config.mad_opd_temperature > 0:
        raise ConfigError("--mad_opd_temperature", f"must be > 0, got {config.mad_opd_temperature}", "pass e.g. 1.0")
    if teachers is None:
        return
    fix = "MAD-OPD distils from teacher_model and mad_opd_teachers through a distillation loss"
    if config.teacher_model is None:
        raise ConfigError("--mad_opd_teachers", "is set but teacher_model is not", fix)
    if config.distill_loss == "none":
        raise ConfigError("--mad_opd_teachers", "is set but distill_loss is 'none'", fix)
    if "teacher_logps" in RULES[config.credit].needs:
        what = f"is set with credit={config.credit!r}, a rule that reads one teacher's log-probs"
        raise ConfigError("--mad_opd_teachers", what, "use credit='grpo' (or another rule without a teacher)")
    if config.stages is not None:
        raise ConfigError("--mad_opd_teachers", "is set with stages", "use one of them")


def _check_stages(config: Any) -> None:
    """`stages` decoded (a JSON string) and checked (`rlsd.core.stages.check_stages`); stateful rules refused."""
    config.stages = parse_stages(config.stages)
    if config.stages is None:
        return

    def check_rule(credit: str) -> None:
        if RULES[credit].state is not None:
            raise ValueError(f"credit {credit!r} keeps state across steps, which stages do not carry over")
        check_rule_options(credit, negative_only=config.rlsd_negative_only, span=config.rlsd_span != "all")

    coef_defaults = {loss: _distill_coef_default(loss) for loss in LOSSES}
    check_stages(config.stages, rules=RULES, losses=_distill_losses(), coef_defaults=coef_defaults,
                 check_rule=check_rule)  # fmt: skip
    if RULES[config.credit].state is not None and len(config.stages) in reachable(config.stages):
        raise ConfigError("--credit", f"is {config.credit!r}, a rule that keeps state across steps, and runs after "
                          "the stages", "stages do not carry a rule's state: use another rule")  # fmt: skip


def _check_teacher_model(config: Any) -> None:
    """`teacher` names a registered kind (`rlsd.teachers.TEACHER_KINDS`, read now: a kind registered after import
    is accepted). `teacher_model` selects a kind that loads it (`"external"` in place of the default); a
    self-teacher mode beside it, or a model-loading kind without it, is refused."""
    if config.teacher_model is not None and config.teacher == DEFAULT_TEACHER:  # the default, not a choice
        config.teacher = EXTERNAL_TEACHER
    kind = TEACHER_KINDS.get(config.teacher)
    if kind is None:
        raise ValueError(f"teacher={config.teacher!r} is not one of {', '.join(teacher_modes())}")
    if config.teacher_model is not None and not kind.loads_model:
        raise ConfigError(
            "--teacher",
            f"is {config.teacher!r}, a self-teacher mode, but teacher_model={config.teacher_model!r} is set",
            "drop one: teacher_model replaces the self-teacher",
        )
    if config.teacher_model is None and kind.loads_model:
        raise ConfigError("--teacher", f"is {config.teacher!r} but teacher_model is not set", "set teacher_model")
    if config.teacher_model_init_kwargs is not None and config.teacher_model is None:
        raise ConfigError("--teacher_model_init_kwargs", "is set but teacher_model is not", "set teacher_model")
