"""The one catalogue of named methods the demo and the benchmarks train, with each name's `RLSDConfig` overrides,
and the named subsets each command runs by default."""

from __future__ import annotations

from typing import Any

from rlsd.context.harness import HARNESS_TEACHER_TEMPLATE
from rlsd.context.templates import PAPER_TEACHER_TEMPLATE
from rlsd.experiments import (
    contexts,  # noqa: F401  (registers the embedded task's context generators)
    video_judge,  # noqa: F401  (registers VISD's scripted judge, "video-judge")
)
from rlsd.experiments.task import SIBLING_TEMPLATE

_FULL_OPSD = {"credit": "grpo", "policy_loss_coef": 0.0, "teacher": "initial"}
_SIBLING = {"privileged_source": "sibling", "teacher_template": SIBLING_TEMPLATE}
_OPD = {"teacher": "external", "privileged_source": "none", "teacher_template": "{prompt}"}
_OPHSD = {**_FULL_OPSD, "distill_loss": "jsd", "distill_jsd_beta": 1.0, "privileged_source": "harness",
          "harness": "plan"}  # fmt: skip
_RESD = {"credit": "grpo", "policy_loss_coef": 0.0, "distill_loss": "resd_topk", "resd_topk": 16, "teacher": "ema",
         "teacher_ema_decay": 0.9999, "num_generations": 2, "privileged_source": "reflection", "playbook_size": 3,
         "playbook_lesson_chars": 48, "teacher_template": "[{playbook}|{reflection}|{success}] {prompt}"}  # fmt: skip
_TRACE = {"credit": "grpo", "distill_loss": "trace", "trace_error_kl": True, "teacher": "live",
          "privileged_source": "annotation", "context_generator": "task-annotator",
          "teacher_template": "[ref {answer}|{diagnosis}] {prompt}"}  # fmt: skip
_HELD = {"rlsd_lambda": 1.0, "rlsd_lambda_decay_steps": 0}
_HELD_WIDE = {"credit": "rlsd", "teacher": "synced", **_HELD, "rlsd_clip": 0.5}
_ORACLE = {"credit": "oracle", "privileged_source": "annotation", "context_generator": "task-annotator",
           "teacher": "live", "teacher_template": "[ref {answer}|{diagnosis}] {prompt}", **_HELD}  # fmt: skip
_TASK_REFLECTION = "{prompt} {completion} {feedback} Lesson:"
"""What the tiny policy is asked for a reflection under `resd`: one line ending in `Lesson:`, which it completes."""

