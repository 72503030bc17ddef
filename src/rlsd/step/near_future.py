"""NPO's slot replacement (Near-Future Policy Optimization, arXiv 2604.20733): in a training rollout, each hard group
(at most `npo_max_group_accuracy` of its completions succeed; by default, all fail) has up to `npo_slots` of its last
slots (the paper: one) replaced by verified-correct rollouts among `npo_guide_samples` of the near-future guide
(`rlsd.teachers.near_future`), rewards and group advantages recomputed as TRL computes them; the RL objective is
unchanged and, as in the paper, no importance correction is applied to the guide's rollouts. AutoNPO's choice of
checkpoint (`choose_lookahead`) and the trigger's histories are fed from here too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from trl.trainer.utils import pad

from rlsd.core.rollout_losses import completion_mask
from rlsd.data.rewards import reward_totals

MISTAKE_POOL = 32
"""AutoNPO's mistake pool: the latest hard prompts kept to measure each candidate's Q and V."""


def hard_groups(rewards: Tensor, group_size: int, success: float, max_accuracy: float) -> Tensor:
    """(n_groups,) bool: the groups of consecutive `group_size` rows whose fraction of rewards >= `success` is at most
    `max_accuracy`."""
    solved = (rewards.view(-1, group_size) >= success).float().mean(dim=1)
    return solved <= max_accuracy


def replacement_rows(hard: Tensor, verified: Tensor, group_size: int, slots: int = 1) -> tuple[Tensor, Tensor]:
    """The rows replaced and the guide rollouts that replace them: hard group g with guide samples `verified[g]`
    ((n_groups, samples) bool) gives its first k = min(verified, `slots`) verified samples to its last k slots, one
    slot per sample; a group that is not hard, none. Returns (rows (N,), sample indices (N,) into the flattened
    (n_groups * samples) guide rollouts)."""
    rows, picks = [], []
    samples = verified.size(1)
    for group in torch.nonzero(hard).flatten().tolist():
        good = torch.nonzero(verified[group]).flatten().tolist()[:slots]
        for k, sample in enumerate(good):
            rows.append(group * group_size + group_size - 1 - k)
            picks.append(group * samples + sample)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(picks, dtype=torch.long)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str) -> Tensor:
    """TRL 1.16's GRPO advantages of (B,) total rewards: minus the group mean, divided by the group's ("group") or
    the batch's ("batch") standard deviation + 1e-4, or not ("none")."""
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale_rewards == "group":
        return centred / (grouped.std(dim=1).repeat_interleave(group_size) + 1e-4)
    if scale_rewards == "batch":
        return centred / (rewards.std() + 1e-4)
    return centred


def splice(ids: Tensor, mask: Tensor, rows: Tensor, new_ids: Tensor, new_mask: Tensor, pad_id: int) -> tuple:
    """Completion ids and mask with `rows` replaced by `new_ids` / `new_mask` (right-padded to the wider of both)."""
    width = max(ids.size(1), new_ids.size(1))
    ids, mask = _widen(ids, width, pad_id), _widen(mask, width, 0)
    ids[rows], mask[rows] = _widen(new_ids, width, pad_id).to(ids), _widen(new_mask, width, 0).to(mask)
    return ids, mask


def _widen(x: Tensor, width: int, value: int) -> Tensor:
    """`x` (B, T) right-padded with `value` to `width` columns (a copy)."""
    return torch.nn.functional.pad(x, (0, width - x.size(1)), value=value).clone()


def choose_lookahead(stats: dict[int, tuple[float, float]]) -> int:
    """AutoNPO's guide: the Delta whose (Q, V) gives the largest S = Q / V (ties to the nearer checkpoint; with no
    correct trajectory anywhere, the farthest)."""
    if all(q <= 0 for q, _ in stats.values()):
        return max(stats)
    return max(sorted(stats), key=lambda delta: stats[delta][0] / max(stats[delta][1], 1e-8))


