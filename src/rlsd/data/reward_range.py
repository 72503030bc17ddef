"""The rewards' range, checked where TRL turns them into advantages (issue 27).

TRL stores every reward as a float32 and computes the group statistics in float32: a reward of 1e308 becomes inf,
and rewards of 1e20 square past float32's range in the group standard deviation. TRL then maps the resulting NaN
advantages to 0 (`nan_to_num`), so the step silently learns nothing from those groups. `check_reward_statistics`
recomputes TRL's statistics of a batch of rewards (the weighted totals, each group's mean and standard deviation, the
advantages) and stops the run when one is infinite, naming the reward function(s) and the rows responsible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlsd.infra.validate import RewardError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""Largest float32 (about 3.4e38): TRL holds rewards as float32, so a larger magnitude becomes inf."""
RANGE_FIX = "return rewards of moderate size (|r| well below 1e18, e.g. in [-1, 1] or [0, 1]), or None to abstain"


def check_reward_range(value: float, name: str, row: int) -> None:
    """Refuse one reward whose magnitude float32 cannot hold (TRL would store it as inf), naming function and row."""
    if abs(value) > FLOAT32_MAX:
        shown = f"{value:g}" if isinstance(value, float) else f"an integer of {len(str(abs(int(value))))} digits"
        raise RewardError(name, f"returned {shown} at row {row}, beyond float32's range (|r| <= 3.4e38) in which "
                                "TRL computes the advantages", RANGE_FIX)  # fmt: skip


def group_statistics(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> dict[str, torch.Tensor]:
    """TRL's statistics of (B, n_funcs) float32 rewards (`GRPOTrainer._generate_and_score_completions`), each per row
    ((B,), or (B, n_funcs) for the per-function ones of "normalize_then_sum"): the weighted totals, the
    group means, the standard deviations that scale the advantages (only when `scale_rewards` scales them) and the
    advantages before TRL maps NaN to 0. NaN marks rows without a value (every function abstained, a group with one
    scored row)."""
    rewards_per_func = rewards_per_func.float()
    weights = weights.to(rewards_per_func.device, torch.float32)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    stats: dict[str, torch.Tensor] = {}
    if aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, group_size, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_k)
        scaled = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
        stats["group means"] = mean_k.expand_as(grouped).reshape(-1, rewards_per_func.shape[1])
        stats["standard deviations"] = std_k.expand_as(grouped).reshape(-1, rewards_per_func.shape[1])
        totals = (scaled * weights.unsqueeze(0)).nansum(dim=1)
        totals[unscorable] = torch.nan
        stats["weighted totals"] = totals
        std = nanstd(totals).expand_as(totals) if totals.numel() > 1 else torch.zeros_like(totals)
        stats["advantages"] = (totals - torch.nanmean(totals)) / (std + 1e-4)
        return stats
    totals = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    totals[unscorable] = torch.nan
    stats["weighted totals"] = totals
    means = torch.nanmean(totals.view(-1, group_size), dim=1).repeat_interleave(group_size)
    stats["group means"] = means
    advantages = totals - means
    if scale_rewards != "none":
        if scale_rewards == "batch":
            std = nanstd(totals).expand_as(totals) if totals.numel() > 1 else torch.zeros_like(totals)
        elif group_size > 1:
            std = nanstd(totals.view(-1, group_size), dim=1).repeat_interleave(group_size)
        else:
            std = torch.zeros_like(totals)
        stats["standard deviations"] = std
        advantages = advantages / (std + 1e-4)
    stats["advantages"] = advantages
    return stats


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The standard deviation ignoring NaN, Bessel-corrected (NaN for fewer than two values), in the input's dtype:
    the formula of TRL's `nanstd` (the mean squared deviation times n / (n - 1)), so that it overflows where TRL's
    does."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=keepdim)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=keepdim)
    correction = torch.where(count > 1, count / (count - 1), torch.nan)  # NaN for fewer than two values
    return torch.sqrt(variance * correction)


def infinite_rows(stats: dict[str, torch.Tensor]) -> tuple[str, list[int]] | None:
    """The first statistic that is infinite somewhere, and the rows where it is; None when all are finite or NaN."""
    for label, values in stats.items():
        bad = torch.isinf(values)
        bad = bad.any(dim=1) if bad.dim() > 1 else bad
        if bad.any():
            return label, bad.nonzero().flatten().tolist()
    return None


def check_reward_statistics(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    names: Sequence[str],
    group_size: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> None:
    """Stop the run when TRL's float32 statistics of this batch's rewards (`group_statistics`) hold an inf: a reward
    beyond float32, totals, group means or standard deviations that overflow, or an infinite advantage. The error
    names the reward function(s) responsible (those whose rewards alone overflow; else every function that scored
    those rows), the rows (global batch rows) and the largest reward there."""
    rewards_per_func = rewards_per_func.detach().float().cpu()
    if rewards_per_func.numel() == 0 or rewards_per_func.shape[0] % group_size:
        return
    weights = weights.detach().float().cpu()
    raw = torch.isinf(rewards_per_func)
    if raw.any():
        column = int(raw.any(dim=0).nonzero()[0])
        rows = raw[:, column].nonzero().flatten().tolist()
        raise RewardError(names[column], f"gave rewards beyond float32's range (|r| <= 3.4e38), infinite as TRL "
                                         f"stores them, at {_rows(rows)}", RANGE_FIX)  # fmt: skip
    found = infinite_rows(group_statistics(rewards_per_func, weights, group_size, scale_rewards, aggregation))
    if found is None:
        return
    label, rows = found
    culprits = []
    for column in range(rewards_per_func.shape[1]):
        alone = torch.full_like(rewards_per_func, torch.nan)
        alone[:, column] = rewards_per_func[:, column]
        if infinite_rows(group_statistics(alone, weights, group_size, scale_rewards, aggregation)) is not None:
            culprits.append(column)
    if not culprits:  # no function overflows alone: their sum does
        culprits = [c for c in range(rewards_per_func.shape[1]) if not torch.isnan(rewards_per_func[rows, c]).all()]
    values = rewards_per_func[rows][:, culprits]
    largest = float(values.nan_to_num(0.0).abs().max()) if values.numel() else 0.0
    others = [repr(names[c]) for c in culprits[1:]]
    together = f" (with {', '.join(others)})" if others else ""
    what = (f"gave rewards{together} whose {label} overflow float32 at {_rows(rows)} (largest |reward| there "
            f"{largest:.3g}): those groups' advantages would be wrong (TRL maps NaN ones to 0)")  # fmt: skip
    raise RewardError(names[culprits[0]] if culprits else "?", what, RANGE_FIX)


def _rows(rows: list[int]) -> str:
    """`row 3` or `rows 0, 1, 2, 3` (at most eight shown)."""
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return f"row {shown}" if len(rows) == 1 else f"rows {shown}"