CATALOGUE: dict[str, dict[str, Any] | None] = {
    # the demo's methods; OPSD's teacher is frozen at the warm start (section 3.1)
    "grpo": {"credit": "grpo"},
    "rlsd": {"credit": "rlsd", "teacher": "synced"},
    "opsd": {"credit": "opsd", "teacher": "initial"},
    "grpo+opsd": {"credit": "grpo+opsd", "teacher": "initial"},
    # TRL's experimental SDPOTrainer, the peer for SDPO (built by the bench, not from an RLSDConfig)
    "sdpo": None,
    # OPSD at the paper's 10x learning rate, next to GRPO at 10x as the control: separates "leakage collapses OPSD"
    # from "a 10x learning rate collapses anything"
    "opsd-10x": {"credit": "opsd", "teacher": "initial", "lr_multiplier": 10.0},
    "grpo-10x": {"credit": "grpo", "lr_multiplier": 10.0},
    # the self-distillation family: the 2026 credit rules with RLSD's synced teacher; full OPSD (no reward, teacher
    # frozen at the warm start) with each distillation loss; SDPG with its live teacher and paper weights; the
    # sibling context (RLSD shown a successful sibling instead of the answer, and an SDPO-style run: top-k JSD from
    # a sibling-conditioned EMA teacher, no policy gradient). top-k is 16 of the tiny model's 263 tokens.
    "rlrt": {"credit": "rlrt", "teacher": "synced"},
    "antisd": {"credit": "antisd", "teacher": "synced"},
    "egrsd": {"credit": "egrsd", "teacher": "synced"},
    "cl-egrsd": {"credit": "cl-egrsd", "teacher": "synced"},
    "sod": {"credit": "sod", "teacher": "synced"},
    "uni-opd": {"credit": "uni-opd", "teacher": "synced"},
    "gear": {"credit": "gear", "teacher": "synced"},
    "opsd-jsd": {**_FULL_OPSD, "distill_loss": "jsd"},
    "opsd-topk": {**_FULL_OPSD, "distill_loss": "topk_jsd", "distill_topk": 16},
    "opsd-teacher-top1": {**_FULL_OPSD, "distill_loss": "teacher_top1"},
    "opsd-student-top1": {**_FULL_OPSD, "distill_loss": "student_top1"},
    "sdpg": {"credit": "grpo", "distill_loss": "sdpg", "teacher": "live"},
    # SDAR as ms-swift 4.6 adds it: GRPO + 0.1 * token mean of sg(sigmoid(5 Delta_t)) Delta_t on the sampled tokens,
    # from the current policy shown the answer (ms-swift scores its teacher with the rollout's weights: "live" here)
    "sdar": {"credit": "grpo", "distill_loss": "sdar", "teacher": "live"},
    # RLCSD (arXiv 2606.11709): the teacher shown a correct sibling against the log-mean-exp of it shown K = 4 wrong
    # ones (the same template), tanh-squashed and added to A_i without flipping its sign; the paper's configs: a
    # snapshot teacher re-synced every 10 steps ("synced", teacher_sync_steps=10) and a constant lam = 0.5
    "rlcsd": {
        "credit": "rlcsd",
        "teacher": "synced",
        "privileged_source": "contrast",
        "teacher_template": "[ref {hint}] {prompt}",
        "rlsd_lambda_decay_steps": 0,
    },
    # SRPO (arXiv 2605.07274, reconstructed: `rlsd.core.srpo_rule`): no privileged context; the second pass is the
    # current policy shown a blank image, Delta = log p(blank) - log p(image); perception tokens (the vision task's
    # `<p>3+4*5</p>`, which `rlsd demo --task vision` trains into its warm start when srpo is among the methods) are
    # weighted by visual dependency, reasoning tokens (`<think>`) by consistency, around one baseline per completion,
    # clipped to [0.8, 1.2] and applied in full (lam 1, no decay)
    "srpo": {
        "credit": "srpo",
        "teacher": "live",
        "privileged_source": "none",
        "teacher_template": "{prompt}",
        "teacher_transform": "blank_images",
        "srpo_perception_tag": "p",
        "rlsd_lambda": 1.0,
        "rlsd_lambda_decay_steps": 0,
    },
    # VISD (arXiv 2605.06094, reconstructed: `rlsd.context.judge`): RLSD's direction-magnitude rule and synced
    # teacher, the teacher shown the answer and a judge's structured feedback on the completion (answer, logic,
    # grounding: which step or frame is wrong); on the video task the task's checker judges ("video-judge", reading
    # the row's `frame_text`), the paper's judge is a video-aware model
    "visd": {
        "credit": "rlsd",
        "teacher": "synced",
        "privileged_source": "judge",
        "context_generator": "video-judge",
        "teacher_template": "[ref {answer}|{feedback}] {prompt}",
    },
    # GUI-SD (arXiv 2605.00642, weights reconstructed: `rlsd.core.gui_sd`): on-policy self-distillation, no policy
    # gradient; the teacher is the current policy (the same weights) shown the screen with the target's box as a
    # visual hint (`box_hint`: Gaussian soft mask and red outline, read from the `teacher_box` column; no text
    # context), and each token's JSD is weighted by digit significance x the teacher's probability of the token
    "gui-sd": {
        "credit": "grpo",
        "policy_loss_coef": 0.0,
        "teacher": "live",
        "distill_loss": "gui_sd",
        "privileged_source": "none",
        "teacher_template": "{prompt}",
        "teacher_transform": "box_hint",
    },
    # MSD on-policy (arXiv 2605.02971): no reward; DPSW-weighted reverse KL on the student's own completions from the
    # teacher frozen at the warm start and shown the parallel prompt *instead of* the student's. On the embedded task
    # the parallel prompt is the same problem in words (the deterministic "task-words" generator): `Q: three plus
    # four times five minus two=` for `Q: 3+4*5-2=`. Unlike the paper's English, the words are the form the warm
    # start never saw: this exercises the mechanics, it is not a transfer result.
    "msd": {
        **_FULL_OPSD,
        "distill_loss": "msd",
        "privileged_source": "parallel",
        "context_generator": "task-words",
        "teacher_template": "{parallel}",
    },
    # OPHSD (arXiv 2605.08741): no reward; full-vocabulary reverse KL(p_S || p_T) (the JSD at beta = 1) to the teacher
    # frozen at the warm start and shown what a plan-then-solve harness run with the current policy wrote before the
    # problem. `ophsd` is the paper's setting: the policy writes the plan (on the embedded task the warm start never
    # saw the English plan request nor the template: it exercises the mechanics). `ophsd-scripted` is the embedded
    # task's stand-in for a policy too small to plan: the "task-harness" generator writes the task's steps in order
    # without their results (`[Plan: 4*5;3+#1;#2-2] Q: 3+4*5-2=`).
    "ophsd": {**_OPHSD, "context_generator": "policy", "teacher_template": HARNESS_TEACHER_TEMPLATE},
    "ophsd-scripted": {**_OPHSD, "context_generator": "task-harness", "teacher_template": "[{harness}] {prompt}"},
    # RESD (arXiv 2605.12741): no policy gradient; the reverse KL over the student's top-k tokens (+ a tail bucket),
    # the teacher's probabilities clipped from below at 0.2 x the student's, each row weighted by the batch's success
    # rate (a rare success weighs more), from an EMA teacher (the paper's code's rate 1e-4: decay 0.9999) shown a
    # playbook of lessons curated across steps, the row's reflection on its failure (the verifier's feedback shows
    # the answer) and a successful attempt of its group. One rollout per prompt in the paper; TRL's GRPO needs 2 (16
    # prompts x 2 completions). top-k 16 of the tiny model's 263 tokens (the paper's 100 of Qwen3's 151k), a
    # 3-lesson playbook of lessons up to 48 characters and a compact template keep the teacher prompt within the
    # tiny model's 512 positions (the paper keeps 120-200 lessons). `resd` is the paper's setting: the policy writes
    # the reflections (asked in one line, the tiny model's format); `resd-scripted` is the embedded task's stand-in
    # for a policy too small to reflect: the task's checker writes them ("task-reflection": the first wrong step
    # and its correct value, the answer, and a `Lesson:` line).
    "resd": {**_RESD, "context_generator": "policy", "reflection_instruction": _TASK_REFLECTION},
    "resd-scripted": {**_RESD, "context_generator": "task-reflection"},
    # TRACE (arXiv 2605.10194): on the spans an annotator marks, instead of GRPO, the forward KL(p_T || p_S)
    # on the key spans of correct completions and the reverse KL(p_S || p_T) on the error spans of wrong ones (the
    # paper's optional channel, on here so that a batch with no correct completion still distils), from the current
    # policy shown the answer and the annotator's diagnostic type (never the spans); the KL weight is 1 for 20 steps,
    # then falls to 0 over 30 (a reconstruction), GRPO on every other token (on all once the weight is 0). On the
    # embedded task the task's checker annotates
    # ("task-annotator": each step's result in a correct completion; the first wrong step and all after it in a wrong
    # one); the paper's annotator is a model (context_generator="policy" is its online self-annotation).
    "trace": _TRACE,
    "rlsd-sibling": {"credit": "rlsd", "teacher": "synced", **_SIBLING},
    "sdpo-jsd": {**_FULL_OPSD, "distill_loss": "topk_jsd", "distill_topk": 16, "teacher": "ema", **_SIBLING},
    # OPD (the paper's baseline): a separate, stronger frozen teacher shown the plain prompt; the sampled-token Delta
    # as the advantage, or the full-vocabulary JSD alone. `teacher="external"` takes `teacher_model` from
    # `method_overrides`, else the demo config's external teacher (a larger warm start, `external_teacher_config`).
    "opd": {**_OPD, "credit": "opsd"},
    "opd-jsd": {**_OPD, "credit": "grpo", "distill_loss": "jsd", "policy_loss_coef": 0.0},
    # TRL's stable DistillationTrainer on opd-jsd's configuration (on-policy JSD, beta 0.5, same external teacher):
    # the peer for OPD (built by the bench, not from an RLSDConfig)
    "trl-distill": None,
    # opd-jsd on 16 prompts x 2 completions per step (same 32 completions): added after section 11's first runs to
    # test whether the anchor's lead comes from its 32 distinct prompts per step (exploratory, labelled as such)
    "opd-jsd-16x2": {**_OPD, "credit": "grpo", "distill_loss": "jsd", "policy_loss_coef": 0.0, "num_generations": 2},
    # RLSD with the external teacher in place of the self-teacher (shown the answer, as RLSD's teacher is), and SOD
    # with the external teacher shown the plain prompt (its paper's setting: GRPO + the teacher's Delta)
    "rlsd-external": {"credit": "rlsd", "teacher": "external", "privileged_source": "answer"},
    "sod-external": {**_OPD, "credit": "sod"},
    # teacher rollouts from the external teacher: BRTS (best of 4 teacher samples, top-k distillation on it, lambda
    # 0.05, beside GRPO) and PBSD (teacher samples preferred over the student's, DPO-style, beside GRPO)
    "brts": {**_OPD, "credit": "grpo", "teacher_rollout_loss": "brts", "teacher_rollouts": 4, "distill_overlap_k": 16},
    "pbsd": {
        "credit": "grpo",
        "teacher": "external",
        "privileged_source": "answer",
        "teacher_rollout_loss": "pbsd",
        "teacher_rollouts": 1,
    },
    # NPO (arXiv 2604.20733, `rlsd.teachers.near_future`): GRPO whose hard groups (every completion wrong) get one
    # slot replaced by a verified-correct rollout of the near-future guide: the policy trains `npo_lookahead` steps
    # past an anchor, those weights become the guide, policy and optimizer roll back to the anchor, and
    # `npo_guide_steps` guided steps follow. `npo` is the paper's manual early-stage intervention (anchor after step
    # 1, Delta = 2); `autonpo` anchors when the reward stagnates or the entropy collapses and picks Delta in 1..3 by
    # S = Q / V on the mistake pool (reconstructed formulas: `npo_should_trigger`, `NearFutureSlots._choose`)
    "npo": {
        "credit": "grpo",
        "teacher": "near_future",
        "npo_trigger": "step",
        "npo_start_step": 1,
        "npo_lookahead": 2,
        "npo_guide_steps": 8,
    },
    "autonpo": {
        "credit": "grpo",
        "teacher": "near_future",
        "npo_trigger": "auto",
        "npo_lookahead": 3,
        "npo_guide_steps": 8,
        "npo_window": 2,
    },
    # CoARS (arXiv 2604.10029, reconstructed: `rlsd.coevolve`, `rlsd.experiments.coars_task`): two co-evolving
    # policies, a recommender and a user simulator, on a toy dialogue; each trained on its coupled interaction reward
    # with RLSD credit from itself shown the dialogue's privileged outcome (built by the bench's orchestrated
    # methods, `rlsd.experiments.orchestrated`, not from an RLSDConfig)
    "coars": None,
    # CoPD (arXiv 2604.27083, reconstructed: `rlsd.copd`, `rlsd.experiments.copd_task`): one branch per domain of
    # the task (problems with a product / sums only) from the warm start, rounds of each branch's own GRPO step
    # then one step of on-policy distillation (reverse KL) on the other domain's prompts from that domain's branch,
    # then the branches' parameter average (built by the bench's orchestrated methods, not from an RLSDConfig)
    "copd": None,
    # issue 26's study on the long chains (`--task long`): the positive control, oracle credit from the task's checker
    # (`rlsd.experiments.oracle`: a wrong completion's correct prefix unblamed, lam = 1 held; its rule registers when
    # a run selects it), and the declared RLSD variant, lam = 1 held with a wider clip (eps_w = 0.5), shown the answer
    # (`rlsd-held-wide`) or the worked steps (`rlsd-held-wide-steps`)
    "oracle": _ORACLE,
    "rlsd-held-wide": {**_HELD_WIDE},
    "rlsd-held-wide-steps": {**_HELD_WIDE, "privileged_column": "worked_steps"},
    # teacher modes and lam schedules (cost and study); `rlsd-decayed` is RLSD after lam has reached 0
    "rlsd-live": {"credit": "rlsd", "teacher": "live"},
    "rlsd-synced": {"credit": "rlsd", "teacher": "synced"},
    "rlsd-initial": {"credit": "rlsd", "teacher": "initial"},
    "rlsd-decayed": {"credit": "rlsd", "teacher": "live", "rlsd_lambda": 0.0},
    "rlsd-const": {"credit": "rlsd", "teacher": "synced", "rlsd_lambda_decay_steps": 0},
    "rlsd-lam1": {"credit": "rlsd", "teacher": "synced", "rlsd_lambda": 1.0, "rlsd_lambda_decay_steps": 0},
    "rlsd-neg": {"credit": "rlsd", "teacher": "synced", "rlsd_negative_only": True},
    # the teacher's cost with the paper's (long) teacher template, with and without teacher-prompt prefix sharing
    "rlsd-live-prefix": {"credit": "rlsd", "teacher": "live", "teacher_prefix_sharing": True},
    "rlsd-live-paper": {"credit": "rlsd", "teacher": "live", "teacher_template": PAPER_TEACHER_TEMPLATE},
    "rlsd-live-paper-prefix": {
        "credit": "rlsd",
        "teacher": "live",
        "teacher_template": PAPER_TEACHER_TEMPLATE,
        "teacher_prefix_sharing": True,
    },
}
"""Every named method. An entry may hold `lr_multiplier`, which scales the shared learning rate."""

