"""`RLSDConfig`: TRL's `GRPOConfig` plus the knobs of RLSD and its baselines."""

from __future__ import annotations

import dataclasses
import functools
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar

from trl import GRPOConfig

from rlsd.config_checks import SPANS, check_fields, check_numbers
from rlsd.context.sources import SOURCE_KNOBS, SOURCES
from rlsd.core.credit import DEFAULT_RLSD_CLIP, DEFAULT_RLSD_LAMBDA
from rlsd.core.distill import LOSS_KNOBS, LOSSES, MAD_CONFIDENCES
from rlsd.core.rules import KNOBS, RULES, Knob
from rlsd.data.rewards import DEFAULT_REWARD_TIMEOUT_S
from rlsd.step import msd_term  # noqa: F401  (registers off-policy MSD's teacher-rollout term, "msd")
from rlsd.step.rollout_term import TERM_KNOBS, TERMS
from rlsd.teachers import DEFAULT_TEACHER, NPO_KNOBS, TEACHER_KINDS
from rlsd.teachers import TEACHER_MODES as TEACHER_MODES  # re-exported: the teacher kinds are `rlsd.teachers`'s

DISTILL_LOSSES = ("none", *LOSSES)
"""`distill_loss`: "none" and the losses registered in `rlsd.core.distill` (`@distill_loss`) when this module was
imported (the command line's choices; validation reads the registry itself, so a loss registered later is accepted
too)."""
ROLLOUT_LOSSES = ("none", *TERMS)
"""`teacher_rollout_loss`: "none" and the terms registered in `rlsd.step.rollout_term` (`@loss_term`) when this module
was imported (the command line's choices; validation reads the registry itself, so a term registered later is
accepted too)."""


def _knob_fields(name: str, knobs: dict[str, Knob]) -> type:
    """A dataclass with one field per knob (its default's type, its default, its help)."""
    specs = {key: field(default=knob.default, metadata={"help": knob.help}) for key, knob in knobs.items()}
    return make_dataclass(name, [(key, type(knobs[key].default), spec) for key, spec in specs.items()])


if set(KNOBS) & set(LOSS_KNOBS):
    raise ValueError(f"knob(s) {sorted(set(KNOBS) & set(LOSS_KNOBS))} are declared by a credit rule and a loss")
if (set(KNOBS) | set(LOSS_KNOBS)) & set(TERM_KNOBS):
    shared = sorted((set(KNOBS) | set(LOSS_KNOBS)) & set(TERM_KNOBS))
    raise ValueError(f"knob(s) {shared} are declared by a teacher-rollout term and a credit rule or loss")
if set(SOURCE_KNOBS) & set(TERM_KNOBS):
    raise ValueError(f"knob(s) {sorted(set(SOURCE_KNOBS) & set(TERM_KNOBS))} are declared by a source and a term")
RuleKnobs = _knob_fields("RuleKnobs", KNOBS)
"""The credit rules' own knobs as config fields, each declared once with its rule (`rlsd.core.rules.credit_rule`)."""
DistillKnobs = _knob_fields("DistillKnobs", LOSS_KNOBS)
"""The distillation losses' knobs as config fields, declared with their loss (`rlsd.core.distill.distill_loss`)."""
TermKnobs = _knob_fields("TermKnobs", TERM_KNOBS)
"""The teacher-rollout terms' knobs as config fields, declared with their term (`rlsd.step.rollout_term.loss_term`)."""
SourceKnobs = _knob_fields("SourceKnobs", SOURCE_KNOBS)
"""The privileged sources' knobs as config fields, declared with their source (`rlsd.context.sources`)."""
NearFutureKnobs = _knob_fields("NearFutureKnobs", NPO_KNOBS)
"""NPO / AutoNPO's knobs (`rlsd.teachers.near_future`, the guide of `teacher='near_future'`)."""