@dataclass
class NearFutureSlots:
    """The rollout side of NPO: records the trigger's signals, picks AutoNPO's checkpoint and fills hard groups."""

    run: Any  # `rlsd.step.wiring.RunView`
    guide: Any  # `rlsd.teachers.near_future.NearFutureTeacher`

    def intervene(self, inputs: list[dict[str, Any]], output: dict[str, Any], tap: Any) -> int:
        """Apply NPO to a training rollout in place; returns how many rows it replaced."""
        args, group = self.run.args, self.run.group_sizes[0]
        if "tool_mask" in output:
            raise ValueError("NPO's guide rollouts are single-turn: tools and environments are not supported")
        rewards = tap.rewards.to(output["completion_ids"].device).float()
        hard = hard_groups(rewards, group, args.npo_success_reward, args.npo_max_group_accuracy)
        if self.guide.phase == "wait":
            self.guide.observe(rewards.mean().item(), self._entropy(output) if args.npo_trigger == "auto" else None)
            for g in torch.nonzero(hard).flatten().tolist():
                self.guide.mistakes.append((inputs[g * group], tap.prompts[g * group]))
            del self.guide.mistakes[:-MISTAKE_POOL]
        if self.guide.phase == "choose":
            self._choose()
        replaced = 0
        if self.guide.phase == "guide" and bool(hard.any()):
            replaced = self._fill(inputs, output, tap, rewards, hard)
        metrics = {
            "npo/hard_groups": float(hard.sum()),
            "npo/replaced": float(replaced),
            "npo/guiding": float(self.guide.phase == "guide"),
            "npo/lookahead": float(self.guide.lookahead),
        }
        self.run.log("train", metrics)
        return replaced

    def _fill(self, inputs: list, output: dict, tap: Any, rewards: Tensor, hard: Tensor) -> int:
        """Sample `npo_guide_samples` guide rollouts per hard group, verify them, splice up to `npo_slots` correct
        ones in."""
        args, group, samples = self.run.args, self.run.group_sizes[0], self.run.args.npo_guide_samples
        hard_ids = torch.nonzero(hard.cpu()).flatten()  # only the hard groups' prompts go to the guide
        prompt_rows = (hard_ids * group).repeat_interleave(samples)
        ids, mask = self._generate(output["prompt_ids"][prompt_rows], output["prompt_mask"][prompt_rows])
        picked = prompt_rows.tolist()
        totals = self._rewards([inputs[r] for r in picked], [tap.prompts[r] for r in picked], ids, mask)
        verified = torch.zeros(hard.numel(), samples, dtype=torch.bool)
        verified[hard_ids] = (totals >= args.npo_success_reward).view(-1, samples).cpu()
        rows, picks = replacement_rows(hard.cpu(), verified, group, args.npo_slots)
        if rows.numel() == 0:
            return 0
        position = torch.full((hard.numel(),), -1, dtype=torch.long)
        position[hard_ids] = torch.arange(hard_ids.numel())
        picks = position[picks // samples] * samples + picks % samples  # into the hard groups' rollouts
        pad_id = self.run.tokenizer.pad_token_id
        output["completion_ids"], output["completion_mask"] = splice(
            output["completion_ids"], output["completion_mask"], rows, ids[picks], mask[picks], pad_id
        )
        rewards = rewards.clone()
        rewards[rows] = totals[picks].to(rewards)
        advantages = group_advantages(rewards, group, args.scale_rewards)
        output["advantages"] = advantages.to(output["advantages"])
        output["num_items_in_batch"] = output["completion_mask"].sum().to(output["num_items_in_batch"])
        tap.rewards = rewards
        return rows.numel()

    @torch.no_grad()
    def _generate(self, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The guide's completions of left-padded prompts, cut after their first end-of-sequence token."""
        model = self.guide.model
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.run.generation_config)  # fmt: skip
        completion = sequences[:, prompt_ids.size(1) :]
        keep = completion_mask(completion, self.run.eos_token_ids)
        return completion * keep + self.run.tokenizer.pad_token_id * (1 - keep), keep

    def _rewards(self, inputs: list, prompts: Sequence[Any], ids: Tensor, mask: Tensor) -> Tensor:
        """The weighted total reward of each guide completion, from the run's reward functions (TRL's own)."""
        kept = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        texts = self.run.tokenizer.batch_decode(kept, skip_special_tokens=True)
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        per_func = self.run.trl_rewards(inputs, list(prompts), completions, kept)
        return reward_totals(per_func, self.run.reward_weights).float()

    @torch.no_grad()
    def _logps(self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor,
               entropy: bool = False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Per-token log-probs (and entropies) of completions under `model`, TRL's own forward."""
        logps, entropies, *_ = self.run.trl_logps(
            model, torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask.to(prompt_mask)], 1), ids.size(1),
            compute_entropy=entropy,
        )  # fmt: skip
        return logps, entropies

    def _entropy(self, output: dict[str, Any]) -> float:
        """The policy's mean token entropy over the rollout's completions (AutoNPO's entropy signal)."""
        mask = output["completion_mask"]
        _, entropies = self._logps(self.run.model(), output["prompt_ids"], output["prompt_mask"],
                                   output["completion_ids"], mask, entropy=True)  # fmt: skip
        return float((entropies * mask).sum() / mask.sum().clamp(min=1))

    def _choose(self) -> None:
        """AutoNPO's checkpoint: for each candidate Delta, Q = the fraction of the mistake pool it solves and V = the
        mean squared importance ratio pi_current / pi_guide over its correct tokens; adopt the largest Q / V."""
        pool = self.guide.mistakes or []
        stats: dict[int, tuple[float, float]] = {}
        if pool:
            ids_list, _, _ = self.run.tokenize_prompts([prompt for _, prompt in pool])
            pad_id = self.run.tokenizer.pad_token_id
            prompt_ids = pad([torch.tensor(x) for x in ids_list], padding_value=pad_id, padding_side="left")
            prompt_mask = pad([torch.ones(len(x), dtype=torch.long) for x in ids_list], padding_value=0,
                              padding_side="left")  # fmt: skip
            device = next(self.guide.model.parameters()).device
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            for delta in sorted(self.guide.candidates):
                self.guide.load_candidate(delta)
                ids, mask = self._generate(prompt_ids, prompt_mask)
                correct = self._rewards([row for row, _ in pool], [p for _, p in pool], ids, mask)
                correct = correct >= self.run.args.npo_success_reward
                q, v = float(correct.float().mean()), 1.0
                if correct.any():
                    rows = torch.nonzero(correct).flatten()
                    args = (prompt_ids[rows], prompt_mask[rows], ids[rows], mask[rows])
                    guide_logps, _ = self._logps(self.guide.model, *args)
                    policy_logps, _ = self._logps(self.run.model(), *args)
                    m = mask[rows].float()
                    ratio_sq = torch.exp(2 * (policy_logps - guide_logps)) * m
                    v = float(ratio_sq.sum() / m.sum().clamp(min=1))
                stats[delta] = (q, v)
        best = choose_lookahead(stats) if stats else max(self.guide.candidates)
        self.guide.choice_stats = stats  # (Q, V) by Delta, for diagnostics
        self.guide.adopt(best)