DEMO_METHODS = ("grpo", "rlsd", "opsd", "grpo+opsd")
BENCH_METHODS = ("grpo", "rlsd", "opsd", "grpo+opsd", "sdpo", "opsd-10x", "grpo-10x")
FAMILY_METHODS = (
    "rlrt", "antisd", "egrsd", "cl-egrsd", "sod", "uni-opd", "gear", "opsd-jsd", "opsd-topk", "opsd-teacher-top1",
    "opsd-student-top1", "sdpg", "rlsd-sibling", "sdpo-jsd",
)  # fmt: skip
TEACHER_METHODS = ("grpo", "rlsd", "opd", "opd-jsd", "trl-distill", "rlsd-external", "sod-external", "brts", "pbsd")
"""The external-teacher comparison (BENCHMARKS.md): self-teacher methods beside those of a larger frozen teacher."""
COST_CONFIGS = ("grpo", "rlsd-live", "rlsd-synced", "rlsd-initial", "rlsd-decayed", "sdpo", *FAMILY_METHODS)
STUDY_CONFIGS = ("grpo", "rlsd", "rlsd-const", "rlsd-lam1", "rlsd-neg", "rlsd-live")
"""The study's knobs, each paired with GRPO on the same seeds: `rlsd` decays lam from 0.5 to 0 over the demo's
`lambda_decay_steps` (the paper's 50); `-const` keeps 0.5 for the whole run; `-lam1` keeps 1.0 (the clipped weight
alone)."""


def check_known(names: tuple[str, ...] | list[str], allowed: tuple[str, ...] | None = None) -> None:
    """Refuse names outside the catalogue (or outside `allowed`), listing the choices."""
    choices = allowed or tuple(CATALOGUE)
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(choices)}")