@dataclass
class RLSDConfig(GRPOConfig, RuleKnobs, DistillKnobs, TermKnobs, SourceKnobs, NearFutureKnobs):
    r"""
    Configuration for [`RLSDTrainer`]. Every field of TRL's `GRPOConfig` applies unchanged; the fields below add the
    credit assignment of RLSD (RLVR with Self-Distillation, arXiv 2604.03128) and its baselines.

    Parameters:
        credit (`str`, *optional*, defaults to `"rlsd"`):
            Token credit rule: `"grpo"` (A_it = A_i), `"rlsd"` (verifier sets the sign, the privileged self-teacher
            the per-token magnitude), `"opsd"` (A_it = Delta_t, reward ignored), `"grpo+opsd"`
            (A_it = A_i + opsd_beta * Delta_t), or a 2026 follow-up: `"rlrt"`, `"antisd"`, `"egrsd"`, `"cl-egrsd"`,
            `"sod"`, `"uni-opd"`, `"gear"` (see `rlsd.core.rules`). lam and its schedule apply to every rule that has
            one.
        rlsd_lambda (`float`, *optional*, defaults to `0.5`):
            lam_0, the weight of the clipped teacher ratio in the multiplier (1 - lam) + lam * clip(w).
        rlsd_lambda_warmup_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps over which lam rises linearly from 0 to lam_0.
        rlsd_lambda_decay_steps (`int`, *optional*, defaults to `50`):
            Optimizer steps over which lam then falls linearly to 0, after which RLSD equals GRPO and the teacher
            pass is skipped. lam_0 is used once, at step max(warm-up, 1), and 0 is reached that many steps later.
            0 keeps lam_0 for the whole run.
        rlsd_clip (`float`, *optional*, defaults to `0.2`):
            eps_w: the teacher ratio w_t is clipped to [1 - eps_w, 1 + eps_w]. 0 makes the multiplier exactly 1.
        rlsd_negative_only (`bool`, *optional*, defaults to `False`):
            Reweight only completions with A_i < 0; the others keep A_i. Honoured by `"rlsd"`, `"egrsd"` and
            `"cl-egrsd"`; the other rules refuse it.
        rlsd_span (`str`, *optional*, defaults to `"all"`):
            Which completion tokens the teacher may reweight (the specification's span mask): `"all"`, or
            `"think"`, only the tokens inside the reasoning span, between `<think>` and `</think>` (from the start
            when the prompt opened the span; none when a completion has neither tag); the other tokens keep A_i.
            Honoured by `"rlsd"`, `"egrsd"` and `"cl-egrsd"`; the other rules refuse it.
        teacher (`str`, *optional*, defaults to `"synced"`):
            Which weights the self-teacher uses: `"synced"` (a frozen copy, re-synced every `teacher_sync_steps`),
            `"live"` (the current weights, no copy), `"initial"` (never synced) or `"ema"` (an exponential
            moving average of the policy). With a PEFT model no model is copied: `"synced"` / `"ema"` keep a second
            adapter on the same base, and `"initial"` is a frozen copy of a pretrained starting adapter (TRL's `ref`
            adapter when there is one; a fresh LoRA, B = 0, just disables the adapter). A copy gets the policy's
            fused head as TRL installs it (`cast_lm_head_to_fp32` included). The copies are refused when ZeRO-3 has
            partitioned the policy (use `"live"`). With any teacher, `disable_dropout` is forced to True and
            attention dropout inside the attention function is refused, so that Delta carries no dropout noise.
            `"external"` is set by `teacher_model` (a separate frozen model; see there). Memory: `"synced"`,
            `"initial"` and `"ema"` hold one more copy of the policy's weights (`"ema"` with bf16 / fp16 weights also
            an fp32 shadow) and `"synced"` / `"ema"` pay a weight copy at every sync; `"live"` holds nothing more;
            `"external"` holds one more full frozen model, the teacher's size (no optimizer state, no sync cost).
        teacher_model (`str` or `None`, *optional*, defaults to `None`):
            A frozen external teacher (the name or local path of a causal LM, loaded with TRL's
            `create_model_from_path`, i.e. `from_pretrained`, with `teacher_model_init_kwargs`) in place of the
            self-teacher, for every credit rule and distillation loss (OPD: `credit="opsd"` or
            `distill_loss="jsd"`, `policy_loss_coef=0`). It gets a fused log-prob head like the policy's, runs in
            eval mode without gradients and is placed as TRL places its reference model (plain device, DeepSpeed
            ZeRO including stage 3, FSDP2). It must share the student's tokenizer: a different `vocab_size` or a
            tokenizer (when one is saved with the teacher) that encodes the first training prompts differently is
            refused. Setting it sets `teacher="external"`; a self-teacher mode other than the default is refused.
            Checkpoints hold only the teacher's state file (its weights are never trained). The teacher prompt is
            still `teacher_template` filled by `privileged_source`; `privileged_source="none"` shows the teacher the
            plain prompt (OPD).
        teacher_model_init_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments of the teacher's `from_pretrained` (a JSON string on the command line). `dtype`
            defaults to the policy's dtype and `attn_implementation` to the policy's, as for TRL's reference model.
        mad_opd_teachers (`list[str]`, `str` or `None`, *optional*, defaults to `None`):
            MAD-OPD (several teachers; the specification only names it, so the weighting is the project's
            reconstruction, `rlsd.core.distill.mad_opd_token_loss`): further frozen external teachers beside
            `teacher_model` (a JSON list or comma-separated names on the command line), each loaded, checked and
            placed like it (same `teacher_model_init_kwargs`, same tokenizer). The distillation term becomes
            L_t = sum_m a_m,t * D(p_m,t, p_S,t) over the M = 1 + len(mad_opd_teachers) teachers, with the stop-gradient
            per-token weights a_m,t = softmax over teachers of c_m,t / `mad_opd_temperature`. Needs a distillation
            loss and a credit rule that does not read the teacher (e.g. `credit="grpo"`); `stages` are refused with it.
            Memory: one more full frozen model per teacher, and one more no-grad teacher forward per micro-batch each.
            Logs `rlsd/mad_weight_<m>`, the token mean of teacher m's weight.
        mad_opd_confidence (`str`, *optional*, defaults to `"sampled_logp"`):
            MAD-OPD's confidence c_m,t: `"sampled_logp"`, teacher m's log-prob of the sampled token (at temperature 1,
            a_m,t = p_m(y_t) / sum_n p_n(y_t)), or `"neg_entropy"`, minus the entropy of its next-token distribution.
        mad_opd_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature of MAD-OPD's softmax over teachers: large tends to the plain average, near 0 to the most
            confident teacher at each token. Must be > 0.
        teacher_sync_steps (`int`, *optional*, defaults to `10`):
            With `teacher="synced"`, optimizer steps between hard copies of the policy into the teacher.
        teacher_ema_decay (`float`, *optional*, defaults to `0.95`):
            With `teacher="ema"`, teacher <- decay * teacher + (1 - decay) * policy after every optimizer step;
            bf16 / fp16 parameters are averaged in an fp32 shadow (one fp32 copy more, kept in checkpoints) so that
            steps below their precision are not rounded away.
        teacher_backend (`str`, *optional*, defaults to `"trainer"`):
            Where the teacher's log-probs of the completions come from: `"trainer"`, a forward of the teacher's weights
            in the trainer, or `"vllm"`, `prompt_logprobs` of TRL's colocated vLLM engine on [teacher prompt ;
            completion] (`rlsd.engines.vllm_teacher`). `"vllm"` serves the live self-teacher from the generation
            engine (whose weights are the policy's at every rollout), a synced / EMA / initial copy from an engine of
            its own pushed the trainer's copy after each change, an external `teacher_model` from an engine loading its
            folder; with `use_vllm=True` in colocate mode and `temperature=1`; one log-prob per sampled token, so
            credit rules that read only the teacher's log-probs of the sampled tokens, no `distill_loss`,
            `mad_opd_teachers` or `teacher_rollout_loss`.
        teacher_prefix_sharing (`bool`, *optional*, defaults to `False`):
            Compute each group's teacher prompt once and reuse its key/value cache for the group's completions
            (`rlsd.step.scoring`), instead of one forward per completion on [teacher prompt ; completion]. Text models
            on one device only (sharded, DeepSpeed and vision models score every row whole). The log-probs equal the
            plain pass to float rounding (about 1e-6 in fp32), not bit for bit, and the completion logits are built
            in full (B, T, V) per chunk rather than through TRL's fused head.
        teacher_offload (`bool`, *optional*, defaults to `False`):
            Keep the weights a teacher owns (the synced / EMA / initial copy and an EMA's fp32 shadow, `teacher_model`,
            MAD-OPD's teachers, SDPG's reference) on the CPU between uses: moved to the accelerator for each teacher
            pass and each update from the policy, and back after (`rlsd.teachers.offload`), so the accelerator holds
            them only while they work, at two host-device copies of their weights per use. Results are unchanged.
            Refused under DeepSpeed / FSDP (DeepSpeed's `offload_param` is the tool there) and when no teacher owns
            weights (`teacher="live"`, a PEFT policy's adapter teachers). On a CPU run the moves are no-ops.
        distill_loss (`str`, *optional*, defaults to `"none"`):
            Distillation term added to TRL's loss, from the student's and the teacher's full next-token distributions
            at each completion token (gradient into the student only; logits are built `distill_chunk_tokens` at a
            time and recomputed in the backward pass, so no (B, T, V) tensor is held): a loss registered in
            `rlsd.core.distill` (`@distill_loss`), listed with its knobs at the end ("Distillation losses"), e.g.
            `"jsd"` (generalized JSD, `distill_jsd_beta`) or `"sdpg"`. The term is the token mean over the
            micro-batch's completion tokens. Runs under DDP, FSDP2 and ZeRO-2; ZeRO-3 is refused.
        distill_coef (`float` or `None`, *optional*, defaults to `None`):
            Weight of the distillation term; `None` means the loss's declared default: 0.001 for `"sdpg"` (the
            paper's beta) and 1.0 otherwise.
        distill_positive_only (`bool`, *optional*, defaults to `False`):
            Distill only completions with A_i > 0 (SDPG's optional gating).
        distill_chunk_tokens (`int`, *optional*, defaults to `1024`):
            Completion tokens projected to the vocabulary at once by the distillation term.
        distill_overlap_k (`int`, *optional*, defaults to `16`):
            With a distillation loss, log `rlsd/topk_overlap`, Rethinking-OPD's diagnostic: |TopK(p_S) & TopK(p_T)|
            / k per distilled completion token, token-mean, from the logits the term builds anyway (no extra
            projection, no (B, T, V) tensor). 0 turns it off.
        teacher_aligned_prompts (`float`, *optional*, defaults to `0.0`):
            Rethinking-OPD's teacher-aligned prompt selection, reconstructed without the teacher's training data
            (`rlsd.core.prompt_selection`): 0 is off; a value in (0, 1] keeps that fraction of the training prompts
            (ceil(fraction * N), at least 1, in dataset order), the ones whose teacher and student agree most: a
            prompt's score is the mean over the tokens of the student's greedy continuation (at most
            `max_completion_length` new tokens) of |TopK(p_S) & TopK(p_T)| / k with k = `distill_overlap_k` (16
            when that is 0), the teacher conditioned on the teacher prompt it sees in training (`teacher_model`
            with `privileged_source="none"`: the plain prompt; `"both"`: the answer without a sibling). Applied once
            at construction to the train dataset (a `datasets.Dataset` of text prompts; its columns are kept),
            which costs one greedy generation and two forwards (student, teacher) per training prompt; the scores
            are kept on the trainer as `prompt_alignment`. Needs a teacher (a credit rule that reads it or a
            distillation loss); refused with `privileged_source="sibling"` (no sibling exists before training) and
            with a self-teacher shown the plain prompt (it equals the student at construction: every score is 1).
        sdpg_ref_coef (`float`, *optional*, defaults to `0.001`):
            SDPG's alpha: weight of 0.5 (log pi_theta - log pi_ref)^2 on sampled tokens, pi_ref the initial model
            (with PEFT, the starting adapter, as for `teacher="initial"`). Scored at rollout time, only with
            `distill_loss="sdpg"` and alpha > 0.
        policy_loss_coef (`float`, *optional*, defaults to `1.0`):
            Weight of TRL's loss (policy gradient and its KL / entropy terms) beside the distillation term; 0 trains
            on the distillation term alone (full OPSD).
        teacher_rollout_loss (`str`, *optional*, defaults to `"none"`):
            A term learned from teacher *rollouts*, one of those registered in `rlsd.step.rollout_term` with
            `@loss_term` (listed below with their knobs and default coefficients; `"brts"` and `"pbsd"` are the
            project's reconstructions from their descriptions): at each training rollout the teacher (the self-teacher
            in any mode, or `teacher_model`) generates `teacher_rollouts` completions per prompt from its teacher
            prompt, with the student's generation settings (transformers `generate`, `temperature` / `top_p` / `top_k`,
            `max_completion_length`); the term turns them into what its loss needs, and `teacher_rollout_coef` times
            the term is added to the policy loss. Needs `privileged_source` `"answer"` or `"none"` (a sibling is chosen
            per completion, not per prompt); refused with `use_vllm` (teacher generation uses transformers; a vLLM
            path is not implemented: the colocated engine holds only the policy's weights), `stages`,
            `mad_opd_teachers`, tools, environments, rollout functions, images, FSDP and DeepSpeed. Logs
            `rlsd/teacher_rollout_loss` and `rlsd/teacher_rollout_time_s`, and the term's own metrics.
        teacher_rollouts (`int`, *optional*, defaults to `4`):
            N, the teacher completions generated per prompt (BRTS's candidates, PBSD's positives). Must be >= 1.
        teacher_rollout_coef (`float` or `None`, *optional*, defaults to `None`):
            Weight of the teacher-rollout term; `None` means the term's declared default (listed below: 0.05 for
            `"brts"`, the paper's lambda; 1.0 for `"pbsd"`). 0 computes the term but leaves the loss and its
            gradient unchanged.
        stages (`list[dict]`, `str` or `None`, *optional*, defaults to `None`):
            Sparse-to-Dense's stage schedule (`rlsd.core.stages`): a list (a JSON string on the command line) of dicts
            `{"until_step": N, <field>: <value>, ...}` whose fields (`credit`, `distill_loss`, `distill_coef`,
            `distill_positive_only`, `policy_loss_coef` and every distillation knob, e.g. `distill_jsd_beta`) replace
            the config's values from the previous stage's `until_step` + 1 to its own `until_step` (optimizer steps,
            counted from 1). Only the last stage may omit `until_step` (it runs to the end); after the last
            `until_step` the config's own values apply. A stage that sets `distill_loss` alone gets that loss's
            default `distill_coef`. E.g. a forward-KL warm-up, then OPD, then GRPO: `[{"until_step": 20, "credit":
            "grpo", "distill_loss": "jsd", "distill_jsd_beta": 0.0, "policy_loss_coef": 0.0}, {"until_step": 60,
            "credit": "opsd"}, {"credit": "grpo"}]`. The stage is chosen at each training rollout for the step it
            trains first (with `steps_per_generation` or `num_iterations` > 1, a switch waits for the next rollout)
            and logged as `rlsd/stage` (its index; len(stages) for the config's own values); it depends on the step
            alone, so every process switches together. The teacher (and SDPG's reference) is built when any stage
            that can run uses it. Stateful rules (`"antisd"`) are refused in a staged run. Unknown fields, rules or
            losses, and `until_step`s that do not increase, are refused naming the stage index and the field.
        privileged_source (`str`, *optional*, defaults to `"answer"`):
            What the teacher is shown: `"answer"` (the reference answer from `privileged_column`), `"sibling"` (a
            completion of the same group whose reward reaches `sibling_reward_threshold`, SDPO's teacher;
            completions without one get no teacher signal: their Delta is 0 and they are left out of the
            distillation term, and they are counted in `rlsd/no_context_frac`), `"both"` (a completion without a
            successful sibling still sees the answer) or `"none"` (nothing: the teacher prompt is the student's
            prompt under the template `"{prompt}"`; meant for an external teacher, `teacher_model`: a self-teacher
            shown nothing differs from the student only by its weights, so `"live"` gives Delta = 0). `"parallel"`
            (MSD): a parallel version of the prompt (`parallel_column`, else generated) *in place of* the student's
            prompt; its template `"{parallel}"` may omit `{prompt}`. `"reflection"` (RESD): a playbook of lessons
            curated across steps from reflections on failed completions, the row's reflection and a successful
            attempt of its group (`rlsd.context.reflection`; the playbook is saved in checkpoints).
        sibling_reward_threshold (`float`, *optional*, defaults to `1.0`):
            Total (weighted) reward at which a sibling counts as successful.
        privileged_column (`str`, *optional*, defaults to `"solution"`):
            Dataset column holding the privileged reference answer (the column TRL's accuracy reward reads).
        teacher_template (`str` or `None`, *optional*, defaults to `None`):
            Teacher prompt with the fields `{prompt}` (the student's last user turn, or the whole plain-text prompt),
            `{answer}` and / or `{sibling}` as `privileged_source` fills them. `None` is the paper's template for
            `"answer"` and its counterparts for `"sibling"` and `"both"` (`rlsd.context.templates`). System turns of
            conversational prompts are kept.
        teacher_transform (`str` or `None`, *optional*, defaults to `None`):
            A registered teacher-side input transform (`rlsd.context.transforms`: `"blank_images"`, `"noise_images"`,
            `"blur_images"`, `"mask_digits"`, and `"crop_to_box"`, `"draw_box"`, `"gaussian_mask"`, which read a box
            per row from the `teacher_box` column) applied to each row's prompt and images before the teacher
            template: the teacher sees another input than the student (SRPO's corrupted pass). `None`: the student's
            input. Transformed images with a distillation loss are not supported yet.
        reward_timeout (`float`, *optional*, defaults to `600.0`):
            Seconds one call of a reward function may take; a call that overruns stops the run with an error naming
            the function (run in a worker process that is killed and restarted on timeout; a function that cannot be
            sent there, such as a lambda, is bounded in a watched thread, with a warning). 0: no bound.
        resume_weights_only (`bool`, *optional*, defaults to `False`):
            Resuming refuses a checkpoint that is torn or misses a file. With this, a checkpoint that holds its
            weights and `trainer_state.json` is enough: the missing optimizer, scheduler, RNG, teacher or rule state
            starts fresh, each named in a warning.

    Every float knob must be finite: NaN and inf are refused at construction, naming the flag.
    """

    # the fields whose JSON strings (command line) become dicts
    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*GRPOConfig._VALID_DICT_FIELDS, "teacher_model_init_kwargs"]

    credit: str = field(
        default="rlsd",
        metadata={"help": "Token credit rule.", "choices": list(RULES)},
    )
    rlsd_lambda: float = field(
        default=DEFAULT_RLSD_LAMBDA,
        metadata={"help": "lam_0: weight of the clipped teacher ratio in the RLSD multiplier."},
    )
    rlsd_lambda_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps of linear warm-up of lam from 0 to lam_0."}
    )
    rlsd_lambda_decay_steps: int = field(
        default=50, metadata={"help": "Optimizer steps of linear decay of lam to 0 (0: constant lam_0)."}
    )
    rlsd_clip: float = field(
        default=DEFAULT_RLSD_CLIP, metadata={"help": "eps_w: the teacher ratio is clipped to [1 - eps_w, 1 + eps_w]."}
    )
    rlsd_negative_only: bool = field(
        default=False, metadata={"help": "Reweight only completions with negative advantage."}
    )
    rlsd_span: str = field(
        default="all",
        metadata={
            "help": "Tokens the teacher may reweight: all, or think (inside <think>...</think>).",
            "choices": list(SPANS),
        },
    )
    teacher: str = field(
        default=DEFAULT_TEACHER,
        metadata={"help": "Self-teacher weights.", "choices": list(TEACHER_KINDS)},
    )
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Name or path of a frozen external teacher (same tokenizer) in place of the self-teacher."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of the external teacher's from_pretrained (JSON on the command line)."},
    )
    mad_opd_teachers: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "MAD-OPD: further frozen external teachers beside teacher_model (a JSON list or comma-separated "
            "names); the distillation term becomes their confidence-weighted sum."
        },
    )
    mad_opd_confidence: str = field(
        default="sampled_logp",
        metadata={"help": "MAD-OPD teacher confidence per token.", "choices": list(MAD_CONFIDENCES)},
    )
    mad_opd_temperature: float = field(
        default=1.0, metadata={"help": "MAD-OPD: temperature of the softmax over teachers of their confidence."}
    )
    teacher_sync_steps: int = field(
        default=10, metadata={"help": "With teacher='synced': optimizer steps between hard copies."}
    )
    teacher_ema_decay: float = field(
        default=0.95, metadata={"help": "With teacher='ema': teacher <- decay * teacher + (1 - decay) * policy."}
    )
    teacher_backend: str = field(
        default="trainer",
        metadata={"help": "Teacher log-probs: the trainer's forward or vLLM's.", "choices": ["trainer", "vllm"]},
    )
    teacher_prefix_sharing: bool = field(
        default=False, metadata={"help": "Compute each group's teacher prompt once and reuse its KV cache."}
    )
    teacher_offload: bool = field(
        default=False, metadata={"help": "Keep the teacher's own weights on the CPU between uses (no-op on CPU)."}
    )
    distill_loss: str = field(
        default="none", metadata={"help": "Distillation term beside the policy loss.", "choices": list(DISTILL_LOSSES)}
    )
    distill_coef: float | None = field(
        default=None, metadata={"help": "Weight of the distillation term (None: 0.001 for sdpg, else 1.0)."}
    )
    distill_positive_only: bool = field(default=False, metadata={"help": "Distill only completions with A > 0."})
    distill_chunk_tokens: int = field(default=1024, metadata={"help": "Tokens projected to the vocabulary at once."})
    distill_overlap_k: int = field(
        default=16, metadata={"help": "k of the logged rlsd/topk_overlap of the distilled tokens (0: off)."}
    )
    teacher_aligned_prompts: float = field(
        default=0.0,
        metadata={
            "help": "Keep only this fraction of the training prompts, those with the highest teacher-student top-k "
            "overlap on the student's greedy continuation (0: off; costs a generation per prompt at start)."
        },
    )
    sdpg_ref_coef: float = field(default=0.001, metadata={"help": "SDPG alpha: 0.5 (log pi/pi_ref)^2 weight."})
    policy_loss_coef: float = field(default=1.0, metadata={"help": "Weight of TRL's loss (0: distillation only)."})
    teacher_rollout_loss: str = field(
        default="none",
        metadata={
            "help": f"Term learned from teacher rollouts: {', '.join(ROLLOUT_LOSSES)}.",
            "choices": list(ROLLOUT_LOSSES),
        },
    )
    teacher_rollouts: int = field(default=4, metadata={"help": "N: teacher completions generated per prompt."})
    teacher_rollout_coef: float | None = field(
        default=None, metadata={"help": "Weight of the teacher-rollout term (None: the term's default)."}
    )
    stages: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Sparse-to-Dense stage schedule: a JSON list of {until_step, credit, distill_loss, ...} overrides "
            "by optimizer step (the last may omit until_step)."
        },
    )
    privileged_source: str = field(
        default="answer",
        metadata={"help": "Teacher context: answer, sibling, both or none.", "choices": list(SOURCES)},
    )
    sibling_reward_threshold: float = field(
        default=1.0, metadata={"help": "Reward at which a sibling completion counts as successful."}
    )
    privileged_column: str = field(
        default="solution", metadata={"help": "Dataset column with the privileged reference answer."}
    )
    teacher_template: str | None = field(
        default=None,
        metadata={"help": "Teacher prompt with {prompt}, {answer} and/or {sibling} (None: the source's default)."},
    )
    teacher_transform: str | None = field(
        default=None,
        metadata={"help": "A registered teacher-side input transform (rlsd.context.transforms); None: no transform."},
    )
    reward_timeout: float = field(
        default=DEFAULT_REWARD_TIMEOUT_S,
        metadata={"help": "Seconds one reward-function call may take before the run stops naming it (0: no bound)."},
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint missing its optimizer / scheduler / RNG / teacher state: load the "
            "weights and step, start the rest fresh (each named in a warning)."
        },
    )

    def __getattr__(self, name: str) -> Any:
        """A knob registered after this class was built (a rule, loss or teacher-rollout term declared in user code)
        that this config was not given: its declared default, so that every reader sees every registered knob."""
        knob = KNOBS.get(name) or LOSS_KNOBS.get(name) or TERM_KNOBS.get(name) or SOURCE_KNOBS.get(name)
        if knob is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return knob.default

    def __post_init__(self) -> None:
        """Every field checked and the dependent defaults filled in (`rlsd.config_checks`): the numbers before
        `GRPOConfig`'s own checks, the rest after them."""
        check_numbers(self)
        super().__post_init__()
        check_fields(self)


