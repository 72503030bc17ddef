"""Refusals and guards of `RLSDTrainer`, as functions of values (a model, datasets, flags, the config), never the
trainer: construction-time refusals of what a configured term would silently compute wrong (naming the option, the
setting and what to use instead), and the non-finite step guard's diagnosis (the parameter, the changed knobs)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOConfig

from rlsd.context import vision
from rlsd.context.sources import get_source
from rlsd.context.transforms import check_dataset_transform, check_images_to_transform
from rlsd.infra.validate import NonFiniteError

LOGIT_RESCALING = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def check_plain_lm_head(model: torch.nn.Module, option: str) -> None:
    """`option` builds logits as head(h) / temperature from hidden states: a model that caps or rescales its logits
    (Gemma-2's softcapping, Cohere's or Granite's scales) would be distilled on logits it never produces: refused."""
    config = model.config.get_text_config()
    for name in LOGIT_RESCALING:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"{option} needs a plain LM head, but {config.model_type} sets {name}={value}; "
                "use a token-advantage rule (credit=...) for this model"
            )


def check_no_attention_dropout(model: torch.nn.Module) -> None:
    """Attention dropout applied inside the attention function (not an `nn.Dropout`, which TRL's disable_dropout
    zeroes) would make the student's train-mode log-probs noisy against the teacher's: refused."""
    for name, module in model.named_modules():
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, float) and rate > 0.0:
            raise ValueError(
                f"{name or type(model).__name__} has attention_dropout={rate}; with a self-teacher, Delta would carry "
                "dropout noise: load the model with attention_dropout=0.0 in its config"
            )


def check_before_deepspeed(option: str, zero_stage: int | None) -> None:
    """`option` runs the policy inside the trainer's construction, before `deepspeed.initialize`: under ZeRO-3 a policy
    loaded with `zero.Init` has empty, not yet gathered parameters there, so it cannot run: refused."""
    if zero_stage == 3:
        raise NotImplementedError(
            f"{option} generates with the policy while the trainer is built, before DeepSpeed ZeRO-3 can gather its "
            "partitioned parameters; select the prompts in a run without ZeRO-3 (ZeRO-2, FSDP2 or one device) and "
            "train on the dataset it keeps, or drop the option"
        )


@dataclass(frozen=True)
class RunFacts:
    """What the trainer knows of a run once TRL has built it: the inputs and the engines it runs on."""

    has_images: bool  # a training or eval split has an image column
    is_vlm: bool  # the processing class is a processor
    tools: bool
    environment_factory: bool
    rollout_func: bool
    zero_stage: int | None  # DeepSpeed's ZeRO stage, None without DeepSpeed


def check_run_supported(
    args: Any, policy: torch.nn.Module, datasets: dict[str, Any], *, teacher: bool, distill: bool, facts: RunFacts
) -> None:
    """Every construction-time refusal of a run that uses a `teacher` (and a `distill`ation loss): images and
    rollouts the teacher would not see, logit scaling and ZeRO-3 under distillation, attention dropout."""
    if not teacher:
        return
    check_vision_supported(datasets, args, has_images=facts.has_images, is_vlm=facts.is_vlm, tools=facts.tools,
                           environment_factory=facts.environment_factory, rollout_func=facts.rollout_func)  # fmt: skip
    check_rollout_supported(args, environment_factory=facts.environment_factory, rollout_func=facts.rollout_func)
    if distill:
        check_plain_lm_head(policy, "distill_loss")
        if facts.zero_stage == 3:
            raise NotImplementedError(
                "distill_loss projects the captured hidden states through the LM head after the forward, which "
                "ZeRO-3 has re-partitioned; use FSDP2 or ZeRO-2, or a token-advantage rule (credit=...)"
            )
    check_no_attention_dropout(policy)


def check_vision_supported(
    datasets: dict[str, Any],
    args: Any,
    *,
    has_images: bool,
    is_vlm: bool,
    tools: bool,
    environment_factory: bool,
    rollout_func: bool,
) -> None:
    """With a teacher, images are supported from an `image`/`images` column (the prompts may hold TRL's empty image
    placeholders) with a processor and single-turn rollouts; image blocks in the prompts of a split of `datasets`
    (`train_dataset`, `eval_dataset`) without an image column, a plain tokenizer, tools, environments or a rollout
    function are refused (the teacher, or TRL's own scoring, would not see the images)."""
    for split_name in ("train_dataset", "eval_dataset"):
        split = datasets.get(split_name)
        if vision.prompts_hold_images(split) and not vision.image_dataset(split):
            raise ValueError(vision.IMAGE_BLOCKS_ERROR.format(where=split_name))
    check_images_to_transform(getattr(args, "teacher_transform", None), has_images)
    if not has_images:
        return
    for split_name in ("train_dataset", "eval_dataset"):  # the transform on every row with images, before any step
        check_dataset_transform(datasets.get(split_name), getattr(args, "teacher_transform", None), split_name)
    what = vision.teacher_use(args)
    if not is_vlm:
        raise ValueError(vision.TOKENIZER_WITH_IMAGES_ERROR.format(what=what))
    used = {"tools": tools, "environment_factory": environment_factory, "rollout_func": rollout_func}
    unsupported = [name for name, on in used.items() if on]
    if unsupported:
        raise NotImplementedError(
            f"images with {' and '.join(unsupported)} and {what}: the teacher's prompt is rebuilt from the "
            "dataset row and would miss the images or observations added during the rollout; use credit='grpo' "
            "and distill_loss='none' for this run, or drop the image column"
        )


