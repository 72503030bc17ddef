"""`TeacherRolloutTerm`: the orchestration of teacher rollouts (BRTS, PBSD; `teacher_rollout_loss`) for `RLSDTrainer`.
After TRL's rollout the teacher generates N completions per prompt and each row gets the teacher trajectory it learns
from (`RLSDEntries.rollout_*`); at loss time one more student forward on those trajectories gives the term added to
the policy loss. The math (selection, top-K KL, PBSD's loss) is in `rlsd.teacher_rollouts`. The term receives values
and callables, never the trainer: the TRL attributes and methods behind them are read where the trainer builds it
(`rlsd.trainer`'s seams table)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from trl.trainer.utils import pad

from rlsd.batch import RLSDEntries, loss_mask
from rlsd.config import RLSDConfig
from rlsd.credit import TokenMean
from rlsd.distill import head_logits
from rlsd.guards import check_plain_lm_head
from rlsd.privileged import AnswerSource, PrivilegedSource, RolloutView
from rlsd.rewards import reward_totals
from rlsd.scoring import ScoreResult
from rlsd.teacher import backbone_and_head
from rlsd.teacher_prompt import render_teacher_prompts
from rlsd.teacher_rollouts import (
    Candidates,
    chunked_topk_kl,
    completion_mask,
    distinct_rows,
    pair_index,
    pbsd_loss,
    select_brts,
    select_rollout,
    teacher_topk,
    trajectory_alignment,
)

TokenizePrompts = Callable[[list[Any]], tuple[list[list[int]], Any, Any]]
"""TRL's `_tokenize_prompts`: prompts rendered and tokenized as the rollout does -> (ids, images, fields)."""
TeacherPrompts = Callable[[list[dict[str, Any]], dict[str, Any], str, torch.Tensor], tuple[Any, ...]]
"""The trainer's `teacher_inputs(inputs, output, mode, rows)`: those rows' teacher prompts (ids, mask, ...)."""
ScoringModel = Callable[[str], contextlib.AbstractContextManager[torch.nn.Module]]
"""`Scorer.scoring_model(which)`: the module that scores for "teacher" or "student", for a `with` block."""
TrlLogps = Callable[..., tuple[torch.Tensor, torch.Tensor | None, Any]]
"""TRL's own `_get_per_token_logps_and_entropies` (model, input_ids, attention_mask, logits_to_keep, batch_size)."""
TrlRewards = Callable[[list[dict[str, Any]], list[Any], list[Any], list[list[int]]], torch.Tensor]
"""TRL's own `_calculate_rewards` (inputs, prompts, completions, completion_ids) -> (B_global, n_funcs), collective."""