def _knob_docs(knobs: dict[str, Knob]) -> str:
    """The docstring entries of `knobs`, in the style of the fields above."""
    return "".join(
        f"        {key} (`{type(knob.default).__name__}`, *optional*, defaults to `{knob.default}`):\n"
        + textwrap.fill(knob.help, 119, initial_indent=" " * 12, subsequent_indent=" " * 12)
        + "\n"
        for key, knob in knobs.items()
    )


def _registry_docs(registry: Mapping[str, Any], coef: str) -> str:
    """The docstring entries of the registered distillation losses or teacher-rollout terms: description, knobs, the
    default of their coefficient `coef`."""
    return "".join(
        f'        "{name}":\n'
        + textwrap.fill(f"{item.doc} Knobs: {', '.join(item.knobs) or 'none'}; {coef} defaults to "
                        f"{item.default_coef}.", 119, initial_indent=" " * 12, subsequent_indent=" " * 12)
        + "\n"
        for name, item in registry.items()
    )  # fmt: skip


RLSDConfig.__doc__ = (RLSDConfig.__doc__ or "").rstrip() + "\n\n    Rule knobs (declared in `rlsd.core.rules`):\n"
RLSDConfig.__doc__ += _knob_docs(KNOBS)
RLSDConfig.__doc__ += "\n    Distillation losses (`distill_loss`, declared in `rlsd.core.distill`):\n"
RLSDConfig.__doc__ += _registry_docs(LOSSES, "distill_coef")
RLSDConfig.__doc__ += "\n    Distillation knobs (declared with their loss):\n" + _knob_docs(LOSS_KNOBS)
RLSDConfig.__doc__ += "\n    Teacher-rollout terms (`teacher_rollout_loss`, declared in `rlsd.step.rollout_term`):\n"
RLSDConfig.__doc__ += _registry_docs(TERMS, "teacher_rollout_coef")
RLSDConfig.__doc__ += "\n    Teacher-rollout knobs (declared with their term):\n" + _knob_docs(TERM_KNOBS)
RLSDConfig.__doc__ += "\n    Privileged-source knobs (declared with their source):\n" + _knob_docs(SOURCE_KNOBS)
RLSDConfig.__doc__ += "\n    NPO knobs (`rlsd.teachers.near_future`):\n" + _knob_docs(NPO_KNOBS)
_FIELDS = frozenset(item.name for item in dataclasses.fields(RLSDConfig))


def _taking_late_knobs(init: Callable[..., None]) -> Callable[..., None]:
    """`RLSDConfig.__init__` that also takes, as keyword arguments, the knobs registered after the class was built
    (rules, losses and terms declared in user code, which imports `rlsd` and so this module first): each is set as an
    attribute before the dataclass fields, so that `__post_init__` checks it with the others. Not a dataclass
    field: the command line, `to_dict` and `dataclasses.replace` do not carry it."""

    @functools.wraps(init)
    def __init__(self: RLSDConfig, *args: Any, **kwargs: Any) -> None:
        registered = KNOBS.keys() | LOSS_KNOBS.keys() | TERM_KNOBS.keys() | SOURCE_KNOBS.keys()
        for key in [key for key in kwargs if key not in _FIELDS and key in registered]:
            setattr(self, key, kwargs.pop(key))
        init(self, *args, **kwargs)

    return __init__


RLSDConfig.__init__ = _taking_late_knobs(RLSDConfig.__init__)  # type: ignore[method-assign]