def check_rollout_supported(args: Any, *, environment_factory: bool, rollout_func: bool) -> None:
    """Multi-turn rollouts are supported: the teacher's prompt is the one the rollout used (an environment's `reset`
    observation and tool schema included), it scores [teacher prompt ; completion] with the tool results in place, and
    only the model's tokens (`tool_mask`, a rollout function's `env_mask`) enter the credit and the losses
    (`rlsd.step.turns`). Refused with environments or a rollout function: what builds prompts of its own outside the
    rollout (teacher rollouts, teacher-aligned prompt selection, a source that generates its context with a model
    under environments, whose tool schemas TRL renders per rollout row). Images a tool returns are in the completion
    (TRL's tool loop renders them and adds their pixels to the rollout's images), which the teacher scores with them
    (`rlsd.context.vision.teacher_vision_kwargs`); tools with a dataset's image column are refused by
    `check_vision_supported`."""
    used = [name for name, on in (("environment_factory", environment_factory), ("rollout_func", rollout_func)) if on]
    if not used:
        return
    blocked = {
        f"teacher_rollout_loss={args.teacher_rollout_loss!r}": args.teacher_rollout_loss != "none",
        f"teacher_aligned_prompts={args.teacher_aligned_prompts}": args.teacher_aligned_prompts > 0,
        f"privileged_source={args.privileged_source!r}": environment_factory
        and get_source(args.privileged_source).needs_generator,
    }
    refused = [name for name, on in blocked.items() if on]
    if refused:
        raise NotImplementedError(
            f"{' and '.join(refused)} with {' and '.join(used)}: it builds prompts of its own outside the rollout, "
            "which would miss what the environment or rollout function shows the student; drop the option (the "
            "teacher's token credit and distillation losses work with these rollouts)"
        )


def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or inf (None when none is found)."""
    try:
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                return name
    except RuntimeError:  # a sharded gradient that cannot be checked locally
        return None
    return None


def check_finite_loss(loss: torch.Tensor, batch: dict[str, Any], step: int, fix: str) -> None:
    """Stop training step `step` before its backward pass when its loss is NaN or inf, naming the float entries of
    `batch` that are not finite and `fix` (`nonfinite_fix`)."""
    if torch.isfinite(loss.detach()).all():
        return
    bad = [k for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    found = f" (not finite in the batch: {', '.join(bad)})" if bad else ""
    raise NonFiniteError(f"training step {step}", f"the loss is {loss.item()}{found}", fix)


def check_finite_grad_norm(norm: Any, model: torch.nn.Module, step: int, fix: str) -> None:
    """Stop training step `step` before the optimizer applies a NaN or inf gradient norm, naming the first parameter
    whose gradient is not finite and `fix` (`nonfinite_fix`)."""
    value = float(norm) if norm is not None else 0.0
    if math.isfinite(value):
        return
    name = first_nonfinite_grad(model)
    where = f" (first in {name})" if name else ""
    raise NonFiniteError(f"training step {step}", f"the gradient norm is {value}{where}", fix)


def changed_knobs(args: Any, config_class: type) -> str:
    """The numeric knobs `config_class` (RLSD's config; passed, since the config imports this module's importers)
    adds to `GRPOConfig` that `args` sets away from their defaults, as `name=value` (for non-finite step errors)."""
    own = {f.name for f in dataclasses.fields(config_class)} - {f.name for f in dataclasses.fields(GRPOConfig)}
    changed = []
    for item in dataclasses.fields(args):
        value = getattr(args, item.name)
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if item.name in own and numeric and value != item.default:
            changed.append(f"{item.name}={value}")
    return ", ".join(changed)


def nonfinite_fix(args: Any, config_class: type) -> str:
    """How to fix a non-finite step: what was not applied, and the knobs this run changed from their defaults."""
    changed = changed_knobs(args, config_class)
    return (
        "nothing from this step was applied or saved and the last checkpoint is intact; check the learning rate"
        + (f", the knobs this run changed ({changed})" if changed else "")
        + " and the rewards of this batch, then resume"
    )
