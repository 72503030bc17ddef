"""Construction-time refusals: model properties under which a configured term would silently compute something else.

Each check takes values (a model, the option that needs it), never the trainer, and raises naming the option, the
model's setting and what to use instead."""

from __future__ import annotations

import torch

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
