"""RLSD's credit registered as verl's distillation loss `rlsd` (verl 0.9.1).

verl imports every `verl.plugins` entry point when `verl` is imported (in the driver and in every Ray worker); this
project's entry point is this module, which registers the loss, so that `distillation.distillation_loss.loss_mode=rlsd`
validates like verl's own losses. The loss is a single-sample one (`use_estimator=True`: the teacher serves the sampled
token's log-prob, vLLM's `prompt_logprobs=0`). Per token it returns A_i - A_it (`rlsd.engines.verl_loss`), so that
verl's update, driven by A_i - loss_t, is RLSD's with lam = `DEFAULT_RLSD_LAMBDA` held constant (verl passes no
optimizer step to a loss: this is `RLSDConfig` with `rlsd_lambda_decay_steps=0`) and eps_w = `DEFAULT_RLSD_CLIP`;
`register_rlsd_loss` registers other values under other names. Delta_t reads the student's log-probs of the rollout
batch (`old_log_probs`), as the project's credit is fixed at rollout time. Exact with one update per rollout batch
(the PPO ratio is 1); with several, verl clips the task and the distillation surrogates separately, which is not
RLSD's single clipped surrogate of A_it.

Imported without verl (the library's import walk), it registers nothing; verl only ever loads it with verl present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlsd.core.credit import DEFAULT_RLSD_CLIP, DEFAULT_RLSD_LAMBDA
from rlsd.engines.verl_loss import rlsd_distillation_losses

try:
    from verl.trainer.distillation import losses as verl_losses
    from verl.workers.utils.padding import no_padding_2_padding
except ModuleNotFoundError:  # verl is not installed: nothing to register into
    verl_losses = None

RLSD_LOSS = "rlsd"
"""The name verl's `DistillationLossConfig.loss_mode` selects."""
VerlLoss = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def padded(tensor: torch.Tensor, fill: float) -> torch.Tensor:
    """A (B, T) tensor from verl's micro-batch field, nested (jagged) or already padded."""
    return tensor.to_padded_tensor(fill) if tensor.is_nested else tensor


def check_composition(config: Any, distillation_config: Any) -> None:
    """Refuse, by name, a verl setting under which A_i - loss_t is not the token advantage of verl's update."""
    loss = distillation_config.distillation_loss
    wrong = []
    if not loss.use_policy_gradient:
        wrong.append("distillation.distillation_loss.use_policy_gradient must be True (the loss is a reward)")
    if not loss.use_task_rewards:
        wrong.append("distillation.distillation_loss.use_task_rewards must be True (RLSD reweights A_i)")
    if loss.distillation_loss_coef != 1.0:
        wrong.append(
            f"distillation.distillation_loss.distillation_loss_coef must be 1.0, got {loss.distillation_loss_coef}"
        )
    policy_loss = config.policy_loss.get("loss_mode", "vanilla") if config.policy_loss is not None else "vanilla"
    if policy_loss != "vanilla":
        wrong.append(
            f"actor.policy_loss.loss_mode must be 'vanilla' (the surrogate verl composes), got {policy_loss!r}"
        )
    if wrong:
        raise ValueError(f"loss_mode={RLSD_LOSS!r}: " + "; ".join(wrong))


def make_rlsd_loss(lam: float = DEFAULT_RLSD_LAMBDA, clip: float = DEFAULT_RLSD_CLIP) -> VerlLoss:
    """verl's distillation-loss function for RLSD with constant `lam` and `clip` (eps_w)."""

    def rlsd_loss(
        config: Any, distillation_config: Any, model_output: dict[str, Any], data: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, T) loss_t = A_i - A_it and RLSD's metrics, from verl's no-padding micro-batch."""
        check_composition(config, distillation_config)
        mask = padded(data["response_mask"], 0).bool()
        teacher = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)
        student = padded(data["old_log_probs"], 0.0)
        advantages = padded(data["advantages"], 0.0)
        losses, metrics = rlsd_distillation_losses(advantages, teacher, student, mask, lam=lam, clip=clip)
        clamp = distillation_config.distillation_loss.loss_max_clamp
        if clamp is not None and bool((losses.abs() > clamp).any()):
            raise ValueError(
                f"loss_mode={RLSD_LOSS!r}: |loss_t| reaches {losses.abs().max().item():.3g}, beyond distillation."
                f"distillation_loss.loss_max_clamp={clamp}, which would change RLSD's credit (set it to null)"
            )
        return losses.to(student.device), metrics

    return rlsd_loss


def register_rlsd_loss(
    name: str = RLSD_LOSS, *, lam: float = DEFAULT_RLSD_LAMBDA, clip: float = DEFAULT_RLSD_CLIP
) -> None:
    """Register RLSD with `lam` and `clip` as verl's distillation loss `name` (a user's own plug-in may register
    other values under other names)."""
    if verl_losses is None:
        raise ImportError("registering an RLSD loss in verl needs verl: pip install verl==0.9.1")
    settings = verl_losses.DistillationLossSettings(names=[name], use_estimator=True)
    verl_losses.register_distillation_loss(settings)(make_rlsd_loss(lam, clip))


if verl_losses is not None and RLSD_LOSS not in verl_losses.DISTILLATION_LOSS_REGISTRY:
    register_rlsd_loss()