@dataclass(frozen=True, kw_only=True)
class TeacherRolloutTerm:
    """BRTS / PBSD: the teacher's generation, the candidates' scoring and choice (`add`, after TRL's rollout), and the
    loss-time term (`term`). Built once by the trainer from what these read; `args` is read at each call."""

    accelerator: Accelerator
    args: RLSDConfig
    source: PrivilegedSource  # the run's privileged source: BRTS retries only when its prompts lack the answer
    tokenizer: Any  # the text tokenizer (pad id, decoding the trajectories for the reward functions)
    generation_config: Any  # TRL's `GenerationConfig`: the teacher samples with the run's settings
    eos_token_ids: list[int]  # the ids that end a completion
    temperature: float  # divides the logits of every scoring forward
    reward_weights: torch.Tensor  # the reward functions' weights in the total
    tokenize_prompts: TokenizePrompts
    teacher_inputs: TeacherPrompts
    scoring_model: ScoringModel
    score: Callable[..., ScoreResult]  # `Scorer.score` (the rule pass's scorer)
    trl_logps: TrlLogps
    trl_rewards: TrlRewards
    log: Callable[[str, dict[str, Any]], None]  # combines metrics over processes into TRL's `rlsd/` metrics
    group_size: Callable[[], int]  # completions per prompt in the current mode
    scoring_batch_size: Callable[[], int]  # rows per no-grad forward in the current mode
    training: Callable[[], bool]  # whether the policy is in training mode
    accumulation: Callable[[], int]  # HF's `current_gradient_accumulation_steps`

    @staticmethod
    def check_supported(
        args: RLSDConfig,
        policy: torch.nn.Module,
        datasets: dict[str, Any],
        *,
        images: bool,
        tools: bool,
        fsdp: bool,
        deepspeed: bool,
    ) -> None:
        """Teacher rollouts generate with transformers from the unwrapped teacher on each process's own prompts, from
        text prompts, in one turn: images, tools, FSDP and DeepSpeed are refused; BRTS's retry needs the answers of
        `datasets` (`train_dataset`, `eval_dataset`). BRTS's top-K KL projects hidden states through a plain head: a
        `policy` that caps or rescales its logits is refused for it (PBSD scores through TRL's fused head, which
        applies the model's scaling)."""
        if args.teacher_rollout_loss == "brts":
            check_plain_lm_head(policy, "teacher_rollout_loss='brts'")
        flags = {"images": images, "tools": tools, "FSDP": fsdp, "DeepSpeed": deepspeed}
        used = [name for name, on in flags.items() if on]
        if used:
            raise NotImplementedError(
                f"teacher_rollout_loss={args.teacher_rollout_loss!r} with {' and '.join(used)}: the teacher's "
                "generation is implemented for text prompts, one turn, on plain or DDP processes only"
            )
        if args.teacher_rollout_loss == "brts":  # the retry shows the reference answer
            for split_name in ("train_dataset", "eval_dataset"):
                AnswerSource(args).check_dataset(datasets.get(split_name), split_name)

    def add(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        entries: RLSDEntries,
        mode: str,
        pass_logps: torch.Tensor | None = None,
    ) -> None:
        """BRTS / PBSD (training rollouts only): the teacher generates N completions for each of this process's
        prompts (a group's first local row) from its teacher prompt, and each row gets the teacher trajectory it
        learns from in `entries` (`rlsd.teacher_rollouts`). `pass_logps`: the rule pass's teacher log-probs of every
        row's completion, reused as PBSD's log pi_T(y- | x_T). Every process generates and scores the same number of
        prompts (topped up with its last one), so that reward gathering stays in step."""
        args = self.args
        if mode != "train":
            return
        start = time.perf_counter()
        group_size, local_rows = self.group_size(), len(inputs)
        positions = torch.arange(local_rows) + self.accelerator.process_index * local_rows
        groups = (positions // group_size).tolist()
        firsts = [i for i in range(local_rows) if i == 0 or groups[i] != groups[i - 1]]
        row_prompt = torch.tensor([len([f for f in firsts if f <= i]) - 1 for i in range(local_rows)])
        count = int(self.accelerator.gather(torch.tensor([len(firsts)], device=self.accelerator.device)).max())
        prompt_rows = torch.tensor(firsts + [firsts[-1]] * (count - len(firsts)))
        teacher_ids, teacher_mask, _, _ = self.teacher_inputs(inputs, output, mode, prompt_rows)
        device, n = teacher_ids.device, args.teacher_rollouts
        ids, mask = self.generate(teacher_ids, teacher_mask, n)
        plain = (output["prompt_ids"][prompt_rows], output["prompt_mask"][prompt_rows])
        if args.teacher_rollout_loss == "pbsd":
            per_sample = (teacher_ids.repeat_interleave(n, dim=0), teacher_mask.repeat_interleave(n, dim=0))
            teacher_logps = self._trajectory_pass("teacher", *per_sample, ids, mask, None)[0]
            pick = row_prompt.to(device) * n + pair_index(positions.to(device) % group_size, n)
            entries.rollout_ids, entries.rollout_mask = ids[pick], mask[pick]
            entries.rollout_ref_logps = (teacher_logps * mask).sum(-1)[pick]
            if pass_logps is None:
                by_row = (teacher_ids[row_prompt], teacher_mask[row_prompt])
                pass_logps = self.score("teacher", *by_row, output, {}).logps
            entries.rollout_neg_ref_logps = (pass_logps * loss_mask(output)).sum(-1)
            metrics: dict[str, float] = {}
        else:
            first = self._brts_candidates(inputs, prompt_rows, plain, teacher_ids, teacher_mask, ids, mask)
            correct = select_rollout(first.rewards, first.alignment)[1][: len(firsts)]
            # the retry shows the reference answer; a source whose teacher prompts already show it would only
            # re-sample the same prompt, so it has none
            needs_retry = (~correct).sum() if "answer" not in self.source.fills else torch.zeros((), device=device)
            target = int(self.accelerator.gather(needs_retry.reshape(1)).max())
            retry = None
            if target > 0:  # on every process once any prompt anywhere needs it: gathering rewards is collective
                order = torch.cat([(~correct).nonzero().flatten(), torch.arange(count, device=device)])[:target]
                retry_ids, retry_mask = self._answer_prompts(inputs, prompt_rows[order.cpu()])
                again = self.generate(retry_ids, retry_mask, n)
                retry = self._brts_candidates(inputs, prompt_rows[order.cpu()], (plain[0][order], plain[1][order]),
                                              retry_ids, retry_mask, *again).spread(order, count)  # fmt: skip
            choice = select_brts(first.rewards, first.alignment, *((retry.rewards, retry.alignment) if retry else ()))
            pool = first.join(retry) if retry else first
            pick = torch.arange(count, device=device) * pool.rewards.size(1) + choice.index
            kept = [value.flatten(0, 1)[pick][row_prompt.to(device)] for value in (pool.ids, pool.mask, *pool.topk)]
            entries.rollout_ids, entries.rollout_mask, entries.rollout_topk_logps, entries.rollout_topk_ids = kept
            # the trajectory is learned once per prompt: only the prompt's first local row keeps its mask, so the
            # loss-time student forward runs on one row per prompt, not on every row of the group
            first_rows = torch.zeros(local_rows, dtype=torch.bool, device=device)
            first_rows[firsts] = True
            entries.rollout_mask = entries.rollout_mask * first_rows[:, None]
            real = len(firsts)
            metrics = {
                "teacher_rollout_correct": TokenMean(choice.correct[:real].float().mean().item(), real),
                "teacher_rollout_retry": TokenMean(choice.retried[:real].float().mean().item(), real),
                "teacher_rollout_alignment": TokenMean(pool.alignment.flatten()[pick][:real].mean().item(), real),
            }
        metrics["teacher_rollout_time_s"] = time.perf_counter() - start
        self.log(mode, metrics)

    def _answer_prompts(self, inputs: list[dict[str, Any]], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BRTS's retry prompts of `rows`: the `"answer"` source's template (the run's own with that source) with the
        reference answer shown, tokenized and left-padded."""
        template = self.args.teacher_template if self.args.privileged_source == "answer" else None
        fields = AnswerSource(self.args).context(RolloutView(inputs, self.group_size()), rows.tolist()).fields
        prompts = [inputs[i]["prompt"] for i in rows.tolist()]
        ids_list, _, _ = self.tokenize_prompts(
            render_teacher_prompts(prompts, template or AnswerSource.default_template, fields)
        )
        device = self.accelerator.device
        ids = pad([torch.tensor(x) for x in ids_list], padding_value=self.tokenizer.pad_token_id, padding_side="left")
        mask = pad([torch.ones(len(x), dtype=torch.long) for x in ids_list], padding_value=0, padding_side="left")
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """N sampled completions per left-padded prompt from the teacher (transformers `generate` with TRL's
        generation config: the run's temperature, top_p, top_k, max_completion_length), (P * N, L) ids (pad after
        the first EOS) and mask, prompt-major."""
        ids, mask = prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0)
        with self.scoring_model("teacher") as teacher:
            sequences = self.accelerator.unwrap_model(teacher).generate(
                input_ids=ids, attention_mask=mask, generation_config=self.generation_config
            )
        completion = sequences[:, ids.size(1) :]
        keep = completion_mask(completion, self.eos_token_ids)
        return completion.masked_fill(keep == 0, self.tokenizer.pad_token_id), keep

    @torch.no_grad()
    def _trajectory_pass(
        self,
        which: str,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        k: int | None,
    ) -> list[torch.Tensor]:
        """One no-grad forward of `which` ("teacher" or "student") on [prompt ; trajectory], chunked by the
        per-device batch: the sampled tokens' log-probs (R, L), and with `k` the top-k log-probs and ids (R, L, k)."""
        if k is None:  # the sampled tokens only: TRL's scoring forward (fused head, the model's logit scaling)
            with self.scoring_model(which) as scoring:
                logps, _, _ = self.trl_logps(
                    scoring, torch.cat([prompt_ids, ids], dim=1), torch.cat([prompt_mask, mask], dim=1),
                    ids.size(1), batch_size=self.scoring_batch_size(),
                )  # fmt: skip
            return [logps]
        pieces = []
        batch = self.scoring_batch_size()
        with self.scoring_model(which) as scoring, self.accelerator.autocast():
            model = self.accelerator.unwrap_model(scoring)
            for start in range(0, ids.size(0), batch):
                rows = slice(start, start + batch)
                out = model(
                    input_ids=torch.cat([prompt_ids[rows], ids[rows]], dim=1),
                    attention_mask=torch.cat([prompt_mask[rows], mask[rows]], dim=1),
                    logits_to_keep=ids.size(1) + 1,
                )
                logits = out.logits[:, :-1].float() / self.temperature
                sampled = torch.log_softmax(logits, dim=-1).gather(-1, ids[rows].unsqueeze(-1)).squeeze(-1)
                pieces.append((sampled, *(teacher_topk(logits, k) if k else ())))
        return [torch.cat(parts) for parts in zip(*pieces, strict=True)]

    def _brts_candidates(
        self,
        inputs: list[dict[str, Any]],
        prompt_rows: torch.Tensor,
        plain: tuple[torch.Tensor, torch.Tensor],
        teacher_ids: torch.Tensor,
        teacher_mask: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> Candidates:
        """BRTS's view of N teacher trajectories per prompt (`ids`, prompt-major): the teacher's top-K on them, the
        student's alignment with it (the student on the plain prompt) and their weighted total rewards from the run's
        reward functions (TRL's `_calculate_rewards`, gathered over processes; NaN when every function abstains)."""
        k, n = self.args.distill_overlap_k, self.args.teacher_rollouts
        index = torch.arange(ids.size(0), device=ids.device) // n  # each trajectory's prompt
        _, top_logps, top_ids = self._trajectory_pass("teacher", teacher_ids[index], teacher_mask[index], ids, mask, k)
        student_ids = self._trajectory_pass("student", plain[0][index], plain[1][index], ids, mask, k)[2]
        alignment = trajectory_alignment(student_ids, top_ids, mask)
        rows = [inputs[i] for i in prompt_rows.repeat_interleave(n).tolist()]
        texts = self.tokenizer.batch_decode([row[m.bool()] for row, m in zip(ids, mask, strict=True)],
                                            skip_special_tokens=True)  # fmt: skip
        prompts = [row["prompt"] for row in rows]
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        token_lists = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        per_func = self.trl_rewards(rows, prompts, completions, token_lists)
        start = self.accelerator.process_index * len(rows)
        totals = reward_totals(per_func[start : start + len(rows)], self.reward_weights)
        shape = (-1, n)
        return Candidates(ids.view(*shape, ids.size(1)), mask.view(*shape, ids.size(1)), totals.view(shape),
                          alignment.view(shape), (top_logps.view(*shape, *top_logps.shape[1:]),
                                                  top_ids.view(*shape, *top_ids.shape[1:])))  # fmt: skip

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], entries: RLSDEntries, student_logps: torch.Tensor
    ) -> torch.Tensor | float:
        """`teacher_rollout_coef` * the micro-batch's BRTS or PBSD term, scaled for gradient accumulation (0 for a
        batch without teacher trajectories): one more forward of the student's backbone on [plain prompt ; teacher
        trajectory], with gradient, its hidden states projected `distill_chunk_tokens` at a time. BRTS: the token
        mean of KL(p_T^K || p_S^K) over the kept trajectories' tokens (one row per prompt carries each, so the
        forward runs on those rows only); PBSD: the row mean of the DPO loss, log pi(y+ | x) from one forward per
        distinct teacher sample and log pi(y- | x) the sum of TRL's own log-probs (`student_logps`) of the
        completion."""
        if entries.rollout_ids is None:
            return 0.0
        args = self.args
        mode = "train" if self.training() else "eval"
        ids, mask = entries.rollout_ids, entries.rollout_mask
        brts = entries.rollout_topk_ids is not None
        if brts:  # the rows that carry a kept trajectory (a prompt's first row)
            rows, inverse = mask.any(dim=1).nonzero().flatten(), None
            if rows.numel() == 0:  # no kept trajectory starts in this micro-batch
                self.log(mode, {"teacher_rollout_loss": TokenMean(0.0, 0.0)})
                return 0.0
        else:  # PBSD: the completions of a group share teacher samples; each distinct [prompt ; sample] runs once
            rows, inverse = distinct_rows(torch.cat([inputs["prompt_ids"], inputs["prompt_mask"], ids, mask], dim=1))
        ids, mask = ids[rows], mask[rows]
        input_ids = torch.cat([inputs["prompt_ids"][rows], ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"][rows], mask], dim=1)
        selected = mask.bool()
        if brts:
            backbone, head = backbone_and_head(self.accelerator.unwrap_model(model))
            with self.accelerator.autocast():  # as TRL's loss forward runs
                output = backbone(input_ids=input_ids, attention_mask=attention_mask)
            states = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            states = states[:, -ids.size(1) - 1 : -1]
            logits_fn = head_logits(head, self.temperature)
            top_logps, top_ids = entries.rollout_topk_logps[rows], entries.rollout_topk_ids[rows]
            per_token = chunked_topk_kl(states[selected], logits_fn, top_logps[selected], top_ids[selected],
                                        args.distill_chunk_tokens)  # fmt: skip
            value = per_token.sum() / selected.sum().clamp(min=1)
            metrics = {"teacher_rollout_loss": TokenMean(value.item(), selected.sum().item())}
        else:  # PBSD: log pi(y+ | x) through TRL's scoring forward, as log pi(y- | x) (`student_logps`) was
            logps, _, _ = self.trl_logps(model, input_ids, attention_mask, ids.size(1))
            policy_neg = (student_logps * loss_mask(inputs)).sum(-1)
            losses, margins = pbsd_loss((logps * mask).sum(-1)[inverse], entries.rollout_ref_logps, policy_neg,
                                        entries.rollout_neg_ref_logps, args.pbsd_beta)  # fmt: skip
            value = losses.mean()
            pairs = float(losses.numel())
            metrics = {"teacher_rollout_loss": TokenMean(value.item(), pairs),
                       "pbsd_margin": TokenMean(margins.mean().item(), pairs)}  # fmt: skip
        self.log(mode, metrics)
        accumulation = self.accumulation() if mode == "train" else 1
        return args.teacher_rollout_coef * value / accumulation


class NoTeacherRollouts:
    """The rollout term of a run without teacher rollouts (`teacher_rollout_loss="none"`): adds nothing to a
    rollout and 0 to the loss, so that the trainer calls it unconditionally."""

    def add(
        self,
        inputs: list[dict[str, Any]],
        output: dict[str, Any],
        entries: RLSDEntries,
        mode: str,
        pass_logps: torch.Tensor | None = None,
    ) -> None:
        """No teacher trajectories to add."""

    def term(
        self, model: torch.nn.Module, inputs: dict[str, Any], entries: RLSDEntries, student_logps: torch.Tensor
    ) -> float:
        """No term: 0."""
        return 0.0
